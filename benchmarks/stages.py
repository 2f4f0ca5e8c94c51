"""The scale case's training run, in a process of its own: the package's pipeline (`spamclf.pipeline.run`) with the
data module's stages timed (read, split, tokenize) and the fit told apart by Lightning's callback hooks (prefix
cache build, training epoch, validation, the final evaluation). Nothing in the package is changed for it: the
data module is a subclass chosen with `data._target_`, the clock a callback added with `+callbacks.*`."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from spamclf.datamodule import SpamDataModule

SCALE_MODEL = "gpt2-tiny"
BATCH_SIZE = 64  # batch 8 would make a million messages mostly Lightning's per-step overhead
CACHE_CAP_MB = 128  # model.prefix_cache.max_memory_mb: every split above it lives in its spill file
# This process's run, by stage: one run per process, so one record for the process.
SECONDS: dict[str, float] = {}
FACTS: dict = {"reads": 0, "rows": {}, "spilled": []}


@contextmanager
def timed(stage: str):
    """Add the block's wall time to `stage` in SECONDS."""
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[stage] = SECONDS.get(stage, 0.0) + time.perf_counter() - start


class TimedDataModule(SpamDataModule):
    """SpamDataModule whose setup is timed by stage: every read of the file (the run reads it for the label names,
    then again in setup), tokenizing, and the whole setup (the rest of it is splitting and writing the splits)."""

    def _read(self, path: Path):
        FACTS["reads"] += 1
        with timed("read"):
            return super()._read(path)

    def _encode(self) -> None:
        with timed("tokenize"):
            super()._encode()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        read_before = SECONDS.get("read", 0.0)
        with timed("setup"):
            super().setup(stage)
        SECONDS["read in setup"] = SECONDS["read"] - read_before
        FACTS["rows"] = {split: len(dataset) for split, dataset in self.datasets.items()}


class StageClock(Callback):
    """Wall time of the training epoch, the validation passes inside it and the final evaluation; the prefix
    caches' build times come from the module (`caches.built_seconds`), so they can be taken out of each."""

    def __init__(self):
        self.started: dict[str, float] = {}

    def _start(self, stage: str) -> None:
        self.started[stage] = time.perf_counter()

    def _stop(self, stage: str) -> None:
        SECONDS[stage] = SECONDS.get(stage, 0.0) + time.perf_counter() - self.started.pop(stage)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start("epoch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop("epoch")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stop("validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._start("evaluation")

    def on_test_end(self, trainer, pl_module) -> None:
        self._stop("evaluation")
        caches = pl_module.caches
        SECONDS.update({f"cache {split}": seconds for split, seconds in caches.built_seconds.items()})
        FACTS["spilled"] = [split for split, cache in caches.caches.items() if cache is not None and cache.path]


def overrides(csv: Path, out: Path, accelerator: str) -> list[str]:
    """The run: gpt2-tiny, random weights, its last block trained over the prefix cache (spilling above
    CACHE_CAP_MB), one epoch over every generated message (no balancing, no natural set), last.ckpt in `out`."""
    from argparse import Namespace

    from benchmarks.training import run_overrides

    setting = Namespace(model=SCALE_MODEL, epochs=1, accelerator=accelerator)
    return ["experiment=fast", *run_overrides(setting), "model.trainable_layers=last_block", "data=csv",
            f"data.path={csv}", "data._target_=benchmarks.stages.TimedDataModule", "data.balance=false",
            f"data.batch_size={BATCH_SIZE}", f"model.prefix_cache.max_memory_mb={CACHE_CAP_MB}",
            "+callbacks.clock._target_=benchmarks.stages.StageClock",
            "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.last.dirpath={out}",
            "+callbacks.last.filename=last", "+callbacks.last.enable_version_counter=false"]


def stage_rows(seconds: dict[str, float], rows: dict[str, int]) -> dict[str, dict]:
    """{stage: {seconds, messages}}: each stage's own time (the caches' builds taken out of the passes they ran
    in) and the messages it worked on. `rows`: messages per split."""
    cache = {split: seconds.get(f"cache {split}", 0.0) for split in rows}
    everything = sum(rows.values())
    trained = rows["train"] // BATCH_SIZE * BATCH_SIZE  # drop_last
    return {"read": {"seconds": seconds["read"], "messages": everything},
            "split": {"seconds": seconds["setup"] - seconds["read in setup"] - seconds["tokenize"],
                      "messages": everything},
            "tokenize": {"seconds": seconds["tokenize"], "messages": everything},
            "prefix cache": {"seconds": sum(cache.values()), "messages": everything},
            "train epoch": {"seconds": seconds["epoch"] - seconds["validation"] - cache["train"], "messages": trained},
            "validate": {"seconds": seconds["validation"] - cache["val"], "messages": rows["val"]},
            "evaluate": {"seconds": seconds["evaluation"] - cache["test"], "messages": everything}}


@contextmanager
def resident_peak():
    """{rss, file}: this process's resident memory at its highest (sampled) and how much of it was file pages.
    A spilled prefix cache's file is mapped: its pages count as resident until the kernel reclaims them."""
    import psutil

    process, peak, stop = psutil.Process(), {"rss": 0, "file": 0}, threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            info = process.memory_info()  # Linux: `shared` is the resident file pages (RssFile + RssShmem)
            if info.rss > peak["rss"]:
                peak.update(rss=info.rss, file=info.shared)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def case_scale_train(args) -> dict:
    """One training run over --scale-data, its last.ckpt into --scale-out: each stage's seconds and messages, how
    often the file was read, which splits' prefix caches spilled to their file, the file pages at the peak RSS."""
    from benchmarks.training import compose
    from spamclf.pipeline import run

    out = Path(args.scale_out)
    with resident_peak() as peak:
        run(compose(overrides(Path(args.scale_data), out, args.accelerator), out))
    return {"stages": stage_rows(SECONDS, FACTS["rows"]), "reads": FACTS["reads"], "spilled": FACTS["spilled"],
            "rows": FACTS["rows"], "checkpoint": str(out / "last.ckpt"), "batch_size": BATCH_SIZE,
            "cache_cap_mb": CACHE_CAP_MB, "model": SCALE_MODEL, "peak_file": peak["file"]}
