"""The optimizer and learning-rate schedule from config: `model.optimizer` and `model.scheduler` are Hydra
partials (`_partial_: true`) of any `torch.optim` class and scheduler, completed here with the module's parameters."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable

import torch

from spamclf.errors import InvalidOption

SCHEDULES = ("constant", "cosine")
# The book's optimizer: what `SpamClassifier(...)` uses when built without one (as conf/model/gpt2-small.yaml).
DEFAULT_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=5e-5, weight_decay=0.1)


def _accepts(factory: Callable, name: str) -> bool:
    """Whether `factory` (a class, a function or a functools.partial of one) takes the keyword `name`."""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_optimizer(factory: Callable, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`factory(params)`, with `fused=True` where the class takes it, the config leaves it unset and every
    parameter is a cpu/cuda fp32/bf16 tensor: AdamW's fused kernel is one pass over them, ~7x faster on CPU."""
    params = list(params)
    preset = getattr(factory, "keywords", {}) or {}
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    if fusable and "fused" not in preset and _accepts(factory, "fused"):
        return factory(params, fused=True)
    return factory(params)


def build_scheduler(factory: Callable, optimizer: torch.optim.Optimizer, total_steps: int):
    """`factory(optimizer)`; a factory that takes `total_steps` (as `warmup_schedule` does) is told the run's."""
    if _accepts(factory, "total_steps"):
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)


def warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str = "constant",
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warmup over `warmup_steps` optimizer steps, then the learning rate held (`constant`) or
    decayed to zero along a half cosine by the last step (`cosine`)."""
    if schedule not in SCHEDULES:
        raise InvalidOption("model.scheduler.schedule", schedule, "one of " + ", ".join(SCHEDULES))
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
