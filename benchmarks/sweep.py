"""The sweep case: one `train.py experiment=fast` run, then an N-trial multirun of it over the learning rate with
each launcher, every one a whole process timed from its start, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import STARTED
from benchmarks.training import ROOT, case_facts, compose, run_overrides

LAUNCHERS = {"basic": [], "local": ["hydra/launcher=local"]}
# The local launcher's jobs are processes of their own: they share the frozen prefix through a folder, where the
# package's configs have the key for it.
SHARED_CACHE = "model.prefix_cache.dir=${hydra:sweep.dir}/prefix-cache"


def learning_rates(base: float, trials: int) -> list[str]:
    """`trials` distinct rates around the configured one, a factor of 2 apart."""
    return [f"{base * 2.0 ** (k - trials // 2):.3g}" for k in range(trials)]


def _timed_train(overrides: list[str]) -> float:
    """Wall seconds of `python train.py OVERRIDES`, process start to exit."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: train.py {' '.join(overrides[-3:])} failed: {' | '.join(tail)}")
    return wall


def _multirun(overrides: list[str], folder: Path) -> dict:
    """A multirun's wall time and when each trial had finished (its metrics.json written), from process start."""
    start = time.time()
    wall = _timed_train(["-m", *overrides, f"hydra.sweep.dir={folder}"])
    finished = sorted(f.stat().st_mtime - start for f in folder.glob("*/metrics.json"))
    return {"wall_s": wall, "finished_s": finished}


def case_sweep(args) -> dict:
    """A single run and an `args.sweep_trials`-trial learning-rate sweep per launcher, gpt2 random weights."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["experiment=fast", *run_overrides(args)], Path(tmp))
        base = ["experiment=fast", *run_overrides(args), f"paths.log_dir={tmp}"]
        shares_cache = "dir" in cfg.model.prefix_cache
        single_s = _timed_train([*base, f"hydra.run.dir={tmp}/single"])
        summary = json.loads((Path(tmp) / "single" / "metrics.json").read_text())
        lrs = ",".join(learning_rates(cfg.model.optimizer.lr, args.sweep_trials))
        launchers = {name: _multirun([*base, *extra, *([SHARED_CACHE] if name == "local" and shares_cache else []),
                                      f"model.optimizer.lr={lrs}"], Path(tmp) / name)
                     for name, extra in LAUNCHERS.items()}
    wall = time.perf_counter() - STARTED
    facts = case_facts(cfg, args)
    return {"wall_s": wall, "bench_s": time.perf_counter() - STARTED - wall, "summary": summary, "single_s": single_s,
            "trials": args.sweep_trials, "shared_cache_dir": shares_cache, "launchers": launchers, **facts}
