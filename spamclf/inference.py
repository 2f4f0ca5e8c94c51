"""A trained classifier, ready to classify: `Classifier.load(ckpt).predict(texts)`.

Built from a checkpoint with torch alone (GPT-2, the head, the stored tensors and the base weights' identity):
importing this module imports no Lightning, Hydra or torchmetrics. What prediction repeats from training —
tokenization and truncation, the padding rule, batches, the decision — is `spamclf.classifier.TextClassifier`'s;
this backend adds the network's forward over packed batches, the precision and the CPU kernels.
`spamclf.load(path)` picks it for a .ckpt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from spamclf.classifier import TextClassifier
from spamclf.decision import Decision, load_decision
from spamclf.errors import CheckpointError, SpamclfError
from spamclf.gpt2 import GPT2
from spamclf.heads import Readout, classifier_network
from spamclf.io import file_sha256
from spamclf.kernels import onednn_bf16_inference
from spamclf.packing import grid_align, prefix_batch
from spamclf.precision import Precision, resolve

log = logging.getLogger(__name__)
NETWORK_KEYS = ("model_name", "weights", "weights_path", "trainable_layers", "lora_rank", "lora_alpha", "drop_rate",
                "causal")


@contextmanager
def checkpoint_errors(path: str | os.PathLike) -> Iterator[None]:
    """Whatever is wrong inside a checkpoint file, the user's fix is the same: one line that says so."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass the .ckpt a training run wrote "
                              "(its checkpoints/ folder)")
    try:
        yield
    except SpamclfError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable spamclf checkpoint ({type(e).__name__}); "
                              "pass a .ckpt written by train.py") from None


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
            f"{ours.get('file')} has sha256 {ours.get('sha256', '?')[:12]}…; "
            "point model.weights_path at the original file"
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
    return model.float().eval()  # a bf16 run stores its frozen linears in bf16 (heads.frozen_linears_to)


class Classifier(TextClassifier):
    """A trained model that classifies raw texts. `Classifier.load(path)` reads a checkpoint written by train.py."""

    def __init__(self, model: GPT2, readout: Readout, decision: Decision, tokenization: dict, precision: Precision,
                 device: torch.device, about: dict | None = None):
        self.model, self.readout, self.precision, self.device = model.to(device).eval(), readout, precision, device
        self.about = about or {}
        self.depth = readout.prefix_depth(model.cfg.n_layers)
        super().__init__(decision, tokenization, readout.pooling, model.cfg.context_length)
        self.align = grid_align(model, readout.use_mask, self.pad_length, self.one_width)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "auto",
             threads: int = 0) -> Classifier:
        """`precision`: auto (bf16 where the CPU or GPU runs it natively, else fp32), bf16, fp16 or fp32.
        `threads`: torch's intra-op threads in this process (0: torch's own choice, one per core)."""
        if threads:
            torch.set_num_threads(threads)
        checkpoint = read_checkpoint(path)
        with checkpoint_errors(path):
            hparams = checkpoint["hyper_parameters"]
            model = _network(checkpoint)
            readout = Readout(hparams.get("pooling", "last"), hparams.get("pooled_only", True),
                              hparams.get("causal", True))
            decision = load_decision(checkpoint, path)
        device = torch.device(device)
        about = {"checkpoint": str(Path(path).resolve()), "model_name": hparams.get("model_name"),
                 "weights": hparams.get("weights")}
        return cls(model, readout, decision, hparams.get("tokenization") or {}, resolve(precision, device), device,
                   about)

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] (before temperature) of right-padded ids [B, T] with `lengths` real tokens."""
        return self.readout.logits(self.model, input_ids, lengths)

    @contextmanager
    def _computing(self) -> Iterator[None]:
        dtype = self.precision.dtype
        with (torch.inference_mode(),
              torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
              onednn_bf16_inference(self.model, keep=True)):  # the weights never change: prepacked once, kept
            yield

    def forward(self, input_ids: list[list[int]], lengths: list[int]) -> list[list[float]]:
        """The frozen prefix over the batch's packed positions, then the rest of the network on its grid."""
        ids, real = torch.tensor(input_ids), torch.tensor(lengths)
        stored = torch.full_like(real, ids.shape[1]) if self.pad_length else real  # fixed padding is computed too
        batch = prefix_batch(self.model, ids, real, stored, self.depth, self.readout.use_mask, self.device)
        logits = self.readout.logits(self.model, ids.to(self.device), real.to(self.device), batch.grid(), self.depth)
        return probabilities(logits, self.decision.temperature).cpu().tolist()

    def _source_card(self) -> dict:
        if "sha256" not in self.about and self.about.get("checkpoint"):
            self.about["sha256"] = file_sha256(self.about["checkpoint"])
        return self.about
