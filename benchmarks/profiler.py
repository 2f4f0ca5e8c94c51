"""Where a training step's time goes, on public Lightning API only, so it reads the same on one process or under
DDP: `StepProfile` (a Callback) times the stretches between the hooks Lightning calls on every step, and
`StepMarks` (a Lightning Profiler) keeps the sections `SpamClassifier.training_step` marks with
`trainer.profiler.profile("step: ...")`. `OpProfile` splits a window of steps into the ops torch.profiler sees
(matrix products, autocast's casts, AdamW, ...) and the Python around them.

    python train.py experiment=fast +trainer.profiler._target_=benchmarks.profiler.StepMarks \
        +callbacks.steps._target_=benchmarks.profiler.StepProfile +callbacks.steps.dirpath=prof
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.profilers import Profiler

from spamclf.io import write_json

STEP_FILE = "step-profile.json"
MARK_PREFIX = "step: "  # training steps only: the module marks validation passes "eval: ..."
# The hooks Lightning calls in a step, in order; each opens the stretch of the step named beside it. A hook that
# does not fire (zero_grad while gradients accumulate) leaves its time to the stretch before.
STRETCHES = {
    "on_train_batch_start": "training_step",
    "on_before_zero_grad": "zero_grad",
    "on_before_backward": "backward",
    "on_after_backward": "Lightning bookkeeping",  # closure return, gradient clipping, the precision plugin
    "on_before_optimizer_step": "optimizer update (AdamW)",  # and the learning-rate scheduler's step
}
BETWEEN = "data loading, transfer, logging"  # one step's end to the next one's start, within an epoch
# The marked sections, as (row, mark).
MARKED = (
    ("prefix cache build (once)", "step: prefix cache"),
    ("cache gather", "step: cache gather"),
    ("forward (suffix)", "step: forward"),
    ("loss", "step: loss"),
    ("metrics and logging", "step: metrics and logging"),
)


class StepMarks(Profiler):
    """A Lightning profiler that keeps only the model's training-step sections: {mark: [calls, seconds]}."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, list] = {}
        self._open: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        if action_name.startswith(MARK_PREFIX):
            self._open[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        began = self._open.pop(action_name, None)
        if began is not None:
            calls, seconds = self.marks.get(action_name, (0, 0.0))
            self.marks[action_name] = [calls + 1, seconds + time.perf_counter() - began]


class StepProfile(Callback):
    """Times each training step's stretches between Lightning's hooks (STRETCHES) and the gaps between steps; when
    training ends, rank zero writes `<dirpath>/step-profile.json` with its own steps and, when the trainer's
    profiler is a StepMarks, the marked sections."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.steps = 0
        self.seconds = {name: 0.0 for name in (BETWEEN, *STRETCHES.values())}
        self._stretch: tuple[str, float] | None = None  # the stretch under way and when it began
        self._last_end: float | None = None

    def _enter(self, hook: str) -> None:
        now = time.perf_counter()
        if self._stretch is not None:
            name, began = self._stretch
            self.seconds[name] += now - began
        self._stretch = (STRETCHES[hook], now)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_end = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.seconds[BETWEEN] += now - self._last_end
        self._stretch = None
        self._enter("on_train_batch_start")

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self._enter("on_before_zero_grad")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._enter("on_before_backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._enter("on_after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._enter("on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        name, began = self._stretch
        self._last_end = time.perf_counter()
        self.seconds[name] += self._last_end - began
        self._stretch = None
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        marks = trainer.profiler.marks if isinstance(trainer.profiler, StepMarks) else {}
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        write_json(Path(self.dirpath) / STEP_FILE, {"steps": self.steps, "world_size": trainer.world_size,
                                                     "seconds": self.seconds, "marks": marks})


def step_table(profile: dict) -> list[tuple[str, float, float]]:
    """(part, ms per step, share of the steps' time) for each part of a training step, from a StepProfile file.
    The marked sections are cut out of training_step's stretch, so the shares sum to one."""
    steps, seconds = profile["steps"], dict(profile["seconds"])
    if not steps:
        return []
    marked = {row: profile["marks"].get(mark, [0, 0.0])[1] for row, mark in MARKED}
    step = seconds.pop("training_step")
    parts = {BETWEEN: seconds.pop(BETWEEN), **marked, "training_step: the rest": max(0.0, step - sum(marked.values())),
             **seconds}
    total = sum(parts.values())
    return [(name, 1000 * s / steps, s / total if total else 0.0) for name, s in parts.items()]


def read_profile(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# What the ops of a training step are, by their names in torch.profiler (self time, so nothing counts twice).
OP_KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")),
    ("copies and dtype casts (autocast)", ("aten::copy_",)),
    ("AdamW (fused)", ("aten::_fused_adamw_",)),
    ("attention", ("scaled_dot_product",)),
    ("zero-fills", ("aten::fill_", "aten::zero_")),
)


class OpProfile(Callback):
    """torch.profiler over `steps` training batches from global step `start`: the step's ops by kind, and the
    rest of its wall time (Python, Lightning, the autograd engine), as `<dirpath>/ops-profile.json`. The `steps`
    batches just before run unprofiled and are timed too, with both windows' minor page faults: the profiler's
    own allocations can make the step's fresh tensors fault (seen under bf16 on a 2-core AMX Xeon: 31-86 faults a
    step without it, 2,236-4,600 with it, landing in the casts' `aten::copy_`), so the table says how far the window
    is off. The profiler's slow parts stay out of the steps that StepProfile times: its first start (seconds) runs
    before training, and at the window's end collection is only switched off; the profile is read and written
    when training ends (rank zero)."""

    def __init__(self, dirpath: str, start: int = 200, steps: int = 50):
        self.dirpath, self.start, self.steps = dirpath, start, steps
        self._profiler = None
        self._plain_from: tuple[float, int] | None = None  # (time, faults) where the unprofiled window began
        self._plain: tuple[float, int] | None = None  # its (seconds, faults)
        self._profiled_from = (0.0, 0)
        self._profiled: tuple[float, int] | None = None  # the profiled window's (seconds, faults), once it is over

    @staticmethod
    def _now() -> tuple[float, int]:
        return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def _since(self, mark: tuple[float, int]) -> tuple[float, int]:
        now = self._now()
        return now[0] - mark[0], now[1] - mark[1]

    def on_train_start(self, trainer, pl_module) -> None:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            pass  # the profiler's one-time start-up, here rather than in the window's first step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start - self.steps and self._plain_from is None:
            self._plain_from = self._now()
        if trainer.global_step == self.start and self._profiler is None:
            self._plain = self._since(self._plain_from) if self._plain_from else None
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
            self._profiled_from = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profiler is None or self._profiled is not None or trainer.global_step < self.start + self.steps:
            return
        self._profiler.toggle_collection_dynamic(False, [torch.profiler.ProfilerActivity.CPU])
        self._profiled = self._since(self._profiled_from)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        if self._profiled is not None and trainer.is_global_zero:  # a window that training ended inside: not written
            self_ms = {e.key: e.self_cpu_time_total / 1000 for e in self._profiler.key_averages()}
            plain = ({"unprofiled_wall_ms": 1000 * self._plain[0], "unprofiled_faults": self._plain[1]}
                     if self._plain else {})
            wall, faults = self._profiled
            write_json(Path(self.dirpath) / "ops-profile.json",
                       {"steps": self.steps, "wall_ms": 1000 * wall, "faults": faults, **plain, "ops_ms": self_ms})
        self._profiler = None


def op_table(profile: dict) -> list[tuple[str, float, float]]:
    """(kind, ms per step, share of the step's wall time) from an OpProfile file."""
    steps, wall = profile["steps"], profile["wall_ms"]
    ops = {name: ms for name, ms in profile["ops_ms"].items() if "::" in name}  # ops, not record_function ranges
    rows, counted = [], 0.0
    for kind, names in OP_KINDS:
        ms = sum(v for k, v in ops.items() if any(n in k for n in names))
        rows.append((kind, ms))
        counted += ms
    rows.append(("other ops", sum(ops.values()) - counted))
    rows.append(("Python, Lightning, autograd engine", max(0.0, wall - sum(ops.values()))))
    return [(kind, ms / steps, ms / wall) for kind, ms in rows]
