"""Files the program writes: whole or not at all, readable like any other file.

Every writer goes through a temporary sibling and `os.replace`, so a crash or a user error never leaves a
half-written file or folder. Temporary files are created private (mkstemp, mkdtemp); before they take their
final name they get the mode any other file would: 0666 (folders 0777) less the process's umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give `path` (and, for a folder, everything below it) the mode a newly created file or folder gets."""
    mask = _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """An open file that appears as `target` only if the block ends without an error."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        make_readable(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(target: str | os.PathLike, content: bytes) -> None:
    with atomic_file(target, "wb") as fh:
        fh.write(content)


def write_json(target: str | os.PathLike, payload) -> None:
    with atomic_file(target) as fh:
        fh.write(json.dumps(payload, indent=2, default=str))


@contextmanager
def atomic_folder(out: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """A temporary sibling folder to fill; it becomes `out` (new, or empty) when the block ends without an error."""
    from spamclf.errors import SpamclfError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpamclfError(f"{out}: exists and is not a folder; choose a new {what} or remove it")
    if out.exists() and any(out.iterdir()):
        raise SpamclfError(f"{out}: folder exists and is not empty; choose a new {what} or remove it")
    if not out.parent.is_dir():
        raise SpamclfError(f"{out.parent}: folder does not exist; create it or fix {what}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        make_readable(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file; free for Hugging Face hub downloads, whose cache names blobs by it."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
