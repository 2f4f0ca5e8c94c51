"""The benchmark (`python -m benchmarks`): a tiny run end to end, its report as a pure function of the rows, and
the step profiler on one process and under DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.profiler import STEP_FILE, read_profile, step_table
from benchmarks.report import report

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _parts(section: list[str]) -> dict[str, float]:
    """{part: share in %} of a printed step or op table."""
    return {line[:38].strip(): float(line.split()[-1][:-1]) for line in section if line.strip().endswith("%")}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A tiny run of the training, prediction and serve cases, profiled, with its raw results as JSON."""
    raw = tmp_path_factory.mktemp("bench") / "results.json"
    proc = _bench("--model", "gpt2-tiny", "--epochs", "1", "--cases", "ch06,fast,predict,serve",
                  "--predict-lines", "300", "--serve-requests", "40", "--profile", f"--json={raw}",
                  "--serve-flags=--max-batch-size 8 --batch-timeout 0.01")  # passed to spamclf.serve
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(raw.read_text())


@pytest.mark.hardware
def test_benchmark_runs_in_tiny_mode(tiny_bench):
    stdout, _ = tiny_bench
    lines = stdout.splitlines()
    assert any(line.startswith("fast ") for line in lines) and any(line.startswith("ch06 ") for line in lines)
    assert "fast vs ch06:" in stdout and "300 lines in" in stdout
    from spamclf.precision import resolve

    auto = resolve("auto", "cpu").lightning
    assert f"precision auto -> {auto}" in stdout and "GFLOP/s" in stdout.split("CPU:")[1].splitlines()[0]
    fast = next(line for line in lines if line.startswith("fast "))
    assert fast.split()[1] == auto and next(line for line in lines if line.startswith("ch06 ")).split()[1] == "32-true"
    wall, fit, outside = (float(v) for v in fast.split()[2:5])
    assert outside == pytest.approx(wall - fit, abs=0.11) and 0 < outside < wall
    # --profile: a step by part (StepProfile), then the same steps by op kind (torch.profiler), whose shares cover
    # the profiled steps' wall time
    profile = stdout.split("profile of fast:")[1].split("profile of")[0].splitlines()
    parts = {line[:38].strip(): float(line.split()[-2]) for line in profile[2:] if line.strip().endswith("%")}
    assert parts["forward (suffix)"] > 0 and parts["backward"] > 0 and parts["optimizer update (AdamW)"] > 0
    by_op = profile.index(next(line for line in profile if "by op" in line))
    step_shares = [float(line.split()[-1][:-1]) for line in profile[2:by_op] if line.strip().endswith("%")]
    assert sum(step_shares) == pytest.approx(100, abs=1)  # training steps only: validation passes are not in them
    ops = profile[by_op + 1:]
    assert ops[0].strip().startswith("(the 50 steps before, unprofiled:") and "faults a step" in ops[0]
    shares = _parts(ops)
    assert {"matrix products", "copies and dtype casts (autocast)", "AdamW (fused)",
            "Python, Lightning, autograd engine"} <= set(shares) and shares["matrix products"] > 0
    assert sum(shares.values()) == pytest.approx(100, abs=3)
    assert f"prediction ({ {'bf16-mixed': 'bf16', '32-true': 'fp32'}[auto]})" in stdout
    served = stdout.split("server (spamclf.serve")[1].splitlines()
    levels = [line.split() for line in served[2:6]]
    assert [int(r[0]) for r in levels] == [1, 8, 32, 128] and all(int(r[2]) == 0 and float(r[3]) > 0 for r in levels)
    assert all(r[-1].endswith("%") and 0 <= float(r[-1][:-1]) <= 200 for r in levels)  # the client's own CPU share


def test_user_mistakes_end_in_one_line_before_any_case_runs():
    bad = _bench("--cases", "warp", timeout=120)
    assert bad.returncode == 2 and "unknown" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: --cases warp")
    nowhere = _bench("--cases", "peer", "--json", "/no/such/folder/results.json", timeout=120)
    assert nowhere.returncode == 2 and nowhere.stderr.strip().splitlines() == [
        "error: --json /no/such/folder/results.json: its folder does not exist; create it or choose another path"]


@pytest.mark.hardware
def test_the_report_is_the_printed_tables_and_leaves_the_rows_alone(tiny_bench):
    stdout, raw = tiny_bench
    results = {case: (entry["result"], entry["peak_rss"]) for case, entry in raw.items()}
    before = copy.deepcopy(results)
    import onnxruntime

    from benchmarks.machine import int8_kernel

    setting = {"model": "gpt2-tiny", "epochs": 1, "cpu": "a CPU", "cores": 2, "torch": "x", "cpu_header": "CPU: stated",
               "onnxruntime": onnxruntime.__version__, "int8_kernel": int8_kernel()}
    text = report(results, setting)
    assert results == before  # nothing added to or changed in the rows
    assert text == report(results, setting)
    printed_tables = stdout.split("\n", 3)[3]  # after the blank line, the title and the CPU line
    assert text.split("CPU: stated\n", 1)[1] + "\n" == printed_tables


def test_the_cpu_facts_come_from_the_precision_module():
    from benchmarks.machine import INT8_KERNELS, int8_kernel
    from spamclf.precision import cpu, cpu_flags

    flags = cpu_flags()
    assert cpu().bf16_flag is None or cpu().bf16_flag in flags
    expected = next((name for flag, name in INT8_KERNELS if flag in flags), "generic (no AVX2)")
    assert int8_kernel() == expected
    if Path("/proc/cpuinfo").is_file():
        assert flags and all(" " not in f for f in flags)


def _profiled_fit(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A tiny fit through train.py, its steps profiled by part into tmp_path/prof."""
    prof = tmp_path / "prof"
    args = ["model=gpt2-tiny", "trainer.accelerator=cpu", "~callbacks.rich_progress_bar",
            "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "trainer.limit_train_batches=40",
            "trainer.limit_val_batches=4", "test=false",
            "experiment=fast", "+trainer.profiler._target_=benchmarks.profiler.StepMarks",
            "+callbacks.steps._target_=benchmarks.profiler.StepProfile", f"+callbacks.steps.dirpath={prof}",
            f"paths.log_dir={tmp_path}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def _assert_a_whole_step(profile: dict, world_size: int) -> None:
    assert profile["world_size"] == world_size and profile["steps"] == 40
    rows = {part: (ms, share) for part, ms, share in step_table(profile)}
    for part in ("forward (suffix)", "backward", "optimizer update (AdamW)", "zero_grad", "loss"):
        assert rows[part][0] > 0, part
    assert sum(share for _, share in rows.values()) == pytest.approx(1.0, abs=1e-9)
    assert rows["prefix cache build (once)"][0] > 0  # the marked sections reached the table


@pytest.mark.parametrize("trainer", ["cpu", "ddp_sim"])
def test_the_step_profile_covers_a_whole_step_on_one_process_and_under_ddp(trainer, tmp_path):
    proc = _profiled_fit(tmp_path, f"trainer={trainer}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_a_whole_step(read_profile(tmp_path / "prof" / STEP_FILE), world_size=2 if trainer == "ddp_sim" else 1)
