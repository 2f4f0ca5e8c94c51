"""The model the prediction and serve cases load: a checkpoint of random weights, and its ONNX exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def checkpoint_and_messages(args, tmp: Path) -> list[str]:
    """A checkpoint of `args.model` (random weights, one training step, pooling=last_nonpad) at tmp/model.ckpt,
    and the SMS collection's messages."""
    import lightning as L

    from spamclf.datamodule import SpamDataModule
    from spamclf.module import SpamClassifier
    from spamclf.reading import SMS_FILE, read_labelled_file
    from spamclf.tokenizer import asset_path

    L.seed_everything(123)
    dm = SpamDataModule(padding="batch", bucket=True, natural=False)
    clf = SpamClassifier(args.model, weights="random", pooling="last_nonpad", prefix_cache=False)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(clf, datamodule=dm)
    trainer.save_checkpoint(tmp / "model.ckpt")
    return read_labelled_file(asset_path(SMS_FILE))["text"].tolist()


def export_graph(tmp: Path, quantize: bool) -> Path:
    """The checkpoint at tmp/model.ckpt exported to ONNX (fp32, or int8 weights) at tmp/<kind>/model.onnx."""
    out = tmp / ("int8" if quantize else "fp32")
    command = [sys.executable, "-m", "spamclf.export", "--ckpt", str(tmp / "model.ckpt"), "--out", str(out),
               "--format", "onnx", *(["--quantize", "int8"] if quantize else [])]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: export failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out / "model.onnx"


def model_flags(args, tmp: Path, engine: str) -> list[str]:
    """predict/serve flags for an engine: torch at a precision ("torch:fp32", "torch:auto") or
    "onnx:fp32"/"onnx:int8"."""
    kind, what = engine.split(":")
    if kind == "onnx":
        return ["--onnx", str(export_graph(tmp, what == "int8"))]
    return ["--ckpt", str(tmp / "model.ckpt"), "--precision", what,
            "--device", "cuda" if args.accelerator == "gpu" else "cpu"]
