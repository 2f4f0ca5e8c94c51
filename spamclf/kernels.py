"""oneDNN stand-ins for frozen linear layers during bf16 inference on the CPU (the prefix cache build, prediction).

Under bf16 autocast a frozen linear layer casts its fp32 weight to bf16 at every call, and GELU is a second pass
over the output. Where nothing needs gradients, oneDNN does better: bf16 weights laid out for the CPU's matrix
units once (the same numbers, ~20% faster a layer), and tanh-GELU as a post-op on the fp32 accumulator (closer
to fp32 than rounding in between). The layers to swap are the ones the model names (`TransformerBlock.linears`);
they are swapped with `setattr` and put back on the way out. Where `spamclf.precision` says the CPU lacks native
bf16, or oneDNN lacks the ops, or refuses them, the plain nn.Linear path runs.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from spamclf.precision import cpu, cpu_native_bf16

log = logging.getLogger(__name__)


def _onednn_ops():
    """oneDNN's prepacked-weight linear ops, or None. Private ops of torch (`torch.ops.mkldnn._reorder_linear_weight`,
    `_linear_pointwise`, written against torch 2.13.0): the ops the inductor CPU backend calls; a public
    prepacking API was proposed in pytorch/pytorch#139387 and torch 2.13.0 has none.
    `tests/test_precision.py::test_private_torch_ops_are_where_the_code_expects_them` fails loudly where the CPU runs
    bf16 natively and they vanish or change."""
    ops = torch.ops.mkldnn
    if hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"):
        return ops
    return None


def onednn_kernels() -> bool:
    """oneDNN's bf16 linear kernels are present and this CPU runs bf16 natively."""
    return cpu_native_bf16() and cpu().onednn_bf16 and _onednn_ops() is not None


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
        self.packed = _onednn_ops()._reorder_linear_weight(weight, 2048)
        self.packed_bias = None if fc.bias is None else fc.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _cpu_bf16_autocast() and not (torch.is_grad_enabled() and x.requires_grad):
            post, algorithm = ("gelu", "tanh") if self.gelu else ("none", "")
            return _onednn_ops()._linear_pointwise(x.to(torch.bfloat16), self.packed, self.packed_bias, post, [],
                                                   algorithm)
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu else y


def _frozen_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and not any(
        p.requires_grad for p in module.parameters())


def _tanh_gelu(module: nn.Module | None) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "tanh"


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


def _swap(parent: nn.Module, name: str, module: nn.Module, swaps: list) -> None:
    swaps.append((parent, name, getattr(parent, name)))
    setattr(parent, name, module)


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
                for parent, name, activation in block.linears():
                    fc = getattr(parent, name)
                    if not _frozen_linear(fc):
                        continue
                    fuse = activation is not None and _tanh_gelu(getattr(parent, activation))
                    _swap(parent, name, _stand_in(fc, fuse, keep), swaps)
                    if fuse:
                        _swap(parent, activation, nn.Identity(), swaps)
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
        setattr(parent, name, original)
