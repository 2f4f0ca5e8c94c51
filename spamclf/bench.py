"""Benchmark: the book's recipe as printed vs `experiment=fast` vs a plain transformers loop, plus
all-layers training and prediction throughput. Prints numbers; asserts nothing.

    python -m spamclf.bench                         # everything, gpt2-small-sized, 5 epochs (~40 min on 2 cores)
    python -m spamclf.bench --cases fast,peer --epochs 1 --model gpt2-tiny --predict-lines 2000   # seconds

Weights are random (the open weights cannot be downloaded everywhere); shapes and FLOPs are what
matter for speed, and accuracy is reported next to the book's numbers for the same random start.
Each case runs in its own process, so its wall time includes start-up and its peak RSS is its own.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # a case's wall time counts from here: start-up and imports included

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

CASES = ("ch06", "fast", "peer", "all_layers", "predict", "predict_fp32", "predict_onnx", "predict_int8", "cold_start", "serve",
         "serve_int8", "int8_accuracy")
PREDICT_ENGINES = {"predict_fp32": "torch:fp32", "predict_onnx": "onnx:fp32", "predict_int8": "onnx:int8"}
SERVE_CONCURRENCY = (1, 8, 32, 128)
SERVE_GOAL_CONCURRENCY = 32  # the level compared with the CLI
# experiment=fast with one piece taken away: what each piece contributes (`--cases ablations`).
ABLATIONS = {
    "fast-no_cache": ["model.prefix_cache=false"],
    "fast-full_last_block": ["model.pooled_only=false"],
    "fast-fp32": ["trainer.precision=32-true"],
    "fast-no_bucket": ["data.bucket=false"],
    "fast-pad120": ["data.padding=longest_train", "data.bucket=false"],
}
TRAIN_CASES = {"ch06": ["experiment=ch06"], "fast": ["experiment=fast"],
               "all_layers": ["experiment=fast", "model.trainable_layers=all"],
               **{name: ["experiment=fast", *extra] for name, extra in ABLATIONS.items()}}
BOOK = {"script_min": 16.2, "script_rss_gb": 1.33, "row10_test_acc": 0.9367}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- children
def _compose(overrides: list[str], out: Path):
    from hydra import compose, initialize_config_dir

    conf = ROOT / "conf"
    if not conf.is_dir():
        raise SystemExit(f"error: {conf} not found; run the benchmark from a source checkout")
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={out}", f"paths.log_dir={out}", "paths.root_dir=."])


def _token_counts(cfg) -> dict:
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, output_dir=None)
    dm.setup()
    train = dm.datasets["train"].lengths
    used = len(train) // cfg.data.batch_size * cfg.data.batch_size  # drop_last
    real = {s: sum(dm.datasets[s].lengths) for s in ("train", "val", "test")}
    return {"train_examples": used, "real": real, "pad_length": dm.pad_length, "sizes": {s: len(dm.datasets[s]) for s in real}}


def _gpt_sizes(model_name: str) -> dict:
    from spamclf.gpt2 import preset

    cfg = preset(model_name)
    block = 12 * cfg.emb_dim**2 + 13 * cfg.emb_dim  # the linear weights and biases of one block (+ norms)
    return {"block": block, "layers": cfg.n_layers, "emb_dim": cfg.emb_dim}


def case_train(name: str, args) -> dict:
    """ch06, fast or all_layers through the real pipeline (pipeline.run), random weights."""
    from spamclf.pipeline import run

    experiment = TRAIN_CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        profiler = ["+trainer.profiler._target_=spamclf.profiling.StepProfiler", f"+trainer.profiler.dirpath={tmp}",
                    "+trainer.profiler.filename=profile", "+callbacks.ops._target_=spamclf.profiling.OpProfile",
                    f"+callbacks.ops.dirpath={tmp}", "+callbacks.ops.start=60"] if args.profile else []
        cfg = _compose([*experiment, f"model={args.model}", "model.weights=random", "callbacks=none", "logger=none",
                        "data.natural=false",  # the book's recipe: train, validation and test only
                        "trainer.enable_progress_bar=false", f"trainer.accelerator={args.accelerator}", "trainer.devices=1",
                        f"trainer.max_epochs={args.epochs}", *profiler],
                       Path(tmp))
        summary = run(cfg)
        profile = _fit_profile(Path(tmp)) if args.profile else None
        ops = Path(tmp) / "ops-profile.json"
        ops = json.loads(ops.read_text()) if ops.is_file() else None
    wall = time.perf_counter() - _T0
    tokens = _token_counts(cfg)  # the benchmark's own work: not part of the case's wall time
    return {"wall_s": wall, "bench_s": time.perf_counter() - _T0 - wall, "summary": summary, "tokens": tokens,
            "epochs": args.epochs, "model": args.model,
            "pooling": cfg.model.pooling, "trainable": cfg.model.trainable_layers, "sizes": _gpt_sizes(args.model),
            "pooled_only": bool(cfg.model.pooled_only), "profile": profile, "ops": ops,
            **_device_facts(args)}


def _fit_profile(folder: Path) -> dict | None:
    """The fit stage's profile (StepProfiler writes one file per stage: fit-profile.json, test-profile.json)."""
    from spamclf.profiling import read_profile

    found = sorted(folder.glob("fit-profile*.json"))
    return read_profile(found[0]) if found else None


def print_profiles(results: dict) -> None:
    """Where a training step's time goes, per profiled case."""
    from spamclf.profiling import op_table, step_table

    for case, (r, _) in results.items():
        rows = step_table(r["profile"]) if r.get("profile") else []
        if rows:
            print(f"\nprofile of {case}: a training step, {sum(ms for _, ms, _ in rows):.1f} ms on average")
            print(f"  {'part':<36} {'ms/step':>8} {'share':>7}")
            for part, ms, share in rows:
                print(f"  {part:<36} {ms:>8.2f} {share:>7.1%}")
        if r.get("ops"):
            steps = r["ops"]["steps"]
            print(f"  the same steps by op (torch.profiler, {steps} steps from step 60: {r['ops']['wall_ms'] / steps:.1f} ms a step)")
            if "unprofiled_wall_ms" in r["ops"]:
                print(f"  (the {steps} steps before, unprofiled: {r['ops']['unprofiled_wall_ms'] / steps:.1f} ms a step; minor page "
                      f"faults a step {r['ops']['unprofiled_faults'] / steps:.0f} unprofiled, {r['ops']['faults'] / steps:.0f} profiled)")
            for kind, ms, share in op_table(r["ops"]):
                print(f"  {kind:<36} {ms:>8.2f} {share:>7.1%}")


def _device_facts(args) -> dict:
    """The card's name and this process's peak GPU memory, on GPU runs."""
    if args.accelerator != "gpu":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024**3}


def case_peer(args) -> dict:
    """A plain transformers GPT-2 loop, the book's recipe: last block + ln_f + head, last position, fp32,
    AdamW 5e-5 / 0.1, the same padded batches in the same order."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from spamclf.datamodule import SpamDataModule
    from spamclf.gpt2 import preset

    torch.manual_seed(123)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    g = preset(args.model)
    config = GPT2Config(n_embd=g.emb_dim, n_layer=g.n_layers, n_head=g.n_heads, n_positions=g.context_length,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    body = GPT2Model(config).to(device)  # transformers' default attention: SDPA
    head = torch.nn.Linear(g.emb_dim, 2).to(device)
    body.requires_grad_(False)
    body.h[-1].requires_grad_(True)
    body.ln_f.requires_grad_(True)
    params = [p for p in (*body.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    dm = SpamDataModule()
    dm.setup()

    def logits(batch):
        return head(body(input_ids=batch["input_ids"].to(device)).last_hidden_state[:, -1])

    def accuracy(loader):
        body.eval()
        right = total = 0
        with torch.inference_mode():
            for batch in loader:
                right += int((logits(batch).argmax(-1).cpu() == batch["labels"]).sum())
                total += len(batch["labels"])
        body.train()
        return right / total

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(logits(batch), batch["labels"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy(dm.val_dataloader())
    fit = time.perf_counter() - t0
    test_acc = accuracy(dm.test_dataloader())
    return {"wall_s": time.perf_counter() - _T0, "fit_s": fit, "test_acc": test_acc, "epochs": args.epochs, **_device_facts(args)}


def _checkpoint_and_messages(args, tmp: Path) -> list[str]:
    """A checkpoint of `args.model` (random weights, one training step, pooling=last_nonpad) at tmp/model.ckpt,
    and the SMS collection's messages."""
    import lightning as L

    from spamclf.datamodule import SpamDataModule
    from spamclf.module import SpamClassifier
    from spamclf.reading import SMS_FILE, read_labelled_file
    from spamclf.tokenizer import asset_path

    L.seed_everything(123)
    dm = SpamDataModule(padding="batch", bucket=True, natural=False)
    clf = SpamClassifier(args.model, weights="random", pooling="last_nonpad", prefix_cache=False)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(clf, datamodule=dm)
    trainer.save_checkpoint(tmp / "model.ckpt")
    return read_labelled_file(asset_path(SMS_FILE))["text"].tolist()


def _tree_rss(process, proportional: bool = False) -> int:
    """Resident memory of a process and all its children. `proportional`: PSS, where pages that forked processes
    share (LitServe forks its API server from the main process) count once in all instead of once per process."""
    import psutil

    total = 0
    for p in (process, *process.children(recursive=True)):
        try:
            total += p.memory_full_info().pss if proportional else p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _export_graph(tmp: Path, quantize: bool) -> Path:
    """The bench checkpoint exported to ONNX (fp32, or int8 weights) at tmp/<kind>/model.onnx."""
    out = tmp / ("int8" if quantize else "fp32")
    command = [sys.executable, "-m", "spamclf.export", "--ckpt", str(tmp / "model.ckpt"), "--out", str(out), "--format", "onnx",
               *(["--quantize", "int8"] if quantize else [])]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: export failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out / "model.onnx"


def _model_flags(args, tmp: Path, engine: str) -> list[str]:
    """predict/serve flags for an engine: torch at a precision ("torch:fp32", "torch:auto") or "onnx:fp32"/"onnx:int8"."""
    kind, what = engine.split(":")
    if kind == "onnx":
        return ["--onnx", str(_export_graph(tmp, what == "int8"))]
    return ["--ckpt", str(tmp / "model.ckpt"), "--precision", what, "--device", "cuda" if args.accelerator == "gpu" else "cpu"]


def _watched_run(command: list[str]) -> dict:
    """Run `command`, sampling its RSS; `loaded_s`: when it printed its first stderr line (the model is loaded then);
    `cpu_s`: the CPU time it used (user + system), which a busy machine does not inflate as it does wall time."""
    import resource
    import threading

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    watched, samples, stderr, loaded = psutil.Process(proc.pid), [], [], []

    def read_stderr():
        for line in proc.stderr:
            loaded.append(loaded[0] if loaded else time.perf_counter() - start)
            stderr.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            samples.append(watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.25)
    reader.join()
    proc.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {command[2]} failed: {stderr[-1:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "loaded_s": loaded[0] if loaded else 0.0, "rss": samples, "stderr": "".join(stderr)}


def case_predict(args, engine: str | None = None) -> dict:
    """The prediction CLI on an N-line file of SMS messages, from a saved checkpoint or its ONNX export."""
    from spamclf.tokenizer import encode_texts

    engine = engine or f"torch:{args.predict_precision}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = _checkpoint_and_messages(args, tmp)
        lines = [texts[i % len(texts)].replace("\n", " ") for i in range(args.predict_lines)]
        (tmp / "in.txt").write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "spamclf.predict", *_model_flags(args, tmp, engine), "--input", str(tmp / "in.txt"),
                   "--output", str(tmp / "out.jsonl"), "--chunk-size", "4096"]
        run = _watched_run(command)
        precision = next((ln.split(" -> ")[1].split(":")[0] for ln in run["stderr"].splitlines() if ln.startswith("precision ")), "?")
        written = sum(1 for _ in open(tmp / "out.jsonl"))
    tokens = sum(len(t) for t in encode_texts(lines[: len(texts)]))
    mean_tokens = tokens / min(len(texts), len(lines))
    rss = run["rss"]
    # Memory over time: the first quarter (model loaded, first chunks) against the rest.
    quarter = max(1, len(rss) // 4)
    return {"wall_s": run["wall_s"], "loaded_s": run["loaded_s"], "lines": written, "mean_tokens": mean_tokens,
            "peak_rss": max(rss) if rss else 0, "precision": precision, "engine": engine,
            "rss_first_quarter": max(rss[:quarter]) if rss else 0, "rss_rest": max(rss[quarter:] or rss[:1]) if rss else 0,
            "sizes": _gpt_sizes(args.model)}


def case_cold_start(args) -> dict:
    """One message, process start to answer: `predict --onnx` (int8) against `predict --ckpt`, the median of 5 runs."""
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _checkpoint_and_messages(args, tmp)
        result = {}
        for engine in ("onnx:int8", "torch:auto"):
            command = [sys.executable, "-m", "spamclf.predict", *_model_flags(args, tmp, engine), "--text", "WINNER!! Claim now"]
            runs = [_watched_run(command) for _ in range(5)]
            walls = [r["wall_s"] for r in runs]
            result[engine] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                              "cpu_median_s": statistics.median(r["cpu_s"] for r in runs)}
    return {"runs": result}


def _rates(predictions, labels: list[str], positive: str) -> dict:
    """False-positive rate and recall of `predictions` against the true `labels`."""
    flagged = [p.label == positive for p in predictions]
    negatives = [f for f, y in zip(flagged, labels) if y != positive]
    positives = [f for f, y in zip(flagged, labels) if y == positive]
    return {"fpr": sum(negatives) / max(len(negatives), 1), "recall": sum(positives) / max(len(positives), 1),
            "false_positives": f"{sum(negatives)} of {len(negatives)}", "caught": f"{sum(positives)} of {len(positives)}"}


def case_int8_accuracy(args) -> dict:
    """For each run folder in --runs: the int8 graph's labels against the fp32 checkpoint's on the run's test and
    natural splits (test.csv, natural.csv), and FPR/recall at the checkpoint's threshold for both."""
    import pandas as pd

    from spamclf.inference import Classifier
    from spamclf.onnx_classifier import OnnxClassifier

    results = {}
    for run in filter(None, args.runs.split(",")):
        run = Path(run)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "model.ckpt").symlink_to((run / "checkpoints" / "last.ckpt").resolve())
            torch_side = Classifier.load(tmp / "model.ckpt", precision="fp32")
            int8 = OnnxClassifier.load(_export_graph(tmp, quantize=True))
            positive = torch_side.decision.positive_label
            splits = {}
            for split in ("validation", "test", "natural"):
                frame = pd.read_csv(run / f"{split}.csv")
                texts, labels = frame["text"].astype(str).tolist(), frame["label"].astype(str).tolist()
                a, b = torch_side.predict(texts), int8.predict(texts)
                splits[split] = {"count": len(texts), "agreement": sum(x.label == y.label for x, y in zip(a, b)) / len(texts),
                                 "fp32": _rates(a, labels, positive), "int8": _rates(b, labels, positive)}
        results[str(run)] = {"model": torch_side.about.get("model_name"), "threshold": torch_side.decision.threshold,
                             "splits": splits}
    return {"runs": results}


def case_serve(args, engine: str | None = None) -> dict:
    """`spamclf.serve` on 127.0.0.1 under single-text requests from `c` keep-alive connections of one asyncio
    client process, for each c in SERVE_CONCURRENCY: requests/s, p50/p99 latency, failures, the server's memory.
    `engine`: as `_model_flags` (serve_int8: "onnx:int8")."""
    import socket
    import threading

    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = _checkpoint_and_messages(args, tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        engine = engine or f"torch:{args.predict_precision}"
        command = [sys.executable, "-m", "spamclf.serve", *_model_flags(args, tmp, engine), "--port", str(port),
                   *shlex.split(args.serve_flags)]  # the server's defaults unless --serve-flags names others
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        watched, samples, stop = psutil.Process(server.pid), [], threading.Event()
        try:
            deadline = time.monotonic() + 300
            while not _healthy(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("error: the server did not start")
                time.sleep(0.5)

            def sample():
                while not stop.is_set():
                    samples.append(_tree_rss(watched))
                    stop.wait(0.5)

            idle, idle_pss = _tree_rss(watched), _tree_rss(watched, proportional=True)
            threading.Thread(target=sample, daemon=True).start()
            levels = {c: {**_load(port, texts, c, args.serve_requests), "rss_after": _tree_rss(watched),
                          "pss_after": _tree_rss(watched, proportional=True)} for c in SERVE_CONCURRENCY}
        finally:
            stop.set()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return {"levels": levels, "peak_rss": max(samples) if samples else 0, "rss_idle": idle, "pss_idle": idle_pss, "engine": engine,
            "precision": engine.split(":")[1]}


def _load(port: int, texts: list[str], concurrency: int, total: int) -> dict:
    """`total` single-text requests from `concurrency` keep-alive connections of one asyncio client process
    (spamclf.loadgen), with the client's own CPU time: the load costs the 2 cores little."""
    from spamclf.loadgen import run_load

    r = run_load(port, texts, concurrency, total)
    return {"requests": r.requests, "failed": r.failed, "seconds": r.seconds, "rps": r.rps,
            "p50_ms": r.percentile(0.5) * 1000, "p99_ms": r.percentile(0.99) * 1000,
            "client_cpu": r.client_cpu_s / r.seconds if r.seconds else 0.0}


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def child(case: str, args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    cases = {"peer": case_peer, "predict": case_predict, "serve": case_serve, "cold_start": case_cold_start,
             "int8_accuracy": case_int8_accuracy,
             "serve_int8": lambda a: case_serve(a, "onnx:int8"),
             **{name: (lambda a, e=engine: case_predict(a, e)) for name, engine in PREDICT_ENGINES.items()}}
    result = cases[case](args) if case in cases else case_train(case, args)
    print("BENCH " + json.dumps(result, default=str), flush=True)


# ---------------------------------------------------------------------------------------------- parent
def _peak_rss_of(case: str, args) -> tuple[dict, int]:
    """Run a case and read its own peak RSS from the kernel (wait4), not from sampling."""
    command = [sys.executable, "-m", "spamclf.bench", "--child", case, "--epochs", str(args.epochs), "--model", args.model,
               "--predict-lines", str(args.predict_lines), "--accelerator", args.accelerator,
               "--predict-precision", args.predict_precision, "--serve-requests", str(args.serve_requests), f"--serve-flags={args.serve_flags}", "--runs", args.runs,
               *(["--profile"] if args.profile else [])]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: bench case {case} failed: {' | '.join(tail)}")
    result = json.loads(line[6:])
    result["process_s"] = time.perf_counter() - start - result.get("bench_s", 0.0)
    return result, usage.ru_maxrss * 1024  # Linux reports KiB


def _padded_positions(tokens: dict):
    """Positions the model computes per split: the fixed width × rows, or the real tokens (per-batch padding
    with length buckets leaves almost none)."""
    width = tokens["pad_length"]
    return lambda split: width * tokens["sizes"][split] if width else tokens["real"][split]


def _last_block_flops(sizes: dict, tokens: int, rows: int, pooled_only: bool, backward: bool) -> float:
    """FLOPs of the trainable last block (2 per weight and token forward; backward twice that). With
    pooled_only, every token needs only its key and value (2·D² weights), each row one query, attention
    output and feed-forward (10·D²)."""
    d2 = sizes["emb_dim"] ** 2
    forward = 2 * (2 * d2 * tokens + 10 * d2 * rows) if pooled_only else 2 * sizes["block"] * tokens
    return forward * (3 if backward else 1)


def _gflops(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e9:.0f}" if seconds > 0 else "-"


def _cpu_name() -> str:
    from spamclf.precision import cpu

    return cpu().model


def cpu_header() -> str:
    """The CPU as the precision choice sees it, and its measured matmul rates."""
    import torch

    from spamclf.precision import cpu, cpu_bf16_summary, matmul_gflops, resolve

    info = cpu()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return (f"CPU: {info.model}; torch capability {info.capability}; {cpu_bf16_summary()}; "
            f"1024² matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s ({bf16 / fp32:.2f}x); "
            f"precision auto -> {resolve('auto', 'cpu').lightning}")


def _report_serve(results: dict, name: str) -> None:
    gb = 1024**3
    r, _ = results[name]
    print(f"\nserver (spamclf.serve, {r.get('engine', r['precision'])}, single-text requests from a Python client on 127.0.0.1, "
          f"memory of the server's processes loaded and idle: RSS {r.get('rss_idle', 0) / gb:.2f} GB summed, "
          f"PSS {r.get('pss_idle', 0) / gb:.2f} GB; peak RSS {r['peak_rss'] / gb:.2f} GB):")
    print(f"  {'concurrency':>11} {'requests':>9} {'failed':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'RSS after GB':>13} "
          f"{'PSS after GB':>13} {'client CPU':>11}")
    for c, level in r["levels"].items():
        print(f"  {c:>11} {level['requests']:>9} {level['failed']:>7} {level['rps']:>8.1f} {level['p50_ms']:>8.1f} "
              f"{level['p99_ms']:>8.1f} {level['rss_after'] / gb:>13.2f} {level.get('pss_after', 0) / gb:>13.2f} "
              f"{level.get('client_cpu', float('nan')):>11.0%}")
    if "predict" in results and name == "serve":
        cli = results["predict"][0]["lines"] / results["predict"][0]["wall_s"]
        goal = r["levels"].get(str(SERVE_GOAL_CONCURRENCY), {}).get("rps", float("nan"))
        print(f"  at concurrency {SERVE_GOAL_CONCURRENCY}: {goal / cli:.0%} of the CLI's {cli:.0f} messages/s")


def int8_kernel() -> str:
    """The int8 GEMM kernel family ONNX Runtime's MLAS dispatches to on this CPU, from the CPU flags it checks
    (AMX int8, then AVX512-VNNI, AVX-VNNI, AVX512 core, AVX2)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith(("flags", "Features"))), set())
    except OSError:
        pass
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx512bw", "AVX512BW (no VNNI)"), ("avx2", "AVX2 (no VNNI)"), ("asimddp", "ARM dot product")):
        if flag in flags:
            return name
    return "generic (no AVX2)"


def _report_engines(results: dict) -> None:
    """predict over the same file with each engine: messages/s after the model is loaded and with start-up."""
    gb = 1024**3
    rows = [(name, *results[name]) for name in ("predict_fp32", "predict", "predict_onnx", "predict_int8") if name in results]
    if not rows:
        return
    import onnxruntime

    base = next((r["lines"] / (r["wall_s"] - r["loaded_s"]) for name, r, _ in rows if name == "predict_fp32"), None)
    print(f"\nprediction engines (ONNX Runtime {onnxruntime.__version__}, int8 kernels: {int8_kernel()}), "
          f"{rows[0][1]['lines']} lines each:")
    print(f"  {'case':<14}{'engine':<12}{'precision':>10}{'load s':>8}{'msg/s loaded':>14}{'msg/s wall':>12}{'peak RSS GB':>13}{'vs fp32':>9}")
    for name, r, _ in rows:
        rss = r["peak_rss"]  # the predict process's own, sampled
        rate = r["lines"] / max(r["wall_s"] - r["loaded_s"], 1e-9)
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(f"  {name:<14}{r['engine'].split(':')[0]:<12}{r['precision']:>10}{r['loaded_s']:>8.1f}{rate:>14.1f}"
              f"{r['lines'] / r['wall_s']:>12.1f}{rss / gb:>13.2f}{ratio:>9}")
    if "cold_start" in results:
        for engine, run in results["cold_start"][0]["runs"].items():
            print(f"  cold start, one message, {engine:<11} median {run['median_s']:.2f} s (min {run['min_s']:.2f}, max {run['max_s']:.2f}) "
                  f"process start to answer, {run.get('cpu_median_s', float('nan')):.2f} s of CPU")


def _report_int8_accuracy(result: dict) -> None:
    print("\nint8 graph against its fp32 checkpoint (labels at the checkpoint's threshold):")
    print(f"  {'run':<28}{'split':<12}{'messages':>9}{'agree':>9}{'FPR fp32':>10}{'FPR int8':>10}{'recall fp32':>13}{'recall int8':>13}")
    for run, r in result["runs"].items():
        for split, m in r["splits"].items():
            print(f"  {(r['model'] or '?') + ' ' + Path(run).name:<28}{split:<12}{m['count']:>9}{m['agreement']:>9.2%}"
                  f"{m['fp32']['fpr']:>10.2%}{m['int8']['fpr']:>10.2%}{m['fp32']['recall']:>13.2%}{m['int8']['recall']:>13.2%}")


def report(results: dict, args) -> None:
    gb = 1024**3
    cards = sorted({r[0]["gpu"] for r in results.values() if "gpu" in r[0]})
    machine = f"{', '.join(cards)} (+ {_cpu_name()})" if cards else f"{_cpu_name()}, {os.cpu_count()} cores"
    print(f"\nspamclf benchmark — {args.model} (random weights), {args.epochs} epoch(s), batch 8; "
          f"{machine}, torch {__import__('torch').__version__}")
    print(cpu_header() + "\n")
    rows = []
    for case in ("ch06", "fast", "all_layers", *ABLATIONS):
        if case not in results:
            continue
        r, rss = results[case]
        s, t = r["summary"], r["tokens"]
        fit = s["timings"].get("fit_s", 0.0)
        examples = t["train_examples"] * r["epochs"]
        train_real = t["real"]["train"] * t["train_examples"] / t["sizes"]["train"] * r["epochs"]
        rows.append((case, r["process_s"], fit, examples / fit, train_real / fit, rss / gb, s.get("test", {}).get("acc"),
                     r.get("gpu_peak_gb"), s.get("precision", {}).get("used", "?")))
        # FLOPs: 2 per weight per token forward, 4 more backward; the frozen prefix (or the whole model when
        # nothing is cached) forward on every split once per pass, the trainable blocks forward+backward.
        z = r["sizes"]
        blk = z["block"]
        pad = _padded_positions(t)
        cache_s = s["timings"].get("prefix_cache_s", 0.0)  # every split's cache; the test split's is built after fit
        fit_cache_s = s["timings"].get("prefix_cache_fit_s", cache_s)
        if case == "fast":
            prefix_flops = 2 * (z["layers"] - 1) * blk * sum(pad(sp) for sp in ("train", "val", "test"))
            n = t["sizes"]
            suffix = (_last_block_flops(z, pad("train"), n["train"], r["pooled_only"], backward=True)
                      + _last_block_flops(z, pad("val"), n["val"], r["pooled_only"], backward=False)) * r["epochs"]
            r["phases"] = {"prefix cache": (prefix_flops, cache_s), "suffix training + eval": (suffix, fit - fit_cache_s)}
        elif case == "ch06":
            per_epoch = 2 * z["layers"] * blk * pad("train") + 4 * blk * pad("train") + 2 * z["layers"] * blk * pad("val")
            r["phases"] = {"fit (all forward, last block backward)": (per_epoch * r["epochs"], fit)}
        elif case == "all_layers":
            r["phases"] = {"fit (all layers forward + backward)": (6 * z["layers"] * blk * pad("train") * r["epochs"], fit)}
    gpu = bool(cards)
    header = (f"{'case':<22}{'precision':>11}{'wall s':>9}{'fit s':>9}{'outside fit':>13}{'train ex/s':>12}{'tokens/s':>11}"
              f"{'peak RSS GB':>13}{'GPU GB' if gpu else '':>8}{'test acc':>10}")
    if rows:
        print(header)
        print("-" * len(header))
    for case, wall, fit, ex, tok, rss, acc, gpu_gb, precision in rows:
        gpu_col = f"{gpu_gb:>8.2f}" if gpu_gb is not None else f"{'':>8}"
        print(f"{case:<22}{precision:>11}{wall:>9.1f}{fit:>9.1f}{wall - fit:>13.1f}{ex:>12.1f}{tok:>11.0f}{rss:>13.2f}{gpu_col}"
              f"{acc if acc is not None else float('nan'):>10.4f}")
    if "peer" in results:
        r, rss = results["peer"]
        gpu_col = f"{r['gpu_peak_gb']:>8.2f}" if "gpu_peak_gb" in r else f"{'':>8}"
        print(f"{'peer (hf)':<22}{'32-true':>11}{r['process_s']:>9.1f}{r['fit_s']:>9.1f}{r['process_s'] - r['fit_s']:>13.1f}{'':>12}"
              f"{'':>11}{rss / gb:>13.2f}{gpu_col}{r['test_acc']:>10.4f}")
    print()
    if "ch06" in results and "fast" in results:
        a, b = results["ch06"][0], results["fast"][0]
        print(f"fast vs ch06: {a['process_s'] / b['process_s']:.1f}x wall, "
              f"{a['summary']['timings']['fit_s'] / b['summary']['timings']['fit_s']:.1f}x fit")
    if "peer" in results and "fast" in results:
        print(f"fast vs peer: {results['peer'][0]['process_s'] / results['fast'][0]['process_s']:.1f}x wall")
    if "ch06" in results and "peer" in results:
        print(f"ch06 vs peer: {results['peer'][0]['process_s'] / results['ch06'][0]['process_s']:.2f}x wall")
    print(f"book's own script, same recipe, this CPU: {BOOK['script_min']} min, {BOOK['script_rss_gb']} GB peak RSS (issue #5)")
    for case in ("ch06", "fast", "all_layers"):
        if case in results:
            for phase, (flops, seconds) in results[case][0].get("phases", {}).items():
                print(f"  {case:<11} {phase:<40} {flops / 1e12:7.2f} TFLOP in {seconds:6.1f} s = {_gflops(flops, seconds):>5} GFLOP/s")
    if "all_layers" in results:
        acc = results["all_layers"][0]["summary"].get("test", {}).get("acc")
        print(f"all layers from random init: test acc {acc:.4f} vs the book's row 10: {BOOK['row10_test_acc']:.4f}")
    ablations = [name for name in ABLATIONS if name in results]
    if ablations:
        base = results.get("fast")
        print("\nexperiment=fast with one piece taken away:")
        for name in ablations:
            r, rss = results[name]
            ratio = f", {r['process_s'] / base[0]['process_s']:.2f}x fast's wall" if base else ""
            print(f"  {name:<22} {' '.join(ABLATIONS[name]):<50} wall {r['process_s']:6.1f} s, fit "
                  f"{r['summary']['timings']['fit_s']:6.1f} s, peak RSS {rss / gb:.2f} GB, test acc "
                  f"{r['summary'].get('test', {}).get('acc', float('nan')):.4f}{ratio}")
    for name in ("serve", "serve_int8"):
        if name in results:
            _report_serve(results, name)
    _report_engines(results)
    if "int8_accuracy" in results:
        _report_int8_accuracy(results["int8_accuracy"][0])
    if "predict" in results:
        r, rss = results["predict"]
        rate = r["lines"] / r["wall_s"]
        z = r["sizes"]
        flops = (2 * (z["layers"] - 1) * z["block"] * r["mean_tokens"] * r["lines"]
                 + _last_block_flops(z, r["mean_tokens"] * r["lines"], r["lines"], pooled_only=True, backward=False))
        print(f"prediction ({r['precision']}): {r['lines']} lines in {r['wall_s']:.1f} s = {rate:.0f} messages/s (start-up included), "
              f"~{r['mean_tokens']:.1f} tokens/message, {_gflops(flops, r['wall_s'])} GFLOP/s; "
              f"peak RSS {rss / gb:.2f} GB (first quarter {r['rss_first_quarter'] / gb:.2f} GB, rest {r['rss_rest'] / gb:.2f} GB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spamclf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}, ablations or {', '.join(ABLATIONS)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="gpt2-small", help="a model preset (gpt2-tiny for a smoke check)")
    parser.add_argument("--predict-lines", type=int, default=100_000)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"), help="gpu: one CUDA device")
    parser.add_argument("--predict-precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="the prediction case's --precision")
    parser.add_argument("--serve-requests", type=int, default=2000, help="requests per concurrency level in the serve case")
    parser.add_argument("--profile", action="store_true",
                        help="profile the training cases' steps (Lightning's SimpleProfiler) and print where a step's time goes")
    parser.add_argument("--serve-flags", default="", help='spamclf.serve flags for the serve cases, as one argument: --serve-flags="--max-batch-size 32"')
    parser.add_argument("--runs", default="", help="int8_accuracy: comma-separated run folders (checkpoints/last.ckpt, "
                        "validation.csv, test.csv, natural.csv)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [name for c in cases for name in (ABLATIONS if c == "ablations" else [c])]
    known = (*CASES, *ABLATIONS)
    unknown = sorted(set(cases) - set(known))
    if unknown:
        print(f"error: --cases {','.join(unknown)} unknown; choose from {', '.join(known)}, ablations", file=sys.stderr)
        return 2
    results = {}
    for case in [c for c in known if c in cases]:
        print(f"running {case} …", file=sys.stderr, flush=True)
        results[case] = _peak_rss_of(case, args)
    report(results, args)
    print_profiles(results)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"result": v[0], "peak_rss": v[1]} for k, v in results.items()}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
