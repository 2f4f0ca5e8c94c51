"""The API key that `spamclf.serve` asks of its clients: where it comes from, and the check LitServe runs.

LitServe 0.2.19 ships a key of its own (`LIT_SERVER_API_KEY`, compared with `!=`, `X-API-Key` only, and it guards
`/health`, which load balancers probe without keys) and a `LitAPI.authorize` hook: a FastAPI dependency of its
routes. The server uses the hook with `KeyCheck`, and still honours `LIT_SERVER_API_KEY`, which the hook would
otherwise silently switch off.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import string
from collections.abc import Mapping
from pathlib import Path

from fastapi import HTTPException, Request

from spamclf.errors import SpamclfError

KEY_FLAG = "--api-key-file"
KEY_ENV = "SPAMCLF_API_KEY"
LITSERVE_KEY_ENV = "LIT_SERVER_API_KEY"
OPEN_PATHS = ("/health",)
# What an HTTP header carries unchanged and `Authorization: Bearer KEY` can hold: printable ASCII, no spaces.
KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)
REFUSAL = "a valid API key is required: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"


def read_api_key(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from the file's one line (stripped), else from $SPAMCLF_API_KEY or $LIT_SERVER_API_KEY; None: no key."""
    if path is not None:
        try:
            return _checked(Path(path).read_text(encoding="utf-8").strip(), f"{KEY_FLAG} {path}")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise SpamclfError(f"{KEY_FLAG} {path}: cannot read the key file ({reason}); "
                               f"pass a readable file holding the key on one line") from None
    for name in (KEY_ENV, LITSERVE_KEY_ENV):
        if name in environ:
            return _checked(environ[name].strip(), f"${name}")
    return None


def _checked(key: str, where: str) -> str:
    if not key:
        raise SpamclfError(f"{where} is empty; put the key on its one line (or serve without a key)")
    if "\n" in key:
        raise SpamclfError(f"{where} holds more than one line; keep only the key")
    if not set(key) <= KEY_CHARACTERS:
        raise SpamclfError(f"{where}: the key may hold printable ASCII without spaces only (an HTTP header carries it)")
    return key


def exposure_warning(host: str, has_key: bool) -> str | None:
    """The one line to print when a server without a key listens beyond this machine."""
    if has_key or _is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
            f"pass {KEY_FLAG} FILE or set ${KEY_ENV}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries (`X-API-Key`, else `Authorization: Bearer`); "" when it carries none."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("latin-1", errors="replace")).digest()


class KeyCheck:
    """Allows a request when the server has no key, the path is open (`/health`) or the request carries the key.

    Holds the key's sha256 only (it travels to LitServe's worker processes). A missing key is compared as ""
    through the same `hmac.compare_digest` of two equal-length digests, so a wrong key and a missing one take
    the same time."""

    def __init__(self, key: str | None = None, open_paths: tuple[str, ...] = OPEN_PATHS):
        self.digest = None if key is None else _digest(key)
        self.open_paths = frozenset(open_paths)

    @property
    def required(self) -> bool:
        return self.digest is not None

    def allows(self, path: str, headers: Mapping[str, str]) -> bool:
        if self.digest is None or path in self.open_paths:
            return True
        return hmac.compare_digest(_digest(presented_key(headers)), self.digest)

    def __call__(self, request: Request) -> None:
        """The FastAPI dependency: a 401 (the same for a wrong and a missing key) unless `allows`."""
        if not self.allows(request.url.path, request.headers):
            raise HTTPException(status_code=401, detail=REFUSAL, headers={"WWW-Authenticate": "Bearer"})
