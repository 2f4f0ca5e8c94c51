"""A trained classifier, ready to classify: `Classifier.load(ckpt).predict(texts)`.

Built from a checkpoint with torch alone (GPT-2, the head, the stored tensors and the base weights' identity):
importing this module imports no Lightning, Hydra or torchmetrics. It owns everything prediction needs to
repeat from training — tokenization and truncation, the padding rule, packed token-budget batches, precision
and the CPU kernels, temperature and threshold — and the CLI, the server, the benchmark and the exports use
it and nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from spamclf.answers import answer
from spamclf.decision import Decision, Prediction, load_decision
from spamclf.errors import CheckpointError, SpamclfError
from spamclf.gpt2 import GPT2
from spamclf.heads import Readout, classifier_network
from spamclf.io import file_sha256
from spamclf.kernels import onednn_bf16_inference
from spamclf.memory import release_freed_memory
from spamclf.packing import packed_prefix
from spamclf.precision import Precision, resolve

log = logging.getLogger(__name__)
NETWORK_KEYS = ("model_name", "weights", "weights_path", "trainable_layers", "lora_rank", "lora_alpha", "drop_rate", "causal")


@contextmanager
def checkpoint_errors(path: str | os.PathLike) -> Iterator[None]:
    """Whatever is wrong inside a checkpoint file, the user's fix is the same: one line that says so."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass the .ckpt a training run wrote (its checkpoints/ folder)")
    try:
        yield
    except SpamclfError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable spamclf checkpoint ({type(e).__name__}); pass a .ckpt written by train.py") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's contents, never unpickling code (weights_only)."""
    with checkpoint_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_base_weights(checkpoint: dict, model: GPT2) -> None:
    """A slim checkpoint (trainable tensors only) must sit on the very base weights it was trained on."""
    base, ours = checkpoint.get("base_weights"), model.source or {}
    if base is not None and base.get("sha256") != ours.get("sha256"):
        raise CheckpointError(
            f"checkpoint was trained on base weights {base.get('source')} (sha256 {base.get('sha256', '?')[:12]}…) but "
            f"{ours.get('file')} has sha256 {ours.get('sha256', '?')[:12]}…; point model.weights_path at the original file"
        )


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).softmax(-1)


def _network(checkpoint: dict) -> GPT2:
    """GPT-2 and its head as the checkpoint's run built them, with the stored tensors loaded."""
    hparams = checkpoint["hyper_parameters"]
    settings = {k: hparams[k] for k in NETWORK_KEYS if k in hparams}
    model = classifier_network(num_classes=len(hparams["label_names"]), init=False, **settings)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if checkpoint.get("base_weights") is not None:  # slim: the base comes from its file, the trained tensors from here
        check_base_weights(checkpoint, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(p.requires_grad for n, p in model.named_parameters() if n in missing):
            raise CheckpointError(f"the checkpoint's tensors do not fit {hparams['model_name']} "
                                  f"({(unexpected or missing)[0]}); pass a .ckpt written by train.py")
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class Classifier:
    """A trained model that classifies raw texts. `Classifier.load(path)` reads a checkpoint written by train.py."""

    def __init__(self, model: GPT2, readout: Readout, decision: Decision, tokenization: dict, precision: Precision,
                 device: torch.device, about: dict | None = None):
        self.model, self.readout, self.decision = model.to(device).eval(), readout, decision
        self.tokenization, self.precision, self.device, self.about = dict(tokenization), precision, device, about or {}
        self.pad_length: int | None = self.tokenization.get("pad_length")
        self.width = self.pad_length or self.tokenization.get("context_length") or model.cfg.context_length

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "auto") -> Classifier:
        """`precision`: auto (bf16 where the CPU or GPU runs it natively, else fp32), bf16, fp16 or fp32."""
        checkpoint = read_checkpoint(path)
        with checkpoint_errors(path):
            hparams = checkpoint["hyper_parameters"]
            model = _network(checkpoint)
            readout = Readout(hparams.get("pooling", "last"), hparams.get("pooled_only", True), hparams.get("causal", True))
            decision = load_decision(checkpoint)
        device = torch.device(device)
        about = {"checkpoint": str(Path(path).resolve()), "model_name": hparams.get("model_name"),
                 "weights": hparams.get("weights")}
        return cls(model, readout, decision, hparams.get("tokenization") or {}, resolve(precision, device), device, about)

    @property
    def label_names(self) -> list[str]:
        return list(self.decision.label_names)

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] (before temperature) of right-padded ids [B, T] with `lengths` real tokens."""
        return self.readout.logits(self.model, input_ids, lengths)

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_tokens: int = 2048,
                progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """One Prediction per text, in order. Texts longer than the training width (or the context) are cut to it,
        keeping their beginning, and marked `truncated`; an empty text is a lone <|endoftext|>. Identical texts are
        classified once. `progress(n)`: n more distinct texts done.

        A message's probability does not depend on what it is batched with: fixed padding pads every message
        alike, per-batch padding is only used with poolings that never read padding, and with pooling=last and
        per-batch padding messages are batched only with others of the same length."""
        return answer(texts, self.width, self.decision, lambda ids: self._probabilities(ids, batch_tokens, progress))

    def _probabilities(self, ids: list[list[int]], batch_tokens: int, progress) -> list[list[float]]:
        stored = [self.pad_length or len(row) for row in ids]
        depth = self.readout.prefix_depth(self.model.cfg.n_layers)
        one_width = self.pad_length is None and self.readout.pooling == "last"
        dtype = self.precision.dtype
        probs: list[list[float]] = [[]] * len(ids)
        with (torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
              onednn_bf16_inference(self.model, keep=True)):  # the weights never change: prepacked once, kept
            for batch in packed_prefix(self.model, ids, stored, depth, self.readout.use_mask, self.pad_length,
                                       device=self.device, tokens_per_batch=batch_tokens, one_width=one_width):
                logits = self.readout.logits(self.model, batch.input_ids.to(self.device), batch.lengths.to(self.device),
                                             batch.grid(), depth)
                for i, p in zip(batch.rows, probabilities(logits, self.decision.temperature).cpu().tolist()):
                    probs[i] = p
                if progress is not None:
                    progress(len(batch.rows))
        if sum(stored) > batch_tokens:
            # Many batches leave glibc holding a fragmented heap (memory would creep up per chunk); one batch (a
            # server's) is not trimmed: the next call reuses it, where a trim would fault it in again (~10 ms).
            release_freed_memory()
        return probs

    def info(self) -> dict:
        """What the server's /info shows: the model, labels, padding rule, decision, precision, checkpoint sha256."""
        if "sha256" not in self.about and self.about.get("checkpoint"):
            self.about["sha256"] = file_sha256(self.about["checkpoint"])
        return {**self.about, "pooling": self.readout.pooling, "label_names": self.label_names,
                "padding": {k: self.tokenization.get(k) for k in ("padding", "pad_length", "context_length")},
                "decision": self.decision.as_dict(),
                "precision": {"requested": self.precision.requested, "used": self.precision.name, "reason": self.precision.reason}}
