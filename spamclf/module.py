"""SpamClassifier: GPT-2 with a classification head, trained with Lightning.

The only module that knows both the model and training: loss and metrics on the pooled logits,
AdamW over the trainable parameters, the frozen-prefix cache, slim checkpoints, and `predict_texts`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from spamclf.cache import PrefixCache, cache_blocker, packed_prefix, release_freed_memory
from spamclf.data import NATURAL
from spamclf.decision import (
    choose_threshold,
    decide,
    fit_temperature,
    operating_point,
    positive_index,
    probabilities,
    threshold_rule,
)
from spamclf.errors import CheckpointError, InvalidOption, SpamclfError
from spamclf.gpt2 import GPT2, PRESETS, preset, real_tokens
from spamclf.hardware import inference_dtype, onednn_bf16_inference
from spamclf.heads import (
    apply_trainable_layers,
    check_pooling,
    count_parameters,
    frozen_prefix_depth,
    pool,
    pooled_position,
    replace_head,
)
from spamclf.progress import progress_bar
from spamclf.tokenizer import encode_texts

log = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("pretrained", "random")
SCHEDULERS = ("constant", "cosine")
CACHE_DTYPES = ("auto", "bf16", "fp32")


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    kw = {"num_classes": num_classes}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(average="micro", **kw),
            "f1": MulticlassF1Score(average="macro", **kw),
            "precision": MulticlassPrecision(average="macro", **kw),
            "recall": MulticlassRecall(average="macro", **kw),
            "auroc": MulticlassAUROC(average="macro", **kw),
        },
        prefix=prefix,
    )


class SpamClassifier(L.LightningModule):
    """GPT-2 text classifier.

    Args:
        model_name: gpt2-small | gpt2-medium | gpt2-large | gpt2-xl | gpt2-tiny (random only).
        weights: pretrained (open GPT-2 weights through the hub cache) or random (the book's row 10).
        weights_path: a local .safetensors file or folder to load instead of the hub.
        label_names: class names in id order (from the data config); their count sizes the head.
        trainable_layers: head | last_block | last_two_blocks | all | lora | an integer k.
        pooling: last | first | last_nonpad | mean.
        pooled_only: the last block computes only the position the pooling reads (its keys and values still
            come from every position): the same logits, ~6x less work in that block; not for mean pooling.
        causal: False disables the causal mask (the book's experiment).
        drop_rate: dropout everywhere in GPT-2 (the book fine-tunes with 0.0).
        lora_rank, lora_alpha: LoRA settings for trainable_layers=lora.
        lr, weight_decay: AdamW over the trainable parameters.
        scheduler, warmup_steps: constant, or linear warm-up then cosine decay to zero.
        prefix_cache: cache the frozen prefix's activations when that is exact.
        cache_dtype: auto (bf16 under bf16 precision, else fp32) | bf16 | fp32.
        cache_max_memory_mb: above this the cache lives in a temporary file (CPU).
        compile: torch.compile the transformer blocks.
        positive_label: the class a filter flags (None: "spam" if a label, else the last one).
        threshold: the positive class's probability that flags a message (two classes): a number, or a rule
            chosen on validation after training: {max_fpr: R} (highest recall with a false-positive rate of
            at most R), {min_precision: P}, {max_f1: true}; see spamclf.decision.
        calibrate: fit a temperature on validation after training, so probabilities are calibrated.
        tokenization: padding rule and label names recorded from the data at fit time (for prediction).
        decision: the threshold and temperature chosen after training (saved in checkpoints, for prediction).
    """

    def __init__(
        self,
        model_name: str = "gpt2-small",
        weights: str = "pretrained",
        weights_path: str | None = None,
        label_names: Sequence[str] = ("ham", "spam"),
        trainable_layers: str | int = "last_block",
        pooling: str = "last",
        pooled_only: bool = True,
        causal: bool = True,
        drop_rate: float = 0.0,
        lora_rank: int = 16,
        lora_alpha: float = 16,
        lr: float = 5e-5,
        weight_decay: float = 0.1,
        scheduler: str = "constant",
        warmup_steps: int = 0,
        prefix_cache: bool = True,
        cache_dtype: str = "auto",
        cache_max_memory_mb: float = 4096,
        compile: bool = False,
        positive_label: str | None = None,
        threshold: float | dict = 0.5,
        calibrate: bool = False,
        tokenization: dict | None = None,
        decision: dict | None = None,
    ):
        super().__init__()
        label_names = [str(n) for n in label_names]
        if len(label_names) < 2:
            raise InvalidOption("label_names", label_names, "at least two class names")
        for option, value, choices in (("weights", weights, WEIGHTS_CHOICES), ("scheduler", scheduler, SCHEDULERS),
                                       ("cache_dtype", cache_dtype, CACHE_DTYPES)):
            if value not in choices:
                raise InvalidOption(option, value, "one of " + ", ".join(choices))
        check_pooling(pooling)
        self.positive = positive_index(label_names, positive_label)
        self.rule = threshold_rule(threshold)
        if self.rule[0] != "fixed" and len(label_names) != 2:
            raise InvalidOption("threshold", threshold, f"a fixed threshold: rules need two classes, not {len(label_names)}")
        self.save_hyperparameters()
        self.hparams.label_names = label_names
        overrides = {"drop_rate": drop_rate, "causal": causal}
        if weights == "pretrained":
            self.model = GPT2.from_pretrained(weights_path or model_name, **overrides)
        elif model_name not in PRESETS:
            raise InvalidOption("model_name", model_name, "one of " + ", ".join(PRESETS))
        else:
            self.model = GPT2.random(preset(model_name, **overrides))
        replace_head(self.model, len(label_names))
        apply_trainable_layers(self.model, trainable_layers, lora_rank, lora_alpha)
        self.trainable, self.total = count_parameters(self.model)
        log.info("%s (%s): %s of %s parameters trainable (%s)", model_name, weights, f"{self.trainable:,}",
                 f"{self.total:,}", trainable_layers)
        if compile:
            for block in self.model.trf_blocks:
                block.compile()
        # Real tokens are masked in only where padding could otherwise reach them: without the causal
        # mask. With it, right padding never reaches a real token, and pooling=last reads padding by design.
        self.use_mask = not causal and pooling != "last"
        self.metrics = torch.nn.ModuleDict({
            f"{name}_metrics": _metrics(len(label_names), f"{name}/")
            for name in ("train", "val", "test", "best_train", "best_val", NATURAL)
        })
        # Evaluation losses as weighted means synced across ranks: exact under DDP, whatever the shard sizes.
        self.losses = torch.nn.ModuleDict({name: MeanMetric() for name in ("val", "test", "best_train", "best_val", NATURAL)})
        self.caches: dict[str, PrefixCache] = {}
        self.test_outputs: dict[str, dict[str, list[torch.Tensor]]] = {}  # split → logits, labels (final evaluation)
        self.operating: dict[str, dict] = {}  # split → metrics at the chosen threshold (after the final evaluation)

    # ------------------------------------------------------------------------------------- forward
    @property
    def label_names(self) -> list[str]:
        return list(self.hparams.label_names)

    @property
    def temperature(self) -> float:
        return float((self.hparams.decision or {}).get("temperature", 1.0))

    @property
    def threshold(self) -> float:
        """The positive class's probability that flags a message: chosen after training, else the fixed value."""
        return float((self.hparams.decision or {}).get("threshold", self.rule[1] if self.rule[0] == "fixed" else 0.5))

    def valid_mask(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        if not self.use_mask:
            return None
        return real_tokens(lengths.to(input_ids.device), input_ids.shape[1])

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor | None = None,
                start_block: int = 0) -> torch.Tensor:
        """Class logits [B, C]; `hidden` resumes from cached states after `start_block` frozen blocks."""
        valid = self.valid_mask(input_ids, lengths)
        x = self.model.embed(input_ids) if hidden is None else hidden
        at = pooled_position(lengths.to(x.device), x.shape[1], self.hparams.pooling) if self.hparams.pooled_only else None
        if at is None:
            x = self.model.final_norm(self.model.run_blocks(x, start_block, valid=valid))
            return self.model.out_head(pool(x, lengths, self.hparams.pooling))
        x = self.model.run_blocks(x, start_block, valid=valid, at=at)[:, 0]
        return self.model.out_head(self.model.final_norm(x))

    def _logits(self, batch: dict) -> torch.Tensor:
        cache = self._prefix_cache(batch["split"])
        if cache is None:
            return self(batch["input_ids"], batch["lengths"])
        hidden = cache.gather(batch["index"], batch["input_ids"].shape[1], self.device, self.model.pos_emb.weight.dtype)
        return self(batch["input_ids"], batch["lengths"], hidden, cache.depth)

    # ---------------------------------------------------------------------------------- prefix cache
    def cache_plan(self) -> tuple[int, str | None]:
        """(frozen depth, reason it cannot be cached or None)."""
        depth = frozen_prefix_depth(self.model)
        tok = self.hparams.tokenization or {}
        reason = cache_blocker(depth, self.hparams.drop_rate, self.hparams.causal, self.hparams.pooling, tok.get("pad_length"))
        if not self.hparams.prefix_cache:
            reason = "model.prefix_cache=false"
        return depth, reason

    def _prefix_cache(self, split: str) -> PrefixCache | None:
        if split in self.caches:
            return self.caches[split]
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        depth, reason = self.cache_plan()
        if reason is not None or datamodule is None or split not in getattr(datamodule, "datasets", {}):
            if split == "train" and reason is not None:
                log.info("prefix cache off: %s", reason)
            self.caches[split] = None
            return None
        dtype = self.hparams.cache_dtype
        if dtype == "auto":
            dtype = "bf16" if "bf16" in str(self.trainer.precision) else "fp32"
        dataset = datamodule.datasets[split]
        shown = self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero
        with progress_bar(f"prefix cache ({split})", len(dataset), enabled=shown) as advance:
            self.caches[split] = PrefixCache.build(
                self.model, dataset, datamodule.pad_length, depth, self.hparams.pooling, self.use_mask,
                dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=self.device,
                max_memory_mb=self.hparams.cache_max_memory_mb, progress=advance,
            )
        return self.caches[split]

    def drop_caches(self) -> None:
        for cache in self.caches.values():
            if cache is not None:
                cache.close()
        self.caches = {}

    # ---------------------------------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            described = datamodule.describe()
            if described["label_names"] and described["label_names"] != self.label_names:
                raise InvalidOption("label_names", self.label_names, f"the data's labels {described['label_names']}")
            self.hparams.tokenization = described

    def on_fit_start(self) -> None:
        log.info("trainable parameters: %s / %s", f"{self.trainable:,}", f"{self.total:,}")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        metrics = self.metrics["train_metrics"]
        metrics["acc"](logits.detach().float(), batch["labels"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        self.log("train/acc", metrics["acc"], on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        return loss

    def _evaluate(self, batch: dict, name: str) -> None:
        logits = self._logits(batch).float()
        loss = F.cross_entropy(logits, batch["labels"])
        self.losses[name].update(loss, weight=len(logits))
        self.log(f"{name}/loss", self.losses[name], on_epoch=True, batch_size=len(logits), add_dataloader_idx=False)
        metrics = self.metrics[f"{name}_metrics"]
        metrics.update(logits, batch["labels"])
        self.log_dict(metrics, on_epoch=True, batch_size=len(logits), add_dataloader_idx=False)
        if self.trainer.testing:
            outputs = self.test_outputs.setdefault(batch["split"], {"logits": [], "labels": []})
            outputs["logits"].append(logits.detach().cpu())
            outputs["labels"].append(batch["labels"].cpu())

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = batch["split"]
        self._evaluate(batch, split if split in ("test", NATURAL) else f"best_{split}")

    def on_test_epoch_start(self) -> None:
        self.test_outputs, self.operating = {}, {}

    def on_test_epoch_end(self) -> None:
        """Choose the operating point on validation (temperature, then threshold), then measure it on every
        evaluated split. Needs the validation split among the evaluated ones to choose; else keeps what it has."""
        self.test_outputs = self._gathered_outputs()  # every rank's shard: the reports read them too
        outputs = {split: (torch.cat(o["logits"]), torch.cat(o["labels"])) for split, o in self.test_outputs.items()}
        if "val" in outputs and (self.hparams.calibrate or self.rule[0] != "fixed"):
            logits, labels = outputs["val"]
            temperature = fit_temperature(logits, labels) if self.hparams.calibrate else self.temperature
            probs = probabilities(logits, temperature)
            chosen = choose_threshold(probs[:, self.positive], labels == self.positive, *self.rule) if len(self.label_names) == 2 else 0.5
            self.hparams.decision = {"threshold": chosen, "temperature": temperature, "rule": self.rule[0], "target": self.rule[1]}
            log.info("operating point chosen on validation: threshold %.4f (%s=%s), temperature %.3f",
                     chosen, self.rule[0], self.rule[1], temperature)
        datamodule = getattr(self.trainer, "datamodule", None)
        shares = getattr(datamodule, "class_shares", {}) or {}
        prevalence = shares.get(self.label_names[self.positive])
        for split, (logits, labels) in outputs.items():
            point = operating_point(probabilities(logits, self.temperature), labels, self.label_names, self.positive,
                                    self.threshold, prevalence if split == NATURAL else None)
            self.operating[split] = point
            scalars = {k: point[k] for k in ("fpr", "recall", "precision", "f1", "ece", "threshold", "precision_at_prevalence")
                       if isinstance(point.get(k), float) and math.isfinite(point[k])}
            prefix = {"train": "best_train", "val": "best_val"}.get(split, split)
            for key, value in scalars.items():
                name = f"{key}_at_threshold" if key in ("recall", "precision", "f1") else key
                self.log(f"{prefix}/{name}", value, add_dataloader_idx=False)

    def _gathered_outputs(self) -> dict[str, dict[str, list[torch.Tensor]]]:
        """The final evaluation's logits and labels of every rank (each rank saw a shard)."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self.test_outputs
        shards = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shards, self.test_outputs)
        merged: dict[str, dict[str, list[torch.Tensor]]] = {}
        for shard in shards:
            for split, outputs in shard.items():
                for key, tensors in outputs.items():
                    merged.setdefault(split, {}).setdefault(key, []).extend(tensors)
        return merged

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # The fused kernel is one pass over the parameters: ~7x faster than the default on CPU.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
        if self.hparams.scheduler == "constant" and not self.hparams.warmup_steps:
            return optimizer
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps
        cosine = self.hparams.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Frozen pretrained weights are not copied into checkpoints: only the trainable tensors plus the
        base file's identity (source, sha256); loading rebuilds the base from the cache or the file."""
        if self.hparams.weights != "pretrained":
            return
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["base_weights"] = dict(self.model.source)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        base = checkpoint.get("base_weights")
        if base is None:
            return
        ours = self.model.source or {}
        if base.get("sha256") != ours.get("sha256"):
            raise CheckpointError(
                f"checkpoint was trained on base weights {base.get('source')} (sha256 {base.get('sha256', '?')[:12]}…) but "
                f"{ours.get('file')} has sha256 {ours.get('sha256', '?')[:12]}…; point model.weights_path at the original file"
            )
        current = self.state_dict()
        checkpoint["state_dict"] = {**current, **checkpoint["state_dict"]}
        self.drop_caches()

    # ----------------------------------------------------------------------------------- prediction
    @torch.inference_mode()
    def predict_texts(self, texts: Sequence[str], batch_tokens: int = 2048, precision: str = "auto",
                      progress: Callable[[int], None] | None = None, keep_kernels: bool = False) -> list[dict]:
        """Classify raw texts with the training run's tokenization and padding rule.

        `precision`: auto (bf16 where the CPU or GPU runs it natively, else fp32; see spamclf.hardware),
        bf16, fp16 or fp32. `progress(n)` is called as each batch of n distinct texts is done. `keep_kernels`:
        keep the CPU kernels' prepacked weights for the next call (a server's model, whose weights stay fixed).

        Each message's probability does not depend on what it is batched with: fixed padding pads every
        message alike, per-batch padding is only used with poolings that never read padding, and with
        pooling=last and per-batch padding messages are batched only with others of the same length.
        Batches hold about `batch_tokens` tokens: short messages go many to a batch. Identical texts are
        classified once. Empty text is classified as a lone <|endoftext|>; text longer than the training
        width (or the context) is cut to it, keeping its beginning, as in training, and marked "truncated".
        """
        tok = self.hparams.tokenization or {}
        pad_length, context = tok.get("pad_length"), tok.get("context_length", self.model.cfg.context_length)
        distinct = list(dict.fromkeys(str(t) for t in texts))
        encoded = encode_texts(distinct)
        truncated = dict(zip(distinct, (len(row) > (pad_length or context) for row in encoded)))
        ids = [row[: pad_length or context] for row in encoded]
        stored = [pad_length or len(row) for row in ids]
        same_length_only = pad_length is None and self.hparams.pooling == "last"
        n_layers = self.model.cfg.n_layers
        depth = n_layers - 1 if self.hparams.pooled_only and self.hparams.pooling != "mean" else n_layers
        self.eval()
        probs: list[torch.Tensor | None] = [None] * len(ids)
        dtype = inference_dtype(precision, self.device)
        with (torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
              onednn_bf16_inference(self.model, keep=keep_kernels)):
            for batch in packed_prefix(self.model, ids, stored, depth, self.use_mask, pad_length, device=self.device,
                                       tokens_per_batch=batch_tokens, one_width=same_length_only):
                logits = self(batch.input_ids.to(self.device), batch.lengths.to(self.device), batch.grid(), depth)
                for i, p in zip(batch.rows, probabilities(logits, self.temperature).cpu()):
                    probs[i] = p
                if progress is not None:
                    progress(len(batch.rows))
        release_freed_memory()  # else glibc keeps the activations' fragmented heap: memory would creep up per chunk
        by_text = dict(zip(distinct, probs))
        names = self.label_names
        results = []
        for text in texts:
            p = by_text[str(text)]
            best = int(decide(p[None], self.positive, self.threshold)[0])
            results.append({"text": text, "label": names[best], "probability": float(p[best]),
                            "probabilities": {n: float(v) for n, v in zip(names, p)}, "truncated": truncated[str(text)]})
        return results


def load_classifier(path: str | os.PathLike, map_location: str = "cpu") -> SpamClassifier:
    """`SpamClassifier.load_from_checkpoint` (never unpickling code: weights_only) with one-line errors."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass the .ckpt a training run wrote (its checkpoints/ folder)")
    try:
        return SpamClassifier.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except SpamclfError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever is wrong inside the file, the fix is the same
        raise CheckpointError(
            f"{path}: not a readable spamclf checkpoint ({type(e).__name__}); pass a .ckpt written by train.py"
        ) from None
