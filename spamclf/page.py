"""The page people try the classifier in: `GET /` on `spamclf.serve` answers `spamclf/assets/page.html`, one
self-contained file (inline CSS and JavaScript, nothing fetched from elsewhere, so it works offline) that calls the
server's own `/info` and `/predict`. It is served without the server's API key (it holds nothing but the page)
so that it can ask for one: on a 401 it shows a key prompt and sends the key it is given with every call.

How it is added: LitServe 0.2.19 registers its own `GET /` ("litserve running") while `LitServer.__init__` builds
the FastAPI app (`LitServer.app`), and Starlette answers with the first route that matches, so a route added to
`server.app` afterwards would never be reached. `LitServer(middlewares=[...])`, LitServe's public way to wrap the
app, lets this small ASGI middleware answer `GET /` first and hand every other request on unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

PAGE_FILE = "page.html"


@lru_cache(maxsize=1)
def page_html() -> bytes:
    return (files("spamclf") / "assets" / PAGE_FILE).read_bytes()


class PageMiddleware:
    """ASGI middleware: `GET /` (and `HEAD /`) is the page; everything else goes to the app."""

    def __init__(self, app, page: bytes):
        self.app, self.page = app, page

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            headers = [(b"content-type", b"text/html; charset=utf-8"),
                       (b"content-length", str(len(self.page)).encode()),
                       (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self.page})
            return
        await self.app(scope, receive, send)


def page_middleware() -> tuple[type, dict]:
    """The entry for `LitServer(middlewares=[...])`."""
    return PageMiddleware, {"page": page_html()}
