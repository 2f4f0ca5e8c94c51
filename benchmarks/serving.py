"""The serve cases: `spamclf.serve` on 127.0.0.1 under single-text requests from the load generator."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from benchmarks.loadgen import run_load
from benchmarks.models import checkpoint_and_messages, model_flags
from benchmarks.processes import tree_rss

SERVE_CONCURRENCY = (1, 8, 32, 128)
BRACKET_REQUESTS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def _server(command: list[str], port: int) -> Iterator[psutil.Process]:
    """The server started by `command`, once it answers /health; stopped (SIGTERM, then SIGKILL) on the way out."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _healthy(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("error: the server did not start")
            time.sleep(0.5)
        yield psutil.Process(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _load(port: int, texts: list[str], concurrency: int, total: int) -> dict:
    """`total` single-text requests from `concurrency` keep-alive connections of one asyncio client process,
    with the client's own CPU time: the load costs the 2 cores little."""
    r = run_load(port, texts, concurrency, total)
    return {"requests": r.requests, "failed": r.failed, "seconds": r.seconds, "rps": r.rps,
            "p50_ms": r.percentile(0.5) * 1000, "p99_ms": r.percentile(0.99) * 1000,
            "client_cpu": r.client_cpu_s / r.seconds if r.seconds else 0.0}


def case_serve(args, engine: str | None = None) -> dict:
    """For each c in SERVE_CONCURRENCY, requests from `c` keep-alive connections: requests/s, p50/p99 latency,
    failures, the server's memory. `engine`: as `model_flags` (serve_int8: "onnx:int8")."""
    engine = engine or f"torch:{args.predict_precision}"
    samples, stop = [], threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        texts, port = checkpoint_and_messages(args, Path(tmp)), _free_port()
        command = [sys.executable, "-m", "spamclf.serve", *model_flags(args, Path(tmp), engine), "--port", str(port),
                   *shlex.split(args.serve_flags)]  # the server's defaults unless --serve-flags names others
        with _server(command, port) as watched:
            def sample():
                while not stop.is_set():
                    samples.append(tree_rss(watched))
                    stop.wait(0.5)

            idle, idle_pss = tree_rss(watched), tree_rss(watched, proportional=True)
            threading.Thread(target=sample, daemon=True).start()
            try:
                first = _bracket(port, texts, watched, min(BRACKET_REQUESTS, args.serve_requests))
                levels = {c: {**_load(port, texts, c, args.serve_requests), "rss_after": tree_rss(watched),
                              "pss_after": tree_rss(watched, proportional=True)} for c in SERVE_CONCURRENCY}
                last = _bracket(port, texts, watched, first["requests"])
            finally:
                stop.set()
    return {"levels": levels, "peak_rss": max(samples) if samples else 0, "rss_idle": idle, "pss_idle": idle_pss,
            "engine": engine, "precision": engine.split(":")[1], "first_1000": first, "last_1000": last}


def _bracket(port: int, texts: list[str], watched: psutil.Process, requests: int) -> dict:
    """`requests` (1,000 at most) at concurrency 32, then the server's memory: run before the levels and after
    them, the two say whether memory grows with the requests served."""
    return {**_load(port, texts, 32, requests), "rss_after": tree_rss(watched),
            "pss_after": tree_rss(watched, proportional=True)}
