"""What this machine runs natively, asked in one place: bf16 on the CPU or GPU, the precision that
`trainer.precision=auto` and `predict --precision auto` pick, and the oneDNN kernels for frozen bf16
layers on CPUs that have them, with plain PyTorch wherever they are absent.

Why it matters: on CPUs with AMX or AVX512-BF16 a bf16 matmul runs ~2.5-5x faster than fp32; on CPUs
with only AVX2 (most laptops, many cloud machines) PyTorch emulates it ~100-250x slower than fp32, and
oneDNN's bf16 kernels are missing altogether. `SPAMCLF_NATIVE_BF16=0` makes this module answer "no native
bf16" on any CPU (`=1`: "yes"), so one machine can exercise both paths.

Nothing else in the package probes the hardware.
"""

from __future__ import annotations

import logging
import os
import platform
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from spamclf.errors import InvalidOption, SpamclfError

log = logging.getLogger(__name__)

NATIVE_BF16_ENV = "SPAMCLF_NATIVE_BF16"
# /proc/cpuinfo flags of x86 CPUs that multiply bf16 in hardware; aarch64 lists "bf16" among its features.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
PREDICT_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# ------------------------------------------------------------------------------------------------ CPU
@dataclass(frozen=True)
class CPU:
    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, …
    bf16_flag: str | None  # the CPU flag that names native bf16 arithmetic (amx_bf16, avx512_bf16, bf16)
    onednn_bf16: bool  # oneDNN's bf16 kernels exist on this CPU (private check, see _onednn_bf16_supported)


@lru_cache(maxsize=1)
def cpu() -> CPU:
    """What the processor is and can do; read once."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        pass
    return CPU(model=model, capability=torch.backends.cpu.get_cpu_capability(),
               bf16_flag=next((f for f in BF16_CPU_FLAGS if f in flags), None), onednn_bf16=_onednn_bf16_supported())


def _onednn_bf16_supported() -> bool:
    """oneDNN's own answer, through a private op (absent in some builds: then no)."""
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


def describe_cpu() -> str:
    """One line for logs and the benchmark: model, cores, torch's capability, native bf16 and why."""
    info = cpu()
    return f"{info.model}, {os.cpu_count()} cores; {cpu_bf16_summary()}"


# ----------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class PrecisionChoice:
    requested: str
    used: str
    reason: str

    def as_dict(self) -> dict:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def device_kind(accelerator) -> str:
    """cpu, cuda or mps: where Lightning's `accelerator` (auto, cpu, gpu, cuda, mps) will run."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def resolve_precision(requested, accelerator) -> PrecisionChoice:
    """Lightning's precision for `requested` ("auto" or any Lightning value) on `accelerator`.

    auto: bf16-mixed where the hardware runs bf16 natively (CPUs with AMX/AVX512-BF16, GPUs from
    Ampere on), 16-mixed on GPUs without bf16, 32-true on other CPUs and on MPS. An explicit bf16 on a
    CPU without native bf16 still runs, after a warning."""
    requested = str(requested)
    kind = device_kind(accelerator)
    if requested != "auto":
        if kind == "cpu" and requested in BF16_PRECISIONS and not cpu_native_bf16():
            _warn_once(f"trainer.precision={requested}: {cpu_bf16_summary()}, so bf16 matmuls are emulated, ~100x slower "
                       f"than 32-true; set trainer.precision=auto")
        return PrecisionChoice(requested, requested, "set explicitly")
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            choice = PrecisionChoice(requested, "bf16-mixed", f"this GPU ({torch.cuda.get_device_name()}) supports bf16")
        else:
            choice = PrecisionChoice(requested, "16-mixed", "this GPU has no bf16")
    elif kind == "mps":
        choice = PrecisionChoice(requested, "32-true", "MPS: mixed precision is not validated there")
    else:
        native = cpu_native_bf16()
        choice = PrecisionChoice(requested, "bf16-mixed" if native else "32-true", cpu_bf16_summary())
    log.info("precision auto -> %s: %s", choice.used, choice.reason)
    return choice


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for prediction (None: fp32). precision: auto, bf16, fp16 or fp32."""
    if precision not in PREDICT_PRECISIONS:
        raise InvalidOption("precision", precision, "one of " + ", ".join(PREDICT_PRECISIONS))
    if precision == "auto":
        kind = device.type
        used = resolve_precision("auto", {"cuda": "cuda", "mps": "mps"}.get(kind, "cpu")).used
        precision = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(used, "fp32")
    elif precision == "bf16" and device.type == "cpu" and not cpu_native_bf16():
        _warn_once(f"bf16 prediction: {cpu_bf16_summary()}, so it runs ~100x slower than fp32; use precision auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def inference_precision(precision: str, device: torch.device) -> str:
    """bf16, fp16 or fp32: what prediction at `precision` runs in on `device` (for logs and /info)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(inference_dtype(precision, device), "fp32")


@cache
def _warn_once(message: str) -> None:
    log.warning(message)


# ------------------------------------------------------------------- oneDNN for frozen bf16 layers (CPU)
# Under bf16 autocast a frozen linear layer casts its fp32 weight to bf16 at every call, and GELU is a
# second pass over the output. Where nothing needs gradients, oneDNN does better: bf16 weights laid out for
# the CPU's matrix units once (the same numbers, ~20% faster a layer), and tanh-GELU as a post-op on the
# fp32 accumulator (closer to fp32 than rounding in between). These are private ops
# (torch.ops.mkldnn._reorder_linear_weight, _linear_pointwise): used only where `onednn_kernels()` says
# they exist, else the plain nn.Linear path runs.
def onednn_kernels() -> bool:
    """oneDNN's bf16 linear kernels are present and this CPU runs bf16 natively."""
    ops = torch.ops.mkldnn
    return (cpu_native_bf16() and cpu().onednn_bf16 and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class OneDNNLinear(nn.Linear):
    """A frozen nn.Linear's stand-in (sharing its parameters) inside `onednn_bf16_inference`: one oneDNN
    call with prepacked bf16 weights, and tanh-GELU fused when `gelu`; plain F.linear whenever autocast is
    not bf16 on the CPU or gradients are needed."""

    def __init__(self, fc: nn.Linear, gelu: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = fc.in_features, fc.out_features
        self.weight, self.bias, self.gelu = fc.weight, fc.bias, gelu
        weight = fc.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2048)
        self.packed_bias = None if fc.bias is None else fc.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _cpu_bf16_autocast() and not (torch.is_grad_enabled() and x.requires_grad):
            post, algorithm = ("gelu", "tanh") if self.gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.packed_bias, post, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu else y


def _frozen_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and not any(
        p.requires_grad for p in module.parameters())


# Stand-ins kept between calls for models whose weights never change again (a server's): prepacking
# gpt2-small's weights takes ~60 ms, more than classifying one message.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stand_in(fc: nn.Linear, gelu: bool, keep: bool) -> OneDNNLinear:
    kept = _KEPT.get(fc) if keep else None
    if kept is not None and kept.gelu == gelu:
        return kept
    stand_in = OneDNNLinear(fc, gelu)
    if keep:
        _KEPT[fc] = stand_in
    return stand_in


@contextmanager
def onednn_bf16_inference(model, stop: int | None = None, keep: bool = False):
    """Inside: the frozen linear layers of `model.trf_blocks[:stop]` (a spamclf GPT2) run through
    OneDNNLinear, where autocast is bf16 on a CPU with native bf16 and oneDNN's kernels; elsewhere this
    changes nothing. The weights' bf16 copies (2 bytes a weight) live only inside, unless `keep`: then they
    are made once and reused by later calls, for a model whose frozen weights will not change."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)
    if onednn_kernels() and _cpu_bf16_autocast():
        try:
            for block in model.trf_blocks[:stop]:
                fc, act, _ = block.ff.layers
                fuse = _frozen_linear(fc) and isinstance(act, nn.GELU) and act.approximate == "tanh"
                for parent, name, gelu in ((block.att, "qkv", False), (block.att, "out_proj", False),
                                           (block.ff.layers, "0", fuse), (block.ff.layers, "2", False)):
                    original = parent._modules[name]
                    if _frozen_linear(original):
                        parent._modules[name] = _stand_in(original, gelu, keep)
                        swaps.append((parent, name, original))
                if fuse:
                    swaps.append((block.ff.layers, "1", act))
                    block.ff.layers._modules["1"] = nn.Identity()
        except RuntimeError as e:  # oneDNN refused after all: plain layers, said once
            _restore(swaps)
            swaps = []
            log.warning("oneDNN bf16 kernels unavailable (%s); using plain PyTorch layers", str(e).splitlines()[0])
    try:
        yield
    finally:
        _restore(swaps)


def _restore(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, original in reversed(swaps):
        parent._modules[name] = original


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
