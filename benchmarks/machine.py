"""The machine the benchmark ran on, as the report's header states it; what the CPU is and runs comes from
spamclf.precision, the package's one place that probes the hardware."""

from __future__ import annotations

import os

# The int8 GEMM kernel families ONNX Runtime's MLAS dispatches to, as (CPU flag, name), in the order it checks them.
INT8_KERNELS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                ("avx512bw", "AVX512BW (no VNNI)"), ("avx2", "AVX2 (no VNNI)"), ("asimddp", "ARM dot product"))


def int8_kernel() -> str:
    """The int8 GEMM kernel family ONNX Runtime's MLAS dispatches to on this CPU."""
    from spamclf.precision import cpu_flags

    flags = cpu_flags()
    return next((name for flag, name in INT8_KERNELS if flag in flags), "generic (no AVX2)")


def cpu_header() -> str:
    """The CPU as the precision choice sees it, and its measured matmul rates."""
    import torch

    from spamclf.precision import cpu, cpu_bf16_summary, matmul_gflops, resolve

    info = cpu()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return (f"CPU: {info.model}; torch capability {info.capability}; {cpu_bf16_summary()}; "
            f"1024² matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s ({bf16 / fp32:.2f}x); "
            f"precision auto -> {resolve('auto', 'cpu').lightning}")


def setting(args, onnx: bool) -> dict:
    """What the report's header names besides the results: the run's settings, the CPU, torch (and ONNX Runtime
    when an ONNX engine ran)."""
    import torch

    from spamclf.precision import cpu

    facts = {"model": args.model, "epochs": args.epochs, "cpu": cpu().model, "cores": os.cpu_count(),
             "torch": torch.__version__, "cpu_header": cpu_header()}
    if onnx:
        import onnxruntime

        facts.update(onnxruntime=onnxruntime.__version__, int8_kernel=int8_kernel())
    return facts
