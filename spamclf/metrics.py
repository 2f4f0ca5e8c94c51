"""Prometheus metrics of `spamclf.serve`, scraped at `GET /metrics`.

LitServe answers HTTP in a process it forks and runs the model in a process it spawns, so the numbers are
counted where they happen — requests and their latency in the API server (`MetricsMiddleware`), texts and batch
sizes in the inference worker (`record_batch`) — in prometheus_client's multiprocess mode: every process writes
its values to files in a folder the server creates for the run and removes when it stops (`metrics_folder`), and
a scrape sums them. prometheus_client picks that mode when it is imported, from $PROMETHEUS_MULTIPROC_DIR, so it
is imported here only inside functions, after the folder is set. (LitServe's `Logger` hooks would add a process of
their own and serve `/metrics` as a mounted app, which the API key's route dependency does not cover.)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
FOLDER_PREFIX = "spamclf-metrics-"
# Texts per model call: single-text requests batch up to --max-batch-size, a "texts" request brings up to
# --max-texts (256) of its own.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@contextmanager
def metrics_folder() -> Iterator[Path]:
    """A new, empty $PROMETHEUS_MULTIPROC_DIR for the processes the server starts inside the block; removed after."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics folder was set: its values would stay "
                           "in one process; enter metrics_folder() first")
    remove_abandoned_folders(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned_folders(parent: Path) -> None:
    """Remove the metrics folders of this user's servers that were killed before they could (SIGKILL, out of memory):
    a folder is named after its server's process id."""
    for folder in parent.glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-")[0]
        if pid.isdigit() and folder.stat().st_uid == os.getuid() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class ServerMetrics:
    requests: Any
    latency: Any
    batch_texts: Any
    texts: Any


@lru_cache(maxsize=1)
def server_metrics() -> ServerMetrics:
    """This process's metric objects (made on first use, after `metrics_folder` set the mode)."""
    from prometheus_client import Counter, Histogram

    return ServerMetrics(
        requests=Counter("spamclf_requests", "HTTP requests answered, by route and status", ["route", "status"],
                         registry=None),
        latency=Histogram("spamclf_request_seconds", "time from a request's arrival to the end of its answer",
                          ["route"], registry=None),
        batch_texts=Histogram("spamclf_batch_texts", "texts classified in one call of the model",
                              buckets=BATCH_BUCKETS, registry=None),
        texts=Counter("spamclf_texts_classified", "texts classified", registry=None))


def record_batch(texts: int) -> None:
    metrics = server_metrics()
    metrics.batch_texts.observe(texts)
    metrics.texts.inc(texts)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request by route and status and times it. Paths outside `routes` count
    as "other", so probes for random paths do not grow the number of series."""

    def __init__(self, app, routes: tuple[str, ...]):
        self.app, self.routes = app, frozenset(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status, start = 500, time.perf_counter()  # 500 unless the app starts an answer

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            metrics = server_metrics()
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


def metrics_middleware(routes: tuple[str, ...]) -> tuple[type, dict]:
    """The entry for `LitServer(middlewares=[...])`."""
    return MetricsMiddleware, {"routes": (*routes, METRICS_PATH)}


class ModelInfoCollector:
    """`spamclf_model_info{sha256=...,format=...} 1`: which model file answers, for dashboards and alerts."""

    def __init__(self, labels: dict[str, str]):
        self.labels = dict(labels)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("spamclf_model_info", "the model file served", labels=list(self.labels))
        family.add_metric(list(self.labels.values()), 1)
        yield family


def scrape(model_labels: dict[str, str]) -> Callable[[], Any]:
    """The `GET /metrics` endpoint: every process's values summed, and the model's info."""
    def metrics():
        from fastapi import Response
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(ModelInfoCollector(model_labels))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
