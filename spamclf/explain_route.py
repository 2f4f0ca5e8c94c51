"""Sends `POST /predict` requests that ask for explanations (`"explain": true`) to the server's explaining worker.

Why a second route: LitServe answers a batch's requests only once the whole batch is done, so an explanation
(one forward pass per word) computed in the classifying worker would hold back every request batched with it.
`spamclf.serve` therefore serves explanations from a worker of their own at EXPLAIN_PATH, and this ASGI
middleware (a `LitServer(middlewares=[...])` entry, LitServe's public way to wrap the app) reads a /predict
body, and passes the request on under EXPLAIN_PATH when it asks for explanations, unchanged otherwise. The
body reaches the app as it arrived. LitServe's size limit wraps this middleware and raises its 413 while the body
is read, before it is read whole; that error is raised again where the app reads the body, which answers it.
"""

from __future__ import annotations

import json

PREDICT_PATH = "/predict"
EXPLAIN_PATH = "/predict/explain"


def asks_for_explanation(body: bytes) -> bool:
    """Whether a request body is a JSON object with `"explain": true`; anything else is /predict's to judge."""
    try:
        request = json.loads(body)
    except ValueError:
        return False
    return isinstance(request, dict) and request.get("explain") is True


class ExplainRouteMiddleware:
    """ASGI middleware: a `POST /predict` whose body asks for explanations goes to EXPLAIN_PATH."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        messages, failure = await _read_body(receive)
        if failure is None and asks_for_explanation(b"".join(m.get("body", b"") for m in messages)):
            scope = {**scope, "path": EXPLAIN_PATH, "raw_path": EXPLAIN_PATH.encode()}

        async def replay():
            if messages:
                return messages.pop(0)
            if failure is not None:
                raise failure
            return await receive()

        await self.app(scope, replay, send)


async def _read_body(receive) -> tuple[list[dict], Exception | None]:
    """The request's messages up to its body's end, and what stopped the reading early, if anything."""
    messages = []
    try:
        while True:
            messages.append(await receive())
            if messages[-1]["type"] != "http.request" or not messages[-1].get("more_body"):
                return messages, None
    except Exception as error:  # noqa: BLE001 - raised again where the app reads the body
        return messages, error


def explain_route_middleware() -> tuple[type, dict]:
    """The entry for `LitServer(middlewares=[...])`."""
    return ExplainRouteMiddleware, {}
