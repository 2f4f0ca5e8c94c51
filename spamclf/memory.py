"""Giving freed memory back: glibc keeps the freed parts of a fragmented heap for reuse, so a process that has
dropped something large (activations, a model it only read for its card) still holds it until asked. Plain
Python: the torch side (prediction, the prefix cache) and the ONNX side (the server's /info) both call it."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hand the freed heap back to the OS (a no-op where the C library is not glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
