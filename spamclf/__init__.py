"""spamclf: fine-tune GPT-2 into a text classifier with Lightning and Hydra.

`spamclf.load(path)` opens a trained classifier for prediction. Importing the package imports nothing else: the
backend a file needs (torch for a checkpoint, ONNX Runtime for an exported graph) is imported when it is loaded.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

__version__ = "0.1.0"

BACKENDS = {".ckpt": ("spamclf.inference", "Classifier", "a checkpoint"),
            ".onnx": ("spamclf.onnx_classifier", "OnnxClassifier", "an ONNX graph")}


def _backend(path: str | os.PathLike) -> tuple[type, str]:
    """The classifier class for `path`'s suffix and what to call such a file, imported only now."""
    from importlib import import_module

    from spamclf.errors import SpamclfError

    suffix = Path(path).suffix.lower()
    if suffix not in BACKENDS:
        raise SpamclfError(f"{path}: not a model file spamclf reads; pass a .ckpt that train.py wrote or a .onnx "
                           f"that `python -m spamclf.export --format onnx` wrote")
    module, name, kind = BACKENDS[suffix]
    try:
        return getattr(import_module(module), name), kind
    except ImportError as e:
        if suffix == ".onnx":
            raise SpamclfError(f"{e.name} is not installed; pip install 'spamclf[onnx]'") from None
        raise


def load(path: str | os.PathLike, **options):
    """The classifier in `path`: `spamclf.inference.Classifier` (torch) for a .ckpt written by train.py — options
    `device` ("cpu", "cuda", ...), `precision` (auto, bf16, fp16, fp32) and `threads` — or
    `spamclf.onnx_classifier.OnnxClassifier` (ONNX Runtime, no torch) for a .onnx written by
    `python -m spamclf.export --format onnx` — option `threads` (0: the backend's own choice). Both have the same
    `predict`, `info`, `label_names`.
    """
    from spamclf.errors import SpamclfError

    backend, kind = _backend(path)
    accepted = [name for name in inspect.signature(backend.load).parameters if name not in ("cls", "path")]
    for name in options:
        if name not in accepted:
            raise SpamclfError(f"{name}= is not an option for {kind} ({path}); it takes "
                               f"{', '.join(accepted) or 'none'}: drop {name}")
    return backend.load(path, **options)
