"""A training case's floor: the least time this machine could take for the case's work at its own measured rates
(benchmarks.rates), as the report sets it beside the measured wall time."""

from __future__ import annotations

from benchmarks.flops import training_work

# AdamW per trainable parameter and step, fp32: param, grad, exp_avg, exp_avg_sq read, all but grad written.
ADAMW_BYTES = 16 + 12
FLOOR_NOTE = ("floor: a bare `import torch` start-up + every GEMM FLOP (weights only: prefix cache, training "
              "steps, evaluation) at the measured [tokens, D] x [D, 4D] rate in the case's precision + AdamW's "
              f"{ADAMW_BYTES} bytes per trainable parameter and step at the measured copy bandwidth; nothing for "
              "attention scores, element-wise ops, data loading or Python")


def matmul_rate(rates: dict, precision: str) -> float:
    """The measured GEMM rate (FLOP/s) for a Lightning precision name: fp32 for 32-true, else the 16-bit one."""
    return rates["matmul_flops"]["fp32" if precision.startswith("32") else "bf16"]


def floor(r: dict, rates: dict, trials: int = 1) -> dict[str, float]:
    """{part: seconds} of the case's floor and its `total`; `trials` runs of it in one process share the start-up
    and the prefix cache (the least a sweep must repeat)."""
    work, summary = training_work(r), r["summary"]
    rate = matmul_rate(rates, summary.get("precision", {}).get("used", "32-true"))
    adamw = work["steps"] * ADAMW_BYTES * summary["trainable_parameters"] / rates["copy_bytes_per_s"]
    parts = {"start-up": rates["startup_s"], "prefix cache": work["prefix"] / rate,
             "steps": trials * (work["train"] / rate + adamw),
             "evaluation": trials * (work["fit_eval"] + work["final_eval"]) / rate}
    return {**parts, "total": sum(parts.values())}
