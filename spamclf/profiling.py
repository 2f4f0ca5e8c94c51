"""Where a training step's time goes: Lightning's SimpleProfiler, whose per-action durations (Lightning's own
hooks, and the sections `SpamClassifier.training_step` marks with `trainer.profiler.profile`) are also written as
JSON for the benchmark (`python -m spamclf.bench --profile`) to read; `OpProfile` splits a window of steps
into the ops torch.profiler sees (matrix products, autocast's casts, AdamW, ...) and the Python around them.

    python train.py experiment=fast +trainer.profiler._target_=spamclf.profiling.StepProfiler +trainer.profiler.dirpath=prof
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.profilers import SimpleProfiler

from spamclf.io import write_json

# What a training step is made of, as (row, Lightning action or marked section); the rest of the step is
# Lightning's own bookkeeping (hooks, loops, closures).
STEP_PARTS = (
    ("data loading", "[_TrainingEpochLoop].train_dataloader_next"),
    ("batch to device", "[Strategy]SingleDeviceStrategy.batch_to_device"),
    ("prefix cache build (once)", "step: prefix cache"),
    ("cache gather", "step: cache gather"),
    ("forward (suffix)", "step: forward"),
    ("loss", "step: loss"),
    ("metrics and logging", "step: metrics and logging"),
    ("backward", "[Strategy]SingleDeviceStrategy.backward"),
    ("zero_grad", "[LightningModule]SpamClassifier.optimizer_zero_grad"),
)


class StepProfiler(SimpleProfiler):
    """SimpleProfiler that also leaves `<dirpath>/<stage>-<filename>.json` per stage: {action: [calls, seconds]}."""

    def teardown(self, stage: str | None) -> None:
        if self.dirpath is not None and self.recorded_durations:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            durations = {action: [len(d), float(sum(d))] for action, d in self.recorded_durations.items()}
            name = getattr(stage, "value", stage) or "run"  # Lightning passes its TrainerFn enum
            write_json(Path(self.dirpath) / f"{name}-{self.filename or 'profile'}.json", durations)
        super().teardown(stage)


def step_table(durations: dict[str, list[float]]) -> list[tuple[str, float, float]]:
    """(part, ms per step, share of the training batches' time) for each part of a step, the optimizer's own
    update and Lightning's remaining bookkeeping included."""
    calls, batches = durations.get("run_training_batch", [0, 0.0])
    if not calls:
        return []
    seconds = {name: durations.get(action, [0, 0.0])[1] for name, action in STEP_PARTS}
    step = durations.get("[Strategy]SingleDeviceStrategy.training_step", [0, 0.0])[1]
    closure = durations.get("[LightningModule]SpamClassifier.optimizer_step", [0, 0.0])[1]
    seconds["optimizer update (AdamW)"] = max(0.0, closure - step - seconds["backward"] - seconds["zero_grad"])
    marked = sum(v for k, v in seconds.items() if k.startswith(("prefix", "cache", "forward", "loss", "metrics")))
    seconds["training_step: the rest"] = max(0.0, step - marked)
    total = batches + seconds["data loading"]
    seconds["Lightning bookkeeping"] = max(0.0, total - sum(seconds.values()))
    return [(name, 1000 * s / calls, s / total) for name, s in seconds.items()]


def read_profile(path: Path) -> dict[str, list[float]]:
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
    own allocations can make the step's fresh tensors fault (seen under bf16 on a 2-core AMX Xeon: 31-86 faults a step
    without it, 2,236-4,600 with it, landing in the casts' `aten::copy_`), so the table says how far the window is off."""

    def __init__(self, dirpath: str, start: int = 200, steps: int = 50):
        self.dirpath, self.start, self.steps = dirpath, start, steps
        self._profiler = None
        self._plain_from: tuple[float, int] | None = None  # (time, faults) where the unprofiled window began
        self._plain: tuple[float, int] | None = None  # its (seconds, faults)
        self._profiled_from = (0.0, 0)

    @staticmethod
    def _now() -> tuple[float, int]:
        return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def _since(self, mark: tuple[float, int]) -> tuple[float, int]:
        now = self._now()
        return now[0] - mark[0], now[1] - mark[1]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start - self.steps and self._plain_from is None:
            self._plain_from = self._now()
        if trainer.global_step == self.start and self._profiler is None:
            self._plain = self._since(self._plain_from) if self._plain_from else None
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
            self._profiled_from = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profiler is None or trainer.global_step < self.start + self.steps:
            return
        wall, faults = self._since(self._profiled_from)
        self._profiler.__exit__(None, None, None)
        self_ms = {e.key: e.self_cpu_time_total / 1000 for e in self._profiler.key_averages()}
        self._profiler = None
        plain = {"unprofiled_wall_ms": 1000 * self._plain[0], "unprofiled_faults": self._plain[1]} if self._plain else {}
        write_json(Path(self.dirpath) / "ops-profile.json",
                   {"steps": self.steps, "wall_ms": 1000 * wall, "faults": faults, **plain, "ops_ms": self_ms})

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is not None:  # training ended inside the window: close the profiler, write nothing
            self._profiler.__exit__(None, None, None)
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
