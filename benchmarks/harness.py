"""The benchmark's command line: each case runs in a process of its own (`--child CASE`), so its wall time
includes start-up and its peak RSS, read from the kernel, is its own; the parent prints the report."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks
from benchmarks.cases import ABLATIONS, CASES, FLOORED, KNOWN, OPT_IN, PREDICT_ENGINES
from benchmarks.scale import DEFAULT_SIZES, scale_sizes
from spamclf.errors import SpamclfError

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {', '.join(CASES)}, ablations or {', '.join(ABLATIONS)}; "
                        f"not run unless named: {', '.join(OPT_IN)}")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--model", default="gpt2-small", help="a model preset (gpt2-tiny for a smoke check)")
    p.add_argument("--sweep-trials", type=int, default=8, help="trials of the sweep case's learning-rate multirun")
    p.add_argument("--predict-lines", type=int, default=100_000)
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"), help="gpu: one CUDA device")
    p.add_argument("--predict-precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="the prediction case's --precision")
    p.add_argument("--serve-requests", type=int, default=2000, help="requests per concurrency level in the serve case")
    p.add_argument("--profile", action="store_true",
                   help="profile the training cases' steps (by part and by op) and print where a step's time goes")
    p.add_argument("--serve-flags", default="",
                   help='spamclf.serve flags for the serve cases, as one argument: --serve-flags="--max-batch-size 32"')
    p.add_argument("--runs", default="", help="int8_accuracy: comma-separated run folders (checkpoints/last.ckpt, "
                   "validation.csv, test.csv, natural.csv)")
    p.add_argument("--scale-sizes", default=DEFAULT_SIZES,
                   help="the scale case's numbers of messages (it always trains gpt2-tiny, one epoch)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scale-data", help=argparse.SUPPRESS)  # one size's training run: its messages and run folder
    p.add_argument("--scale-out", help=argparse.SUPPRESS)
    return p


def selected(spec: str) -> list[str]:
    """The cases `--cases` names, in the benchmark's order; `ablations` stands for all of them."""
    named = [c.strip() for c in spec.split(",") if c.strip()]
    named = [name for c in named for name in (ABLATIONS if c == "ablations" else [c])]
    unknown = sorted(set(named) - set(KNOWN))
    if unknown:
        raise SpamclfError(f"--cases {','.join(unknown)} unknown; choose from {', '.join(KNOWN)}, ablations")
    return [c for c in KNOWN if c in named]


def child(case: str, args) -> None:
    """Run one case in this process and print its result as one `BENCH {json}` line."""
    import logging

    from benchmarks import prediction, scale, serving, stages, sweep, training

    logging.basicConfig(level=logging.WARNING)
    cases = {"peer": training.case_peer, "sweep": sweep.case_sweep, "predict": prediction.case_predict,
             "serve": serving.case_serve, "scale": scale.case_scale, "scale_train": stages.case_scale_train,
             "cold_start": prediction.case_cold_start, "int8_accuracy": prediction.case_int8_accuracy,
             "serve_int8": lambda a: serving.case_serve(a, "onnx:int8"),
             **{name: (lambda a, e=engine: prediction.case_predict(a, e)) for name, engine in PREDICT_ENGINES.items()}}
    result = cases[case](args) if case in cases else training.case_train(case, args)
    print("BENCH " + json.dumps(result, default=str), flush=True)


def run_case(case: str, argv: list[str]) -> tuple[dict, int]:
    """Run a case in its own process; its result and its own peak RSS, from the kernel (wait4), not sampled."""
    command = [sys.executable, "-m", "benchmarks", *argv, "--child", case]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH ")), None)
    if os.waitstatus_to_exitcode(status) != 0 or line is None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: bench case {case} failed: {' | '.join(tail)}")
    result = json.loads(line[6:])
    result["process_s"] = time.perf_counter() - start - result.get("bench_s", 0.0)
    return result, usage.ru_maxrss * 1024  # Linux reports KiB


def add_rates(results: dict, args) -> None:
    """This machine's measured rates (benchmarks.rates), once per run, into every training case's row: the report
    computes the cases' floors from the rows alone."""
    floored = [case for case in FLOORED if case in results]
    if not floored:
        return
    from benchmarks.rates import measure

    print("measuring this machine's rates …", file=sys.stderr, flush=True)
    rates = measure(results[floored[0]][0]["sizes"]["emb_dim"], args.accelerator)
    for case in floored:
        results[case][0]["rates"] = rates


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import setting
    from benchmarks.report import ENGINE_CASES, report
    from spamclf.io import write_json

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        if args.child:
            child(args.child, args)
            return 0
        cases = selected(args.cases)
        if args.sweep_trials < 2:
            raise SpamclfError(f"--sweep-trials {args.sweep_trials}: a sweep needs at least 2 trials")
        if "scale" in cases:
            scale_sizes(args.scale_sizes)
        if args.json and not Path(args.json).resolve().parent.is_dir():  # found out now, not after the cases ran
            raise SpamclfError(f"--json {args.json}: its folder does not exist; create it or choose another path")
    except SpamclfError as error:  # one line, no traceback; a child's reaches the parent's "case failed" line
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {}
    for case in cases:
        print(f"running {case} …", file=sys.stderr, flush=True)
        results[case] = run_case(case, argv)
    add_rates(results, args)
    print(report(results, setting(args, onnx=any(c in results for c in ENGINE_CASES))))
    if args.json:
        write_json(args.json, {k: {"result": v[0], "peak_rss": v[1]} for k, v in results.items()})
    return 0
