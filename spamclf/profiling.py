"""Where a training step's time goes: Lightning's SimpleProfiler, whose per-action durations (Lightning's own
hooks, and the sections `SpamClassifier.training_step` marks with `trainer.profiler.profile`) are also written as
JSON for the benchmark (`python -m spamclf.bench --profile`) to read.

    python train.py experiment=fast +trainer.profiler._target_=spamclf.profiling.StepProfiler +trainer.profiler.dirpath=prof
"""

from __future__ import annotations

import json
from pathlib import Path

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
