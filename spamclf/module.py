"""SpamClassifier: GPT-2 with a classification head, trained and evaluated with Lightning.

Training side only: loss and metrics on the pooled logits, the configured optimizer over the trainable parameters,
the frozen-prefix cache, the decision chosen after each validation, slim checkpoints that carry it. Prediction is
`spamclf.inference.Classifier`, which reads these checkpoints without Lightning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

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

from spamclf.cache import CacheSettings, SplitCaches
from spamclf.classifier import release_freed_memory
from spamclf.decision import Decision, load_decision
from spamclf.errors import InvalidOption
from spamclf.evaluation import Evaluated, choose_decision, gathered, operating_point
from spamclf.heads import Readout, classifier_network, count_parameters, frozen_linears_to
from spamclf.inference import check_base_weights, checkpoint_errors, probabilities
from spamclf.optimization import DEFAULT_OPTIMIZER, build_optimizer, build_scheduler
from spamclf.precision import dtype_of
from spamclf.prepared import PreparedData
from spamclf.splits import NATURAL

log = logging.getLogger(__name__)
# names of the evaluation passes (best_*: the final one, of the best checkpoint)
EVALUATED = ("val", "test", "best_train", "best_val", NATURAL)
POINT_SCALARS = ("fpr", "recall", "precision", "f1", "ece", "threshold", "precision_at_prevalence")


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    kw = {"num_classes": num_classes, "average": "macro"}
    return MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                             "f1_macro": MulticlassF1Score(**kw), "precision_macro": MulticlassPrecision(**kw),
                             "recall_macro": MulticlassRecall(**kw), "auroc": MulticlassAUROC(**kw)}, prefix=prefix)


def _same_splits(before: PreparedData, now: PreparedData) -> bool:
    """Whether a hand-over holds the very splits and padding of the one before (the Trainer sets the data up again
    for each stage): then the built caches still hold their states, in memory or in their spill files."""
    return now.pad_length == before.pad_length and all(before.datasets.get(split, rows) is rows
                                                       for split, rows in now.datasets.items())


class SpamClassifier(L.LightningModule):
    """GPT-2 text classifier. Every argument is a `model.*` config key (conf/model/gpt2-small.yaml explains each);
    the network's keys stay flat because `spamclf.inference` reads them from checkpoints. `optimizer` and
    `scheduler` are partials (`spamclf.optimization`); `prefix_cache` is `CacheSettings` (or its dict, or a bare
    on/off); `tokenization` is recorded by training itself (`use_data`) and read back from checkpoints."""

    def __init__(
        self, model_name: str = "gpt2-small", weights: str = "pretrained", weights_path: str | None = None,
        label_names: Sequence[str] = ("ham", "spam"), trainable_layers: str | int = "last_block", pooling: str = "last",
        pooled_only: bool = True, causal: bool = True, drop_rate: float = 0.0, lora_rank: int = 16,
        lora_alpha: float = 16, optimizer: Callable | None = None, scheduler: Callable | None = None,
        prefix_cache: bool | dict | CacheSettings = True, compile: bool = False, positive_label: str | None = None,
        threshold: float | dict = 0.5, calibrate: bool = False, tokenization: dict | None = None,
    ):
        super().__init__()
        label_names = [str(n) for n in label_names]
        if len(label_names) < 2:
            raise InvalidOption("label_names", label_names, "at least two class names")
        cache = CacheSettings.of(prefix_cache)
        prefix_cache = cache.as_dict()  # checkpoints keep plain values: they are read with weights_only
        # The partials are code, not values: the run's .hydra/config.yaml records them.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer or DEFAULT_OPTIMIZER, scheduler
        self.readout = Readout(pooling, pooled_only, causal)
        self.decision = Decision.configured(label_names, positive_label, threshold)
        self.model = classifier_network(model_name, len(label_names), weights, weights_path, trainable_layers,
                                        lora_rank, lora_alpha, drop_rate, causal)
        self.trainable, self.total = count_parameters(self.model)
        log.info("%s (%s): %s of %s parameters trainable (%s)", model_name, weights, f"{self.trainable:,}",
                 f"{self.total:,}", trainable_layers)
        if compile:
            self._compile_trained_blocks(cache.enabled)
        self.metrics = torch.nn.ModuleDict({f"{name}_metrics": _metrics(len(label_names), f"{name}/")
                                            for name in EVALUATED})
        # Evaluation losses as weighted means synced across ranks: exact under DDP, whatever the shard sizes.
        self.losses = torch.nn.ModuleDict({name: MeanMetric() for name in EVALUATED})
        self.caches = SplitCaches(cache)
        self.data: PreparedData | None = None  # handed over by use_data
        self.cache_precision, self.show_progress = "32-true", False
        self.outputs: dict[str, dict[str, list[torch.Tensor]]] = {}  # split → logits, labels of this evaluation pass
        self.evaluated: dict[str, Evaluated] = {}  # split → the final evaluation at the operating point

    def _compile_trained_blocks(self, prefix_cache: bool) -> None:
        # With the prefix cache, frozen blocks run once per message through oneDNN's kernels, uncompiled.
        for block in self.model.trf_blocks:
            if not prefix_cache or any(p.requires_grad for p in block.parameters()):
                block.compile()

    def use_data(self, data: PreparedData, precision: str, show_progress: bool = False) -> None:
        """The hand-over from the data side before the first batch (`DataHandOver` does it each time the Trainer has
        set the data up): the splits the prefix cache runs over, what checkpoints record as `tokenization`, the
        file's class shares; `precision` (a Lightning name from `spamclf.precision.resolve`) sets the cache's dtype."""
        if data.label_names and data.label_names != self.label_names:
            raise InvalidOption("label_names", self.label_names, f"the data's labels {data.label_names}")
        if self.data is not None and not _same_splits(self.data, data):  # the cached states no longer match
            self.caches.close()
        self.hparams.tokenization = data.tokenization
        self.data, self.cache_precision, self.show_progress = data, precision, show_progress
        if dtype_of(precision) == torch.bfloat16 and frozen_linears_to(self.model, torch.bfloat16):
            release_freed_memory()  # the same numbers under bf16 autocast, in half the memory

    @property
    def label_names(self) -> list[str]:
        return list(self.hparams.label_names)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor | None = None,
                start_block: int = 0) -> torch.Tensor:
        """Class logits [B, C]; `hidden` resumes from cached states after `start_block` frozen blocks."""
        return self.readout.logits(self.model, input_ids, lengths, hidden, start_block)

    def _logits(self, batch: dict) -> torch.Tensor:
        trainer = self.trainer
        # Validation passes are marked apart: the profile's step table is of training steps only.
        phase = "step" if self.training else "eval"
        with trainer.profiler.profile(f"{phase}: prefix cache"):  # built on a split's first batch, then looked up
            cache = self.caches.get(batch["split"], self.model, self.readout, self.hparams.drop_rate, self.data,
                                    self.cache_precision, self.device, self.show_progress)
        if cache is None:
            with trainer.profiler.profile(f"{phase}: forward"):
                return self(batch["input_ids"], batch["lengths"])
        with trainer.profiler.profile(f"{phase}: cache gather"):
            hidden = cache.gather(batch["index"], batch["input_ids"].shape[1], self.device,
                                  self.model.pos_emb.weight.dtype)
        with trainer.profiler.profile(f"{phase}: forward"):
            return self(batch["input_ids"], batch["lengths"], hidden, cache.depth)

    # ---------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch)
        with self.trainer.profiler.profile("step: loss"):
            loss = F.cross_entropy(logits.float(), batch["labels"])
        with self.trainer.profiler.profile("step: metrics and logging"):
            # Plain tensors, not a metric object (whose per-step forward copies its state): Lightning's epoch value
            # is their batch-size-weighted mean, the epoch's exact accuracy and mean loss, summed over ranks.
            acc = (logits.detach().argmax(-1) == batch["labels"]).float().mean()
            self.log_dict({"train/loss": loss, "train/acc": acc}, on_step=True, on_epoch=True, prog_bar=True,
                          batch_size=len(logits), sync_dist=True)
        return loss

    def _record(self, logits: torch.Tensor, labels: torch.Tensor, name: str, split: str, last: bool) -> None:
        """One batch of `split`'s scores into the loss, metrics (logged as `name/...`) and outputs of its pass.
        The metric objects are logged at the loader's last batch only (Lightning computes them over the pass):
        logged at every step, Lightning moved each one at every call, walking AUROC's list states that grow with
        the pass, so that a pass cost the square of its batches."""
        loss = F.cross_entropy(logits, labels)
        self.losses[name].update(loss, weight=len(logits))
        self.log(f"{name}/loss", self.losses[name], on_epoch=True, batch_size=len(logits), add_dataloader_idx=False)
        metrics = self.metrics[f"{name}_metrics"]
        metrics.update(logits, labels)
        if last:
            self.log_dict(metrics, on_epoch=True, add_dataloader_idx=False)
        outputs = self.outputs.setdefault(split, {"logits": [], "labels": []})
        outputs["logits"].append(logits.detach().cpu())
        outputs["labels"].append(labels.cpu())

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        counts = self.trainer.num_sanity_val_batches if self.trainer.sanity_checking else self.trainer.num_val_batches
        last = batch_idx + 1 >= counts[dataloader_idx]
        self._record(self._logits(batch).float(), batch["labels"], "val", batch["split"], last)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Scores `batch["split"]`, and with the same scores every split that holds the same rows (no loader of its
        own: `PreparedData.scored_with`)."""
        split, logits = batch["split"], self._logits(batch).float()
        last = batch_idx + 1 >= self.trainer.num_test_batches[dataloader_idx]
        for each in (split, *self._same_rows_as(split)):
            self._record(logits, batch["labels"], each if each in ("test", NATURAL) else f"best_{each}", each, last)

    def _same_rows_as(self, split: str) -> list[str]:
        scored_with = self.data.scored_with if self.data is not None else {}
        return [other for other, source in scored_with.items() if source == split]

    def on_validation_epoch_start(self) -> None:
        self.outputs = {}

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        """The decision for these weights, chosen on the validation split (every rank's shard): saved with them."""
        outputs = gathered(self.outputs, self.trainer.world_size).get("val")
        if outputs is not None and not self.trainer.sanity_checking:
            self.decision = choose_decision(self.decision, torch.cat(outputs["logits"]), torch.cat(outputs["labels"]),
                                            self.hparams.calibrate)

    def on_test_epoch_end(self) -> None:
        """Every evaluated split at the operating point of the tested checkpoint (natural: also at the file's rate)."""
        prevalence = (self.data.class_shares if self.data else {}).get(self.decision.positive_label)
        self.evaluated = {}
        for split, o in gathered(self.outputs, self.trainer.world_size).items():
            probs, labels = probabilities(torch.cat(o["logits"]), self.decision.temperature), torch.cat(o["labels"])
            point = operating_point(probs, labels, self.decision, prevalence if split == NATURAL else None)
            self.evaluated[split] = Evaluated(probs, labels, point)
            prefix = {"train": "best_train", "val": "best_val"}.get(split, split)
            for key in POINT_SCALARS:
                if isinstance(point.get(key), float) and math.isfinite(point[key]):
                    self.log(f"{prefix}/{key}", point[key], add_dataloader_idx=False)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, (p for p in self.parameters() if p.requires_grad))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_scheduler(self.scheduler_factory, optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The decision chosen for these weights goes with them. Frozen pretrained weights are not copied: only
        the trainable tensors plus the base file's identity (source, sha256); loading rebuilds the base."""
        checkpoint["decision"] = self.decision.as_dict()
        if self.hparams.weights != "pretrained":
            return
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["base_weights"] = dict(self.model.source)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.decision = load_decision(checkpoint)
        if checkpoint.get("base_weights") is not None:
            check_base_weights(checkpoint, self.model)
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
            self.caches.close()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> SpamClassifier:
        """A checkpoint to evaluate again (train=false), never unpickling code (weights_only), with one-line errors."""
        with checkpoint_errors(path):
            return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class DataHandOver(L.Callback):
    """Gives the module its data (`SpamClassifier.use_data`) once the Trainer has set the datamodule up: Lightning
    runs a datamodule's `setup` before its callbacks' and the module's. `precision` is the run's Lightning precision
    (`spamclf.precision.resolve(...).lightning`); the cache build draws a progress bar where the run draws one."""

    def __init__(self, datamodule, precision: str):
        self.datamodule, self.precision = datamodule, precision

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        pl_module.use_data(self.datamodule.prepared(), self.precision, show_progress)
