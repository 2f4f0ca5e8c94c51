"""This machine's own speed limits, measured once per benchmark run for the training cases' floors: the matmul
rate at a training batch's shapes in bf16 and fp32, the memory copy bandwidth, and a bare `import torch`."""

from __future__ import annotations

import subprocess
import sys
import time

GEMM_TOKENS = 512  # rows of the measured GEMM: a training batch of 8 messages of 64 positions
COPY_BYTES = 256 * 1024**2  # well beyond the caches, as the optimizer's state is


def _timed(work, device, budget_s: float = 0.4) -> float:
    """The fastest of repeated calls of `work` within about `budget_s` (at least two, the first a warm-up)."""
    import torch

    best, spent = float("inf"), 0.0
    for attempt in range(50):
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        best, spent = (min(best, took) if attempt else best), spent + took
        if attempt and spent > budget_s:
            break
    return best


def matmul_rate(emb_dim: int, dtype, device) -> float:
    """FLOP/s of a [tokens, D] x [D, 4D] product, the feed-forward's first GEMM."""
    import torch

    a = torch.randn(GEMM_TOKENS, emb_dim, device=device).to(dtype)
    b = torch.randn(emb_dim, 4 * emb_dim, device=device).to(dtype)
    return 2 * GEMM_TOKENS * emb_dim * 4 * emb_dim / _timed(lambda: torch.mm(a, b), device)


def copy_bandwidth(device) -> float:
    """Bytes/s read plus written by a large tensor copy."""
    import torch

    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _timed(lambda: dst.copy_(src), device)


def startup_seconds(tries: int = 2) -> float:
    """The fastest of `tries` bare `python -c "import torch"` processes, start to exit."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def measure(emb_dim: int, accelerator: str) -> dict:
    """The rates the floors use, on the device the cases trained on."""
    import torch

    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    return {"gemm_tokens": GEMM_TOKENS, "emb_dim": emb_dim, "startup_s": startup_seconds(),
            "matmul_flops": {"bf16": matmul_rate(emb_dim, torch.bfloat16, device),
                             "fp32": matmul_rate(emb_dim, torch.float32, device)},
            "copy_bytes_per_s": copy_bandwidth(device)}
