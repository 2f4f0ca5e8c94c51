"""What this machine runs natively, asked in one place: bf16 on the CPU or GPU, and the precision that
`trainer.precision=auto`, `Classifier.load(precision="auto")` and the command lines' `--precision` pick.

Why it matters: on CPUs with AMX or AVX512-BF16 a bf16 matmul runs ~2.5-5x faster than fp32; on CPUs
with only AVX2 (most laptops, many cloud machines) PyTorch emulates it ~100-250x slower than fp32, and
oneDNN's bf16 kernels are missing altogether. `SPAMCLF_NATIVE_BF16=0` makes this module answer "no native
bf16" on any CPU (`=1`: "yes"), so one machine can exercise both paths.

Nothing else in the package probes the hardware or reads precision names; `spamclf.kernels` asks here
whether its oneDNN kernels may run.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import cache, lru_cache

import torch

from spamclf.classifier import PRECISION_CHOICES as CHOICES
from spamclf.errors import InvalidOption, SpamclfError

log = logging.getLogger(__name__)

NATIVE_BF16_ENV = "SPAMCLF_NATIVE_BF16"
# /proc/cpuinfo flags of x86 CPUs that multiply bf16 in hardware; aarch64 lists "bf16" among its features.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


# ------------------------------------------------------------------------------------------------ CPU
@dataclass(frozen=True)
class CPU:
    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, …
    bf16_flag: str | None  # the CPU flag that names native bf16 arithmetic (amx_bf16, avx512_bf16, bf16)
    onednn_bf16: bool  # oneDNN's bf16 kernels exist on this CPU (private check, see _onednn_bf16_supported)


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The first processor's model name and flags in /proc/cpuinfo; read once."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (x86: amx_int8, avx512_vnni, avx2, ...; aarch64: asimddp,
    bf16, ...); empty where /proc/cpuinfo cannot be read."""
    return _cpuinfo()[1]


@lru_cache(maxsize=1)
def cpu() -> CPU:
    """What the processor is and can do; read once."""
    model, flags = _cpuinfo()
    return CPU(model=model, capability=torch.backends.cpu.get_cpu_capability(),
               bf16_flag=next((f for f in BF16_CPU_FLAGS if f in flags), None), onednn_bf16=_onednn_bf16_supported())


def _onednn_bf16_supported() -> bool:
    """oneDNN's own answer. A private op of torch (`torch.ops.mkldnn._is_mkldnn_bf16_supported`, written against
    torch 2.13.0; torch's own tests ask it the same way, pytorch/pytorch#136290, and torch has no public
    equivalent): absent in some builds, and then the answer is no. tests/test_precision.py fails loudly if it
    vanishes from a build that has oneDNN."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not torch.backends.mkldnn.is_available() or check is None:
        return False
    try:
        return bool(check())
    except (RuntimeError, AttributeError):
        return False


def forced_native_bf16() -> bool | None:
    """SPAMCLF_NATIVE_BF16: 0 → False, 1 → True, unset → None (detect)."""
    value = os.environ.get(NATIVE_BF16_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SpamclfError(f"environment variable {NATIVE_BF16_ENV}={value!r} is not valid; set it to 0 or 1, or unset it")


def cpu_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware, fast? Both the CPU's flags and oneDNN must say so: oneDNN
    runs bf16 on plain AVX-512 too, but emulated, and a capped oneDNN (DNNL_MAX_CPU_ISA) runs none."""
    forced = forced_native_bf16()
    if forced is not None:
        return forced
    info = cpu()
    return info.bf16_flag is not None and info.onednn_bf16


def cpu_bf16_summary() -> str:
    """Why the CPU does or does not count as running bf16 natively, e.g. "this CPU (AVX2) has no native bf16"."""
    forced = forced_native_bf16()
    if forced is not None:
        return f"{NATIVE_BF16_ENV}={int(forced)} says this CPU {'has' if forced else 'has no'} native bf16"
    info = cpu()
    if cpu_native_bf16():
        return f"this CPU ({info.capability}, {info.bf16_flag}) multiplies bf16 natively"
    return f"this CPU ({info.capability}) has no native bf16"


# ----------------------------------------------------------------------------------------- precision
_LIGHTNING = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
_LIGHTNING_NAMES = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
                    "transformer-engine", "transformer-engine-float16")


def dtype_of(lightning: str | int) -> torch.dtype | None:
    """The dtype a Lightning precision computes matmuls in: bf16, fp16, or None for fp32 (and fp64)."""
    name = str(lightning)
    if "bf16" in name:
        return torch.bfloat16
    if name.startswith("16") or name.endswith("float16"):
        return torch.float16
    return None


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what the Trainer gets (`lightning`), what inference autocasts to (`dtype`), and why."""

    requested: str
    lightning: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return dtype_of(self.lightning)

    @property
    def name(self) -> str:
        """bf16, fp16 or fp32 (for logs and /info)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def as_dict(self) -> dict:
        return {"requested": self.requested, "used": self.lightning, "reason": self.reason}


def device_kind(device) -> str:
    """cpu, cuda or mps: where a torch device or Lightning's `accelerator` (auto, cpu, gpu, cuda, mps) runs."""
    name = device.type if isinstance(device, torch.device) else str(device).lower().split(":")[0]
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def resolve(requested, device="cpu") -> Precision:
    """The one place precision names are read. `requested`: auto, bf16, fp16, fp32 or any Lightning precision;
    `device`: a torch device or Lightning accelerator name.

    auto: bf16 where the hardware runs it natively (CPUs with AMX/AVX512-BF16, GPUs from Ampere on), fp16 on
    GPUs without bf16, fp32 on other CPUs and on MPS. An explicit bf16 on a CPU without native bf16 still runs,
    after a warning (it is ~100x slower there)."""
    requested = str(requested)
    if requested not in CHOICES and requested not in _LIGHTNING_NAMES:
        raise InvalidOption("precision", requested, "one of " + ", ".join(CHOICES) + " (or a Lightning precision)")
    kind = device_kind(device)
    if requested != "auto":
        choice = Precision(requested, _LIGHTNING.get(requested, requested), "set explicitly")
        if kind == "cpu" and choice.dtype == torch.bfloat16 and not cpu_native_bf16():
            _warn_once(f"precision {requested}: {cpu_bf16_summary()}, so bf16 matmuls are emulated, ~100x slower than "
                       f"fp32; use precision auto (trainer.precision=auto)")
        return choice
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            choice = Precision(requested, "bf16-mixed", f"this GPU ({torch.cuda.get_device_name()}) supports bf16")
        else:
            choice = Precision(requested, "16-mixed", "this GPU has no bf16")
    elif kind == "mps":
        choice = Precision(requested, "32-true", "MPS: mixed precision is not validated there")
    else:
        choice = Precision(requested, "bf16-mixed" if cpu_native_bf16() else "32-true", cpu_bf16_summary())
    log.info("precision auto -> %s: %s", choice.lightning, choice.reason)
    return choice


@cache
def _warn_once(message: str) -> None:
    log.warning(message)


# ------------------------------------------------------------------------------------- measurements
def matmul_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Measured GFLOP/s of a size×size matmul in `dtype` on the CPU (for the benchmark's header)."""
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    start = time.perf_counter()
    a @ b  # warm-up; on CPUs without native bf16 one call can take a second
    first = time.perf_counter() - start
    runs, start = 0, time.perf_counter()
    while runs == 0 or (time.perf_counter() - start < seconds and first < seconds):
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9
