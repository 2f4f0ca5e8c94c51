"""The benchmark's tables, made from its result rows: `report(results, setting)` returns the text and leaves the
rows as they were. `results`: {case: (result, peak RSS in bytes)}; `setting`: benchmarks.machine.setting()."""

from __future__ import annotations

from pathlib import Path

from benchmarks.cases import ABLATIONS, FLOORED
from benchmarks.floors import FLOOR_NOTE, floor
from benchmarks.flops import gflops, prediction_flops, training_phases
from benchmarks.profiler import op_table, step_table
from benchmarks.scale import STAGES

GB = 1024**3
# The book's own script, same recipe, measured on a 2-core AMD EPYC virtual machine (docs/speed.md).
BOOK = {"script_min": 16.2, "script_rss_gb": 1.33, "script_cpu": "a 2-core AMD EPYC VM", "row10_test_acc": 0.9367}
SWEEP_GOALS = {3: 2.0, 8: 3.0}  # trials: the most a sweep's wall may be, in single runs
SERVE_GOAL_CONCURRENCY = 32  # the level compared with the CLI
ENGINE_CASES = ("predict_fp32", "predict", "predict_onnx", "predict_int8")
SCALE_RATIO_GOAL = 1.2  # a stage's seconds per 1,000 messages, largest size against the next
SCALE_RSS_GOALS_GB = {"training": 4.0, "prediction": 2.0}  # peak RSS at the largest size


def report(results: dict, setting: dict) -> str:
    sections = [_header(results, setting), _training(results), _floors(results), _comparisons(results),
                _ablations(results), _sweep(results),
                *(_serve(results, name) for name in ("serve", "serve_int8") if name in results),
                _engines(results, setting), _int8_accuracy(results), _prediction(results), _scale(results),
                _profiles(results)]
    return "\n".join(line for section in sections for line in section)


def _header(results: dict, setting: dict) -> list[str]:
    cards = sorted({r["gpu"] for r, _ in results.values() if "gpu" in r})
    machine = f"{', '.join(cards)} (+ {setting['cpu']})" if cards else f"{setting['cpu']}, {setting['cores']} cores"
    return ["", f"spamclf benchmark — {setting['model']} (random weights), {setting['epochs']} epoch(s), batch 8; "
                f"{machine}, torch {setting['torch']}", setting["cpu_header"], ""]


def _training_row(case: str, r: dict, rss: int, gpu: bool) -> str:
    s, t = r["summary"], r["tokens"]
    fit, wall = s["timings"].get("fit_s", 0.0), r["process_s"]
    examples = t["train_examples"] * r["epochs"]
    train_real = t["real"]["train"] * t["train_examples"] / t["sizes"]["train"] * r["epochs"]
    gpu_col = f"{r['gpu_peak_gb']:>8.2f}" if r.get("gpu_peak_gb") is not None else f"{'':>8}"
    acc = s.get("test", {}).get("acc")
    least = floor(r, r["rates"])["total"] if "rates" in r else float("nan")
    return (f"{case:<22}{s.get('precision', {}).get('used', '?'):>11}{wall:>9.1f}{fit:>9.1f}{wall - fit:>13.1f}"
            f"{examples / fit:>12.1f}{train_real / fit:>11.0f}{rss / GB:>13.2f}{gpu_col}"
            f"{acc if acc is not None else float('nan'):>10.4f}{least:>9.1f}{wall / least:>9.1f}")


def _training(results: dict) -> list[str]:
    """The training cases' table, the peer's row last."""
    gpu = any("gpu" in r for r, _ in results.values())
    header = (f"{'case':<22}{'precision':>11}{'wall s':>9}{'fit s':>9}{'outside fit':>13}{'train ex/s':>12}"
              f"{'tokens/s':>11}{'peak RSS GB':>13}{'GPU GB' if gpu else '':>8}{'test acc':>10}{'floor s':>9}"
              f"{'x floor':>9}")
    cases = [case for case in ("ch06", "fast", "all_layers", *ABLATIONS) if case in results]
    lines = [header, "-" * len(header)] if cases else []
    lines += [_training_row(case, *results[case], gpu) for case in cases]
    if "peer" in results:
        r, rss = results["peer"]
        gpu_col = f"{r['gpu_peak_gb']:>8.2f}" if "gpu_peak_gb" in r else f"{'':>8}"
        lines.append(f"{'peer (hf)':<22}{'32-true':>11}{r['process_s']:>9.1f}{r['fit_s']:>9.1f}"
                     f"{r['process_s'] - r['fit_s']:>13.1f}{'':>12}{'':>11}{rss / GB:>13.2f}{gpu_col}"
                     f"{r['test_acc']:>10.4f}")
    return [*lines, ""]


def _floors(results: dict) -> list[str]:
    """Each training case's floor by part, and the measured rates it comes from."""
    rows = [(case, results[case][0]) for case in FLOORED if case in results and "rates" in results[case][0]]
    if not rows:
        return []
    rates = rows[0][1]["rates"]
    shape = f"[{rates['gemm_tokens']}, {rates['emb_dim']}] x [{rates['emb_dim']}, {4 * rates['emb_dim']}]"
    flops = rates["matmul_flops"]
    lines = [f"this machine's rates: {shape} GEMM bf16 {flops['bf16'] / 1e9:.0f} GFLOP/s, fp32 "
             f"{flops['fp32'] / 1e9:.0f} GFLOP/s; copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written); "
             f"bare `import torch` {rates['startup_s']:.2f} s", FLOOR_NOTE]
    for case, r in rows:
        parts = floor(r, r["rates"])
        name = "sweep (one run)" if case == "sweep" else case
        lines.append(f"  {name:<22} floor " + " + ".join(f"{part} {seconds:.2f}" for part, seconds in parts.items()
                                                          if part != "total") + f" = {parts['total']:.2f} s")
    return [*lines, ""]


def _sweep_rows(r: dict) -> list[tuple[str, int, float, float]]:
    """(launcher, trials, wall s, s per trial after the first) of the sweep case; a count below the sweep's own
    is read inside it, when that many trials had finished."""
    rows = [("single", 1, r["single_s"], float("nan"))]
    for name, run in r["launchers"].items():
        done, n = run["finished_s"], r["trials"]
        for k in sorted({k for k in SWEEP_GOALS if k < n} | {n}):
            wall = run["wall_s"] if k == n else done[k - 1]
            rows.append((name, k, wall, (wall - done[0]) / (k - 1)))
    return rows


def _sweep(results: dict) -> list[str]:
    """The sweep case: each launcher's multirun against one run, against the goals and against its floor."""
    if "sweep" not in results:
        return []
    r = results["sweep"][0]
    lines = ["", f"sweep: `train.py experiment=fast`, then `-m` over {r['trials']} values of model.optimizer.lr; "
                 "each a whole process, wall from its start; goals: "
                 + ", ".join(f"{k} trials <= {x:g}x one run" for k, x in SWEEP_GOALS.items()),
             f"  {'launcher':<10}{'trials':>8}{'wall s':>9}{'x single':>10}{'goal':>7}{'s/trial after 1st':>19}"
             f"{'floor s':>9}{'x floor':>9}"]
    for name, k, wall, per_trial in _sweep_rows(r):
        goal = SWEEP_GOALS.get(k) if name != "single" else None
        verdict = ("met" if wall / r["single_s"] <= goal else "missed") if goal else ""
        least = floor(r, r["rates"], trials=k)["total"] if "rates" in r else float("nan")
        within = "*" if name != "single" and k < r["trials"] else ""
        lines.append(f"  {name:<10}{str(k) + within:>8}{wall:>9.1f}{wall / r['single_s']:>10.2f}{verdict:>7}"
                     f"{per_trial:>19.1f}{least:>9.1f}{wall / least:>9.1f}")
    lines.append(f"  * read inside the {r['trials']}-trial sweep, when that many of its trials had finished; the "
                 "local launcher " + ("shared the prefix cache through model.prefix_cache.dir" if r["shared_cache_dir"]
                                      else "had no model.prefix_cache.dir to share the prefix cache through"))
    lines.append("  the floor of k trials: one start-up and one prefix cache, k times the steps and evaluation")
    return lines


def _comparisons(results: dict) -> list[str]:
    """Speed-ups between the training cases, the book's own script, and each case's FLOP rates."""
    wall = {case: r["process_s"] for case, (r, _) in results.items() if "process_s" in r}
    lines = []
    if "ch06" in results and "fast" in results:
        fit = {case: results[case][0]["summary"]["timings"]["fit_s"] for case in ("ch06", "fast")}
        lines.append(f"fast vs ch06: {wall['ch06'] / wall['fast']:.1f}x wall, {fit['ch06'] / fit['fast']:.1f}x fit")
    if "peer" in results and "fast" in results:
        lines.append(f"fast vs peer: {wall['peer'] / wall['fast']:.1f}x wall")
    if "ch06" in results and "peer" in results:
        lines.append(f"ch06 vs peer: {wall['peer'] / wall['ch06']:.2f}x wall")
    lines.append(f"book's own script, same recipe: {BOOK['script_min']} min, {BOOK['script_rss_gb']} GB peak RSS "
                 f"on {BOOK['script_cpu']}")
    for case in ("ch06", "fast", "all_layers"):
        if case in results:
            for phase, (flops, seconds) in training_phases(case, results[case][0]).items():
                lines.append(f"  {case:<11} {phase:<40} {flops / 1e12:7.2f} TFLOP in {seconds:6.1f} s = "
                             f"{gflops(flops, seconds):>5} GFLOP/s")
    if "all_layers" in results:
        acc = results["all_layers"][0]["summary"].get("test", {}).get("acc")
        lines.append(f"all layers from random init: test acc {acc:.4f} vs the book's row 10: "
                     f"{BOOK['row10_test_acc']:.4f}")
    return lines


def _ablations(results: dict) -> list[str]:
    names = [name for name in ABLATIONS if name in results]
    if not names:
        return []
    base = results.get("fast")
    lines = ["", "experiment=fast with one piece taken away:"]
    for name in names:
        r, rss = results[name]
        ratio = f", {r['process_s'] / base[0]['process_s']:.2f}x fast's wall" if base else ""
        lines.append(f"  {name:<22} {' '.join(ABLATIONS[name]):<50} wall {r['process_s']:6.1f} s, fit "
                     f"{r['summary']['timings']['fit_s']:6.1f} s, peak RSS {rss / GB:.2f} GB, test acc "
                     f"{r['summary'].get('test', {}).get('acc', float('nan')):.4f}{ratio}")
    return lines


def _serve(results: dict, name: str) -> list[str]:
    r, _ = results[name]
    lines = ["", f"server (spamclf.serve, {r.get('engine', r['precision'])}, single-text requests from a Python "
                 f"client on 127.0.0.1, memory of the server's processes loaded and idle: "
                 f"RSS {r.get('rss_idle', 0) / GB:.2f} GB "
                 f"summed, PSS {r.get('pss_idle', 0) / GB:.2f} GB; peak RSS {r['peak_rss'] / GB:.2f} GB):",
             f"  {'concurrency':>11} {'requests':>9} {'failed':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'RSS after GB':>13} {'PSS after GB':>13} {'client CPU':>11}"]
    for c, level in r["levels"].items():
        lines.append(f"  {c:>11} {level['requests']:>9} {level['failed']:>7} {level['rps']:>8.1f} "
                     f"{level['p50_ms']:>8.1f} {level['p99_ms']:>8.1f} {level['rss_after'] / GB:>13.2f} "
                     f"{level.get('pss_after', 0) / GB:>13.2f} {level.get('client_cpu', float('nan')):>11.0%}")
    if "first_1000" in r:
        first, last = r["first_1000"], r["last_1000"]
        lines.append(f"  memory: RSS {first['rss_after'] / GB:.2f} GB after the first {first['requests']:,} "
                     f"requests, {last['rss_after'] / GB:.2f} GB after the last {last['requests']:,} "
                     f"(PSS {first['pss_after'] / GB:.2f} -> {last['pss_after'] / GB:.2f} GB); "
                     f"{first['failed'] + last['failed']} of them failed")
    cli_case = {"serve": "predict", "serve_int8": "predict_int8"}[name]
    if cli_case in results:
        cli = results[cli_case][0]["lines"] / results[cli_case][0]["wall_s"]
        goal = r["levels"].get(str(SERVE_GOAL_CONCURRENCY), {}).get("rps", float("nan"))
        lines.append(f"  at concurrency {SERVE_GOAL_CONCURRENCY}: {goal / cli:.0%} of the CLI's {cli:.0f} messages/s "
                     f"({cli_case}, start-up included; goal 90%)")
    return lines


def _engines(results: dict, setting: dict) -> list[str]:
    """predict over the same file with each engine: messages/s after the model is loaded and with start-up."""
    rows = [(name, *results[name]) for name in ENGINE_CASES if name in results]
    if not rows:
        return []
    base = next((r["lines"] / (r["wall_s"] - r["loaded_s"]) for name, r, _ in rows if name == "predict_fp32"), None)
    lines = ["", f"prediction engines (ONNX Runtime {setting.get('onnxruntime', '?')}, int8 kernels: "
                 f"{setting.get('int8_kernel', '?')}), {rows[0][1]['lines']} lines each:",
             f"  {'case':<14}{'engine':<12}{'precision':>10}{'load s':>8}{'msg/s loaded':>14}{'msg/s wall':>12}"
             f"{'peak RSS GB':>13}{'vs fp32':>9}"]
    for name, r, _ in rows:  # peak_rss: the predict process's own, sampled
        rate = r["lines"] / max(r["wall_s"] - r["loaded_s"], 1e-9)
        ratio = f"{rate / base:.2f}x" if base else "-"
        lines.append(f"  {name:<14}{r['engine'].split(':')[0]:<12}{r['precision']:>10}{r['loaded_s']:>8.1f}"
                     f"{rate:>14.1f}{r['lines'] / r['wall_s']:>12.1f}{r['peak_rss'] / GB:>13.2f}{ratio:>9}")
    if "cold_start" in results:
        for engine, run in results["cold_start"][0]["runs"].items():
            lines.append(f"  cold start, one message, {engine:<11} median {run['median_s']:.2f} s "
                         f"(min {run['min_s']:.2f}, max {run['max_s']:.2f}) process start to answer, "
                         f"{run.get('cpu_median_s', float('nan')):.2f} s of CPU")
    return lines


def _int8_accuracy(results: dict) -> list[str]:
    if "int8_accuracy" not in results:
        return []
    lines = ["", "int8 graph against its fp32 checkpoint (labels at the checkpoint's threshold):",
             f"  {'run':<28}{'split':<12}{'messages':>9}{'agree':>9}{'FPR fp32':>10}{'FPR int8':>10}{'recall fp32':>13}"
             f"{'recall int8':>13}"]
    for run, r in results["int8_accuracy"][0]["runs"].items():
        for split, m in r["splits"].items():
            lines.append(f"  {(r['model'] or '?') + ' ' + Path(run).name:<28}{split:<12}{m['count']:>9}"
                         f"{m['agreement']:>9.2%}{m['fp32']['fpr']:>10.2%}{m['int8']['fpr']:>10.2%}"
                         f"{m['fp32']['recall']:>13.2%}{m['int8']['recall']:>13.2%}")
    return lines


def _prediction(results: dict) -> list[str]:
    if "predict" not in results:
        return []
    r, rss = results["predict"]
    return [f"prediction ({r['precision']}): {r['lines']} lines in {r['wall_s']:.1f} s = "
            f"{r['lines'] / r['wall_s']:.0f} messages/s (start-up included), ~{r['mean_tokens']:.1f} tokens/message, "
            f"{gflops(prediction_flops(r), r['wall_s'])} GFLOP/s; peak RSS {rss / GB:.2f} GB (first quarter "
            f"{r['rss_first_quarter'] / GB:.2f} GB, rest {r['rss_rest'] / GB:.2f} GB)"]


def _per_1000(row: dict, stage: str) -> float:
    """Seconds per 1,000 messages of the stage's own input."""
    part = row["stages"][stage]
    return part["seconds"] / part["messages"] * 1000


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def _scale(results: dict) -> list[str]:
    """The scale case: each stage's seconds per 1,000 messages and the peak RSS per size, then the largest size
    against the next (the linearity goal) and against the memory goals."""
    if "scale" not in results:
        return []
    rows = results["scale"][0]["sizes"]
    first = rows[0]
    lines = ["", f"scale: {first['model']} (random weights, last block trained on the prefix cache, which lives in a "
                 f"file above {first['cache_cap_mb']} MB a split), 1 epoch, batch {first['batch_size']}, over N "
                 "distinct messages made from the SMS collection; seconds per 1,000 messages of each stage's input",
             f"  {'messages':>9}" + "".join(f"{stage:>13}" for stage in STAGES)
             + f"{'train RSS GB':>14}{'of it file':>12}{'predict RSS GB':>16}{'spilled':>20}"]
    for row in rows:
        lines.append(f"  {row['messages']:>9}" + "".join(f"{_per_1000(row, stage):>13.4f}" for stage in STAGES)
                     + f"{row['train_rss'] / GB:>14.2f}{row['train_rss_file'] / GB:>12.2f}"
                     f"{row['predict_rss'] / GB:>16.2f}{','.join(row['spilled']) or '-':>20}")
    lines += [f"  read: the file is read {first['reads']} times a run (the label names, then the data); split: "
              "shuffling, cutting and writing the split files; predict: the CLI after the model is loaded",
              "  of it file: file pages in the training process's peak RSS (sampled), the libraries' and the spilled "
              "caches': a spilled cache's file is mapped, and its pages stay resident until the kernel reclaims them"]
    largest = rows[-1]
    if len(rows) > 1:
        before = rows[-2]
        lines.append(f"  {largest['messages']} against {before['messages']} messages, seconds per 1,000 (goal: at "
                     f"most {SCALE_RATIO_GOAL:g}x):")
        for stage in STAGES:
            ratio = _per_1000(largest, stage) / _per_1000(before, stage)
            lines.append(f"    {stage:<14}{ratio:>7.2f}x {_verdict(ratio <= SCALE_RATIO_GOAL)}")
    for process, key in (("training", "train_rss"), ("prediction", "predict_rss")):
        goal = SCALE_RSS_GOALS_GB[process]
        lines.append(f"  peak RSS of {process} at {largest['messages']} messages: {largest[key] / GB:.2f} GB "
                     f"(goal: under {goal:g} GB) {_verdict(largest[key] / GB < goal)}")
    return lines


def _profiles(results: dict) -> list[str]:
    """Where a training step's time goes, per profiled case: by part, then by op kind."""
    lines = []
    for case, (r, _) in results.items():
        rows = step_table(r["profile"]) if r.get("profile") else []
        if rows:
            lines += ["", f"profile of {case}: a training step, {sum(ms for _, ms, _ in rows):.1f} ms on average",
                      f"  {'part':<36} {'ms/step':>8} {'share':>7}"]
            lines += [f"  {part:<36} {ms:>8.2f} {share:>7.1%}" for part, ms, share in rows]
        if r.get("ops"):
            ops, steps = r["ops"], r["ops"]["steps"]
            lines.append(f"  the same steps by op (torch.profiler, {steps} steps from step 60: "
                         f"{ops['wall_ms'] / steps:.1f} ms a step)")
            if "unprofiled_wall_ms" in ops:
                lines.append(f"  (the {steps} steps before, unprofiled: {ops['unprofiled_wall_ms'] / steps:.1f} "
                             f"ms a step; minor page faults a step {ops['unprofiled_faults'] / steps:.0f} unprofiled, "
                             f"{ops['faults'] / steps:.0f} profiled)")
            lines += [f"  {kind:<36} {ms:>8.2f} {share:>7.1%}" for kind, ms, share in op_table(ops)]
    return lines
