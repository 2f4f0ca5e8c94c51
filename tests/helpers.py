"""Small random GPT-2 checkpoints in the Hugging Face files' exact layouts (no network needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def hf_gpt2(seed: int = 0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 50257, **config})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so a mis-mapped key cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def save_prefixed(model, folder: Path) -> Path:
    """`save_pretrained`: keys carry the `transformer.` prefix."""
    model.save_pretrained(folder)
    return folder


def save_hub_layout(model, folder: Path) -> Path:
    """The layout of openai-community/gpt2's model.safetensors: no prefix, no lm_head (tied), and the
    per-layer causal-mask buffers `h.N.attn.bias` (older files: `h.N.attn.masked_bias`)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions, dtype=torch.uint8)).view(1, 1, cfg.n_positions, cfg.n_positions)
    for i in range(cfg.n_layer):
        state[f"h.{i}.attn.bias"] = mask.clone()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


def populate_hub_cache(cache_dir: Path, repo: str, files_from: Path, commit: str = "0" * 40) -> None:
    """Lay files out as huggingface_hub's cache does: blobs named by sha256, snapshot symlinks, refs/main."""
    root = cache_dir / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for file in ("model.safetensors", "config.json"):
        digest = hashlib.sha256((files_from / file).read_bytes()).hexdigest()
        shutil.copy(files_from / file, root / "blobs" / digest)
        (root / "snapshots" / commit / file).symlink_to(Path("../../blobs") / digest)


class DieAt:
    """A Lightning callback that kills the process mid-epoch, as a pre-emption or OOM kill would."""

    def __new__(cls, epoch: int, batch: int):
        import os

        import lightning as L

        class _DieAt(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch_data, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    os._exit(3)

        return _DieAt()


class SigtermAt:
    """A Lightning callback that sends this process SIGTERM mid-epoch, as SLURM does before preempting a job."""

    def __new__(cls, epoch: int, batch: int):
        import os
        import signal

        import lightning as L

        class _SigtermAt(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch_data, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    os.kill(os.getpid(), signal.SIGTERM)

        return _SigtermAt()


def classifier_of(module, tokenization: dict, precision: str = "fp32"):
    """The inference object for an in-memory SpamClassifier (what Classifier.load builds from its checkpoint)."""
    from spamclf.inference import Classifier
    from spamclf.precision import resolve

    return Classifier(module.model, module.readout, module.decision, tokenization, resolve(precision), torch.device("cpu"))
