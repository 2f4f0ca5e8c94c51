"""Serve a trained checkpoint over HTTP, with dynamic batching (LitServe).

    python -m spamclf.serve --ckpt logs/train/runs/<run>/checkpoints/last.ckpt [--port 8000]
    python -m spamclf.serve --onnx DIR/model.onnx      # an exported graph in ONNX Runtime: no torch imported
    curl -s localhost:8000/predict -H 'Content-Type: application/json' -d '{"text": "WINNER! Claim your prize"}'

`POST /predict` takes {"text": "..."} or {"texts": ["...", ...]} and answers with the objects that
`spamclf.predict` writes, in order ({"predictions": [...]} for "texts"). Requests that arrive together
(up to --max-batch-size, waiting at most --batch-timeout seconds) are classified in one call of the
classifier's `predict` (`spamclf.load`: `Classifier` or `OnnxClassifier`), the same path as the CLI, at the
precision `auto` picks for the hardware. `GET /` is a page to try it in a browser (`spamclf.page`);
`GET /health` is 200 once the model is loaded; `GET /info` describes the model; `GET /metrics` is for Prometheus
(`spamclf.metrics`).

With a key (--api-key-file FILE, or $SPAMCLF_API_KEY) every route but /health answers 401 unless the request
carries it as `X-API-Key: KEY` or `Authorization: Bearer KEY` (`spamclf.api_key`); the page asks for it.

Requests are checked before they reach the model (FastAPI + pydantic): a body that is not JSON, without
"text"/"texts", with a non-string, an empty list or more than --max-texts texts is a 422 naming the
problem; a body over --max-body-bytes is a 413. The server goes on serving.

`"explain": true` (at most MAX_EXPLAIN_TEXTS texts; `"method"`: "occlusion" or "ig") adds each word's contribution
(`spamclf.explain`) under "explanation". A worker of its own computes them (`spamclf.explain_route`), so requests
without it are not held back; a server of an ONNX graph has no network to explain and answers 400.
"""

# No `from __future__ import annotations`: LitServe reads `decode_request`'s annotation as an object (the
# pydantic model that validates requests), and a postponed annotation would be a string.
import argparse
import os
import signal
import sys
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import litserve as ls
from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

import spamclf
from spamclf.api_key import KEY_ENV, KEY_FLAG, KeyCheck, exposure_warning, read_api_key
from spamclf.classifier import release_freed_memory
from spamclf.errors import SpamclfError
from spamclf.explain_route import EXPLAIN_PATH, PREDICT_PATH, explain_route_middleware
from spamclf.metrics import METRICS_PATH, metrics_folder, metrics_middleware, record_batch, scrape
from spamclf.page import page_middleware
from spamclf.predict import add_model_flags, model_source

# Chosen by measurement (docs/serving.md#load, 2-core AMX Xeon, single-text requests): in three paired runs batches
# of at most 16 served concurrency 32 4-24% and 128 -0.4-13% more requests/s than 32, with a lower p99 (one batch
# is classified while the next gathers); a 5 ms wait served a lone client 33-34 req/s against 25-27 with 10 ms.
MAX_BATCH_SIZE = 16
BATCH_TIMEOUT = 0.005
# Inference workers on a CPU, sharing its cores (one thread each on 2 cores). Chosen by measurement
# (docs/serving.md#load): OpenMP's threads of one worker wait for each other at every operation, and each wait
# lasts as long as the core is busy elsewhere (the HTTP server, the other worker, anything else on the machine).
CPU_WORKERS = 2
# An explanation costs a forward pass per word: a few texts keep one request's answer within seconds.
MAX_EXPLAIN_TEXTS = 8
ONNX_REFUSAL = ('"explain" needs the torch network: this server runs an ONNX graph, which cannot be explained; '
                "serve the checkpoint with --ckpt")
OFF_REFUSAL = '"explain" is off on this server (started with --no-explain); start it without that flag to explain'


class PredictRequest(BaseModel):
    """One text, or a list of texts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # Set by `build_server` before the server starts; LitServe forks its API servers, which keep it.
    max_texts: ClassVar[int] = 256
    refusal: ClassVar[str | None] = None  # why "explain" is refused (an ONNX graph, --no-explain); None: explained
    text: str | None = Field(default=None, description="a message to classify")
    texts: list[str] | None = Field(default=None, min_length=1, description="messages to classify, answered in order")
    explain: bool = Field(default=False, description="add each word's contribution under \"explanation\"")
    method: Literal["occlusion", "ig"] | None = Field(default=None, description='with "explain": occlusion (the '
                                                      "default) or ig (integrated gradients)")

    @model_validator(mode="after")
    def one_of_text_or_texts(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError('give exactly one of "text" (a string) or "texts" (a non-empty list of strings)')
        count = 1 if self.texts is None else len(self.texts)
        if self.explain:
            self.check_explainable(count)
        elif self.method is not None:
            raise ValueError('"method" chooses how to explain: add "explain": true or drop "method"')
        limit = type(self).max_texts
        if count > limit:
            raise ValueError(f'"texts" holds {count} texts, more than the server takes in one request '
                             f"({limit}); send several requests")
        return self

    def check_explainable(self, count: int) -> None:
        if type(self).refusal:
            # Not a ValueError: pydantic would make it a 422; FastAPI answers an HTTPException as it is.
            raise HTTPException(400, type(self).refusal)
        if count > MAX_EXPLAIN_TEXTS:
            raise ValueError(f'"explain" takes at most {MAX_EXPLAIN_TEXTS} texts in one request, and "texts" holds '
                             f"{count}; send several requests")


class Decoded(NamedTuple):
    texts: list[str]
    many: bool  # "texts" (answered as {"predictions": [...]}) rather than "text"
    method: str | None  # how to explain them, where the request asks for explanations; None: the default


class ModelAPI(ls.LitAPI):
    """What both workers share: the model they load, who may call them, requests in and answers out. `model` and
    `options`: what `spamclf.load` gets (a .ckpt or .onnx path; device, precision, threads); `key_check`: who may
    call it (LitServe's `authorize` hook; by default everyone)."""

    def __init__(self, model: str, options: dict | None = None, batch_tokens: int = 2048,
                 key_check: KeyCheck | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.options, self.batch_tokens = str(model), dict(options or {}), batch_tokens
        self.key_check = key_check or KeyCheck()

    def authorize(self, request: Request) -> None:
        """A FastAPI dependency LitServe puts on /predict, /info and /health (`KeyCheck` leaves /health open)."""
        self.key_check(request)

    def setup(self, device):
        self.model = spamclf.load(self.model_path, **self.options)
        self.model.predict(["warm-up"])  # kernels built off the clock

    def decode_request(self, request: PredictRequest) -> Decoded:
        texts, many = ([request.text], False) if request.text is not None else (list(request.texts), True)
        return Decoded(texts, many, request.method)

    def encode_response(self, output) -> dict:
        results, many = output
        return {"predictions": results} if many else results[0]


class SpamClassifierAPI(ModelAPI):
    """LitServe's view of a model: decode → batch → the classifier's `predict` → unbatch → encode."""

    def batch(self, inputs):
        return inputs

    def predict(self, inputs):
        texts = [t for request in inputs for t in request.texts]
        record_batch(len(texts))
        results = iter(p.as_dict() for p in self.model.predict(texts, batch_tokens=self.batch_tokens))
        return [([next(results) for _ in request.texts], request.many) for request in inputs]

    def unbatch(self, output):
        return output


class ExplainingAPI(ModelAPI):
    """The worker behind EXPLAIN_PATH: one request at a time, each text's prediction with its explanation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, api_path=EXPLAIN_PATH, max_batch_size=1, **kwargs)

    def setup(self, device):
        super().setup(device)
        from spamclf.explain import explain

        explain(self.model, ["warm-up"])

    def predict(self, request: Decoded):
        from spamclf.explain import DEFAULT_METHOD, explain

        record_batch(len(request.texts))
        rows = [p.as_dict() for p in self.model.predict(request.texts, batch_tokens=self.batch_tokens)]
        for row, explanation in zip(rows, explain(self.model, request.texts, method=request.method or DEFAULT_METHOD)):
            row["explanation"] = explanation.as_dict()
        return rows, request.many


class Server(ls.LitServer):
    """A LitServer whose own routes (/info; / and /health, which `KeyCheck` leaves open) ask the classifying API's
    `authorize` when it serves an explaining one too."""

    def setup_auth(self, lit_api: ls.LitAPI | None = None):
        return litserve_route_auth(super().setup_auth, self.lit_api, lit_api)


def litserve_route_auth(setup_auth, apis, lit_api: ls.LitAPI | None):
    """LitServe 0.2.19's `LitServer.setup_auth()` (undocumented) looks for `authorize` on `self.lit_api`, which a
    server of several APIs sets to their list, finds none and leaves its own routes open: /info would answer without
    the key (Lightning-AI/LitServe#659). Ask the first API instead. tests/test_upstream.py fails when a LitServe
    release fixes this or changes the method; tests/test_serve_ops.py checks /info's 401."""
    return setup_auth(lit_api or (apis[0] if isinstance(apis, list) else None))


def build_server(model: str, options: dict | None = None, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout: float = BATCH_TIMEOUT, max_body_bytes: int = 1 << 20, batch_tokens: int = 2048,
                 timeout: float = 30, max_texts: int = 256, api_key: str | None = None, explain: bool = True,
                 workers: int | None = None):
    """A server of the classifier `spamclf.load(model, **options)` opens (a .ckpt or .onnx path), open to callers
    with `api_key` (everyone when None). `explain`: a second worker, with its own copy of the model, explains
    (checkpoints only). `workers`: classifying processes (None: `worker_plan`'s choice). Run it inside
    `spamclf.metrics.metrics_folder()` for /metrics."""
    options = dict(options or {})
    device = options.get("device") or "cpu"
    workers, threads = worker_plan(device, workers)
    # Read once here for /info (a bad file fails here, in one line); the inference worker loads its own copy.
    classifier = spamclf.load(model, **options)
    info = {**classifier.info(), "limits": {"max_texts": max_texts, "max_body_bytes": max_body_bytes}}
    del classifier
    release_freed_memory()  # this process (and the API servers LitServe forks from it) no longer holds the model
    model_format = Path(model).suffix.lower().lstrip(".")
    PredictRequest.max_texts = max_texts
    PredictRequest.refusal = ONNX_REFUSAL if model_format != "ckpt" else None if explain else OFF_REFUSAL
    key_check = KeyCheck(api_key)
    options = {"threads": threads, **options} if threads else options  # a caller's own `threads` wins
    apis = [SpamClassifierAPI(model, options, batch_tokens, key_check, max_batch_size=max_batch_size,
                              batch_timeout=batch_timeout)]
    middlewares = [page_middleware()]
    if PredictRequest.refusal is None:  # a second worker, with its own copy of the model, for explanations
        apis.append(ExplainingAPI(model, options, batch_tokens, key_check))
        middlewares.append(explain_route_middleware())
    accelerator = "cuda" if device.startswith("cuda") else device
    # The metrics middleware (listed last: the outer one) counts the page's requests too, and explanations under
    # /predict, where they were asked for. /docs and /openapi.json cannot ask for a key, so a server with one goes
    # without them.
    middlewares.append(metrics_middleware(("/", PREDICT_PATH, "/info", "/health")))
    server = Server(apis, accelerator=accelerator, devices=1, workers_per_device=[workers, 1][:len(apis)],
                    timeout=timeout,
                    model_metadata=info, max_payload_size=max_body_bytes, disable_openapi_url=key_check.required,
                    middlewares=middlewares)
    labels = {"sha256": info.get("sha256", "unknown"), "format": model_format}
    server.app.add_api_route(METRICS_PATH, scrape(labels), methods=["GET"], include_in_schema=False,
                             dependencies=[Depends(key_check)])
    return server


def worker_plan(device: str, workers: int | None) -> tuple[int, int]:
    """(classifying workers, threads each: 0 leaves it to the backend). On a CPU the workers share its cores."""
    if not device.startswith("cpu"):
        return workers or 1, 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(CPU_WORKERS, cores)
    return workers, max(1, cores // workers)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-texts", args.max_texts),
                        ("--workers", 1 if args.workers is None else args.workers),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.batch_timeout < 0:
        parser.error("--batch-timeout must be 0 or more")
    try:
        api_key = read_api_key(args.api_key_file)  # before the model loads: a bad key file fails at once
        model, options = model_source(args)
        server = build_server(model, options, args.max_batch_size, args.batch_timeout, args.max_body_bytes,
                              args.batch_tokens, max_texts=args.max_texts, api_key=api_key,
                              explain=not args.no_explain, workers=args.workers)
    except SpamclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning := exposure_warning(args.host, api_key is not None):
        print(warning, file=sys.stderr, flush=True)
    stop_on_sigterm()
    with metrics_folder():
        server.run(host=args.host, port=args.port, generate_client_file=False)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spamclf.serve", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0: every interface, reachable by others)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(KEY_FLAG, default=None, metavar="FILE",
                        help=f"a file whose one line is the key clients must send (else ${KEY_ENV}, if set); "
                             "without one, anyone who reaches the port may use the server")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                        help="requests classified together at most")
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT,
                        help="seconds a request waits for others to batch with")
    parser.add_argument("--max-texts", type=int, default=256, help='most texts in one request\'s "texts"')
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per model batch (as spamclf.predict)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"classifying processes, each with a copy of the model (default: {CPU_WORKERS} on a CPU, "
                             "sharing its cores; 1 on a GPU)")
    parser.add_argument("--no-explain", action="store_true",
                        help='no explaining worker (it holds a copy of the model of its own): "explain" answers 400')
    return parser


def stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`, a container stop) shuts the server down as Ctrl+C does. LitServe 0.2.19's
    `LitServer.run` documents SIGTERM as a graceful shutdown, but its main process stops its spawned inference
    workers only on KeyboardInterrupt (its `except KeyboardInterrupt` around `_shutdown_event.wait()`); without
    this, SIGTERM left them running. tests/test_serve.py checks that no process outlives a SIGTERM.

    The API server LitServe forks inherits the handler; uvicorn there re-raises the SIGTERM it caught once it has
    shut down, and that process then ends as SIGTERM's default would, without a KeyboardInterrupt traceback."""
    main_process = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_process:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
