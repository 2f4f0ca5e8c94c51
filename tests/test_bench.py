"""The benchmark (`python -m benchmarks`): a tiny run end to end, its report as a pure function of the rows, and
the step profiler on one process and under DDP."""

from __future__ import annotations

import copy
import json
import os
import re
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
    memory = next(line for line in served if line.strip().startswith("memory:"))
    first, last = (int(n) for n in re.findall(r"after the (?:first|last) (\d+)", memory))
    assert first == last >= 40 and "; 0 of them failed" in memory  # at least --serve-requests, whole rounds of 32
    assert "of the CLI's" in next(line for line in served if line.strip().startswith("at concurrency 32:"))


def test_user_mistakes_end_in_one_line_before_any_case_runs():
    bad = _bench("--cases", "warp", timeout=120)
    assert bad.returncode == 2 and "unknown" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: --cases warp")
    nowhere = _bench("--cases", "peer", "--json", "/no/such/folder/results.json", timeout=120)
    assert nowhere.returncode == 2 and nowhere.stderr.strip().splitlines() == [
        "error: --json /no/such/folder/results.json: its folder does not exist; create it or choose another path"]



def test_a_sweep_of_one_trial_ends_in_one_line_before_any_case_runs():
    one = _bench("--cases", "sweep", "--sweep-trials", "1", timeout=120)
    assert one.returncode == 2 and one.stderr.strip().splitlines() == [
        "error: --sweep-trials 1: a sweep needs at least 2 trials"]

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


def test_the_sweep_case_times_one_run_and_each_launchers_multirun(tmp_path):
    raw = tmp_path / "results.json"
    proc = _bench("--model", "gpt2-tiny", "--epochs", "1", "--cases", "sweep", "--sweep-trials", "2", f"--json={raw}",
                  timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(raw.read_text())["sweep"]["result"]
    assert r["trials"] == 2 and r["single_s"] > 0 and set(r["launchers"]) == {"basic", "local"}
    for run in r["launchers"].values():  # both trials finished, inside the multirun's own wall time
        assert len(run["finished_s"]) == 2 and 0 < run["finished_s"][0] <= run["finished_s"][1] <= run["wall_s"]
    section = proc.stdout.split("\nsweep: ")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in section[2:5]}
    assert set(rows) == {"single", "basic", "local"} and rows["single"][1] == "1"
    for name in ("basic", "local"):
        assert rows[name][1] == "2" and float(rows[name][3]) > 0  # ratio to the single run
        # both printed figures are rounded: the ratio of the printed wall to the single run within 2%
        assert float(rows[name][2]) / r["single_s"] == pytest.approx(float(rows[name][3]), rel=0.02)
        assert float(rows[name][-1]) > 0  # against the floor of two trials


def _made_up_row(precision: str = "bf16-mixed") -> dict:
    """A cached, pooled-only training row of a 3-block model with D=4 (block: 12·16 + 13·4 = 244 weights) over
    made-up splits, and made-up rates: FLOP/s 1e3 (bf16) and 1e2 (fp32), 28e3 bytes/s, a 1 s start-up."""
    return {"sizes": {"emb_dim": 4, "layers": 3, "block": 244}, "epochs": 2, "cached": True, "pooled_only": True,
            "trainable": "last_block", "process_s": 500.0,
            "tokens": {"train_examples": 8, "batch_size": 4, "pad_length": None,
                       "real": {"train": 100, "val": 20, "test": 30}, "sizes": {"train": 10, "val": 2, "test": 3}},
            "summary": {"precision": {"used": precision}, "trainable_parameters": 1000, "test": {"acc": 0.5},
                        "timings": {"fit_s": 400.0, "prefix_cache_s": 100.0, "prefix_cache_fit_s": 80.0}},
            "rates": {"gemm_tokens": 512, "emb_dim": 4, "startup_s": 1.0, "matmul_flops": {"bf16": 1e3, "fp32": 1e2},
                      "copy_bytes_per_s": 28e3}}


def test_the_floor_adds_start_up_prefix_steps_adamw_and_evaluation_at_the_measured_rates():
    from benchmarks.floors import floor

    # The last block pooled only: 2·(2·D²·tokens + 10·D²·rows) = 64·tokens + 320·rows forward.
    prefix = 2 * 2 * 244 * (100 + 20 + 30)  # the two frozen blocks over every split, once
    train = 2 * (3 * (64 * 100 + 320 * 10))  # two epochs of forward + backward (twice the forward)
    adamw = 4 * 28 * 1000 / 28e3  # 8 // 4 · 2 steps of 28 bytes per trainable parameter
    evaluation = 2 * (64 * 20 + 320 * 2) + (64 * 100 + 320 * 10) + (64 * 20 + 320 * 2) + (64 * 30 + 320 * 3)
    r = _made_up_row()
    parts = floor(r, r["rates"])
    assert parts == pytest.approx({"start-up": 1.0, "prefix cache": prefix / 1e3, "steps": train / 1e3 + adamw,
                                   "evaluation": evaluation / 1e3, "total": 1 + (prefix + train + evaluation) / 1e3
                                   + adamw})
    assert parts["total"] == pytest.approx(227.24)
    three = floor(r, r["rates"], trials=3)  # one start-up and one prefix cache, the rest three times
    assert three["total"] == pytest.approx(1 + prefix / 1e3 + 3 * (train / 1e3 + adamw + evaluation / 1e3))
    fp32 = _made_up_row("32-true")
    assert floor(fp32, fp32["rates"])["steps"] == pytest.approx(train / 1e2 + adamw)  # the fp32 rate, 10x slower


def test_the_report_prints_each_cases_floor_and_the_sweeps_ratios():
    from benchmarks.floors import floor

    fast = _made_up_row()
    sweep = {**_made_up_row(), "single_s": 10.0, "trials": 8, "shared_cache_dir": True,
             "launchers": {"basic": {"wall_s": 30.0, "finished_s": [8.0, 10.0, 14.0, 16.0, 20.0, 22.0, 26.0, 29.0]},
                           "local": {"wall_s": 25.0, "finished_s": [9.0, 9.5, 15.0, 15.5, 20.0, 20.5, 24.0, 24.5]}}}
    setting = {"model": "gpt2-tiny", "epochs": 2, "cpu": "a CPU", "cores": 2, "torch": "x", "cpu_header": "CPU: x"}
    text = report({"fast": (fast, 2**30), "sweep": (sweep, 2**30)}, setting)
    header = next(line for line in text.splitlines() if line.startswith("case "))
    assert header.split()[-4:] == ["floor", "s", "x", "floor"]
    row = next(line for line in text.splitlines() if line.startswith("fast ")).split()
    assert float(row[-2]) == pytest.approx(227.2, abs=0.05) and float(row[-1]) == pytest.approx(500 / 227.24, abs=0.05)
    assert "fast                   floor start-up 1.00 + prefix cache 146.40" in text
    assert "this machine's rates: [512, 4] x [4, 16] GEMM bf16 0 GFLOP/s" in text
    rows = [line.split() for line in text.split("\nsweep: ")[1].splitlines()[2:7]]
    assert [(r[0], r[1]) for r in rows] == [("single", "1"), ("basic", "3*"), ("basic", "8"), ("local", "3*"),
                                            ("local", "8")]
    # wall, x single, the goal's verdict, s/trial after the first, floor of that many trials, x floor
    assert rows[1][2:] == ["14.0", "1.40", "met", "3.0", f"{floor(sweep, sweep['rates'], 3)['total']:.1f}",
                           f"{14 / floor(sweep, sweep['rates'], 3)['total']:.1f}"]
    assert rows[2][2:5] == ["30.0", "3.00", "met"] and rows[4][2:6] == ["25.0", "2.50", "met", "2.3"]
    assert rows[3][2:6] == ["15.0", "1.50", "met", "3.0"]


def test_the_scale_case_makes_distinct_labelled_messages_the_package_reads(tmp_path):
    from benchmarks.scale import generated_messages, write_messages
    from spamclf.reading import SMS_FILE, read_labelled_file
    from spamclf.tokenizer import asset_path

    texts, labels = generated_messages(3000)
    assert len(texts) == len(set(texts)) == len(labels) == 3000 and set(labels) == {"ham", "spam"}
    assert (texts, labels) == generated_messages(3000) and generated_messages(3000, seed=7)[0] != texts
    sms = read_labelled_file(asset_path(SMS_FILE))
    labels_of: dict[str, set] = {}
    for text, label in zip(sms["text"], sms["label"]):
        labels_of.setdefault(" ".join(text.split()), set()).add(label)
    for text, label in zip(texts, labels):  # an SMS message, its label kept, then one to four more words
        words = text.split()
        firsts = [" ".join(words[:k]) for k in range(len(words) - 4, len(words)) if k > 0]
        assert any(label in labels_of.get(first, ()) for first in firsts), text
    data, lines = write_messages(tmp_path, texts, labels)
    frame = read_labelled_file(data)  # as data=csv data.path=… reads it
    assert frame["text"].tolist() == texts and frame["label"].tolist() == labels
    assert lines.read_text().splitlines() == texts


def test_scale_size_mistakes_end_in_one_line_before_any_case_runs():
    for spec, message in (("2000,x", "not a comma-separated list of whole numbers"),
                          ("500,2000", "each size needs at least 1,000 messages")):
        bad = _bench("--cases", "scale", "--scale-sizes", spec, timeout=120)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
        assert bad.stderr.startswith(f"error: --scale-sizes {spec}: {message}")


def test_the_scale_case_times_every_stage_of_each_size_and_reports_them(tmp_path):
    from benchmarks.scale import STAGES

    raw = tmp_path / "results.json"
    proc = _bench("--cases", "scale", "--scale-sizes", "2000,4000", f"--json={raw}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(raw.read_text())["scale"]["result"]["sizes"]
    assert [row["messages"] for row in rows] == [2000, 4000]
    for row in rows:
        assert list(row["stages"]) == list(STAGES) and row["reads"] == 2
        assert all(part["seconds"] > 0 and part["messages"] > 0 for part in row["stages"].values()), row["stages"]
        assert sum(row["rows"].values()) == row["messages"] == row["stages"]["predict"]["messages"]
        assert row["stages"]["train epoch"]["messages"] == row["rows"]["train"] // 64 * 64  # batch 64, drop_last
        assert 0 < row["train_rss"] < 4 * 1024**3 and 0 < row["predict_rss"] < 2 * 1024**3
        assert 0 < row["train_rss_file"] < row["train_rss"]  # sampled: at most the kernel's peak
    section = proc.stdout.split("\nscale: ")[1].splitlines()
    printed = {line.split()[0]: line.split() for line in section[2:4]}
    for row in rows:
        per_1000 = [row["stages"][s]["seconds"] / row["stages"][s]["messages"] * 1000 for s in STAGES]
        assert [float(v) for v in printed[str(row["messages"])][1:9]] == pytest.approx(per_1000, abs=1e-4)
    verdicts = [line.split() for line in section if line.endswith(("met", "missed")) and "peak RSS" not in line]
    assert [v[0] for v in verdicts] == [s.split()[0] for s in STAGES] and all(v[-2].endswith("x") for v in verdicts)
    assert "peak RSS of training at 4000 messages" in proc.stdout


def _scale_row(messages: int, seconds: float, train_gb: float, predict_gb: float) -> dict:
    from benchmarks.scale import STAGES

    return {"messages": messages, "model": "gpt2-tiny", "cache_cap_mb": 128, "batch_size": 64, "reads": 2,
            "spilled": ["train"], "train_rss": train_gb * 1024**3, "train_rss_file": train_gb / 4 * 1024**3,
            "predict_rss": predict_gb * 1024**3,
            "stages": {stage: {"seconds": seconds * (2 if stage == "evaluate" else 1), "messages": messages}
                       for stage in STAGES}}


def test_the_scale_report_sets_the_largest_size_against_the_next_and_the_memory_goals():
    setting = {"model": "gpt2-tiny", "epochs": 1, "cpu": "a CPU", "cores": 2, "torch": "x", "cpu_header": "CPU: x"}
    rows = [_scale_row(100_000, 10.0, 1.0, 0.5), _scale_row(1_000_000, 110.0, 4.5, 1.5)]
    rows[1]["stages"]["predict"]["seconds"] = 130.0  # 1.3x the smaller size's rate
    text = report({"scale": ({"sizes": rows}, 2**30)}, setting)
    section = text.split("\nscale: ")[1].splitlines()
    assert section[2].split()[1:9] == ["0.1000"] * 6 + ["0.2000", "0.1000"]
    assert section[3].split()[-4:] == ["4.50", "1.12", "1.50", "train"]
    verdicts = {line.split()[0]: line.split()[-2:] for line in section if line.endswith(("met", "missed"))}
    assert verdicts["read"] == ["1.10x", "met"] and verdicts["evaluate"] == ["1.10x", "met"]
    assert verdicts["predict"] == ["1.30x", "missed"]
    assert "peak RSS of training at 1000000 messages: 4.50 GB (goal: under 4 GB) missed" in text
    assert "peak RSS of prediction at 1000000 messages: 1.50 GB (goal: under 2 GB) met" in text
