"""Which engine classifies, chosen from the command line without importing the other: the torch `Classifier`
over a checkpoint (`--ckpt`), or ONNX Runtime's `OnnxClassifier` over an exported graph (`--onnx`, no torch
imported). `spamclf.predict` and `spamclf.serve` load through here."""

from __future__ import annotations

import argparse

from spamclf.errors import SpamclfError
from spamclf.precision_names import CHOICES


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--ckpt or --onnx (one of them), --precision and --device (checkpoints only)."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint written by train.py (runs with torch)")
    model.add_argument("--onnx", help="model.onnx written by `python -m spamclf.export --format onnx` (runs with ONNX Runtime, no torch)")
    parser.add_argument("--precision", choices=CHOICES, default=None,
                        help="--ckpt only. auto (the default): bf16 where the CPU (AMX, AVX512-BF16) or GPU runs it natively, "
                             "else fp32 (fp16 on GPUs without bf16)")
    parser.add_argument("--device", default=None, help="--ckpt only: cpu (the default), cuda, cuda:1, mps")


def load_engine(args: argparse.Namespace):
    """The classifier the flags name: `Classifier` for --ckpt, `OnnxClassifier` for --onnx."""
    if args.onnx is not None:
        for flag, value in (("--precision", args.precision), ("--device", args.device)):
            if value is not None:
                raise SpamclfError(f"{flag} applies to --ckpt only; an ONNX graph runs on the CPU at the precision it was "
                                   f"exported at: drop {flag}")
        try:
            from spamclf.onnx_classifier import OnnxClassifier
        except ImportError as e:
            raise SpamclfError(f"{e.name} is not installed; pip install 'spamclf[onnx]'") from None
        return OnnxClassifier.load(args.onnx)
    from spamclf.inference import Classifier

    return Classifier.load(args.ckpt, device=args.device or "cpu", precision=args.precision or "auto")
