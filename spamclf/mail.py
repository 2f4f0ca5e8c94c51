"""E-mail as it is stored (.eml files, mbox files, Maildirs) into texts: labelled by class folder for training,
named one by one for prediction. Layout and what a message becomes: docs/mail.md.

HTML-only bodies become text through the standard library's `html.parser`: it decodes entities with the same
tokenizer Beautiful Soup's default builder uses, so beautifulsoup4 would add a dependency (and a tree) without
better text once script/style and block breaks are handled either way, and html2text writes Markdown, drops
accents by default and is GPL-licensed.
"""

from __future__ import annotations

import email
import logging
import os
import re
from collections.abc import Iterator, Sequence
from email import policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

from spamclf.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

NAMED_SKIPS = 5  # skipped messages named in the warning; the rest are only counted
LAYOUT = "one subfolder per class (e.g. spam/ and ham/) holding .eml files, mbox files or Maildirs"
_MBOX_ESCAPE = re.compile(rb">+From ")  # mboxrd quotes body lines that start "From "; one ">" comes off
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")  # a header field name: printable ASCII but space and colon


def is_mail_source(path: str | os.PathLike) -> bool:
    """Whether `path` is mail: an .eml or mbox file, a Maildir, or a folder with any of them inside."""
    return next(_mail_entries(Path(path)), None) is not None


def read_mail_folder(path: str | os.PathLike, headers: Sequence[str] = ()) -> pd.DataFrame:
    """A frame with columns `text` and `label`: every message under each subfolder of `path`, labelled with the
    subfolder's name. Messages that cannot be read or hold no text are left out with one warning."""
    import pandas as pd  # imported here so that prediction, which only iterates, does not load pandas

    root = Path(path)
    skipped = _Skipped(root)
    rows = [(text, folder.name) for folder in _class_folders(root)
            for _, text in _texts(folder, root, headers, skipped)]
    skipped.warn()
    if not rows:
        raise DataError(f"{root}: no readable messages in its subfolders; it needs {LAYOUT}")
    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise DataError(f"{root}: only the class {labels[0]!r} holds mail; add a subfolder of mail for each other "
                        f"class")
    return pd.DataFrame(rows, columns=["text", "label"])


def iter_mail(path: str | os.PathLike, headers: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """(name, text) for every message in an .eml file, an mbox file, a Maildir or a folder of them, in name order.
    A name is the file's path relative to `path` (its own name when `path` is the file), with `#k` for the k-th
    message of an mbox. Checks `path` at once; reading happens as the pairs are taken."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: not found; give an .eml file, an mbox file, a Maildir or a folder of them")
    if root.is_file() and not _is_mail_file(root):
        raise DataError(f"{root}: neither an .eml file nor an mbox file (whose first line starts 'From '); "
                        f"give mail, or a CSV/text file of messages")
    return _named_texts(root, headers)


def _named_texts(root: Path, headers: Sequence[str]) -> Iterator[tuple[str, str]]:
    skipped = _Skipped(root)
    found = False
    for name, text in _texts(root, root, headers, skipped):
        found = True
        yield name, text
    skipped.warn()
    if not found:
        raise DataError(f"{root}: no readable messages (.eml files, mbox files or Maildirs); give a path that holds "
                        f"mail")


def message_text(message: EmailMessage, headers: Sequence[str] = ()) -> str:
    """The message's subject and text body with a blank line between, after a "Name: value" line for each of
    `headers` the message has (one name alone may be given as a string); empty when it has neither subject nor
    body text."""
    headers = (headers,) if isinstance(headers, str) else headers
    subject = " ".join(str(message["subject"] or "").split())
    body = _body_text(message)
    if not (subject or body):
        return ""
    lines = [f"{name}: {' '.join(str(message[name]).split())}" for name in headers if message[name] is not None]
    return "\n".join([*lines, "\n\n".join(part for part in (subject, body) if part)])


def _body_text(message: EmailMessage) -> str:
    """text/plain when it has any text, else HTML made text; attachments are never candidates (get_body)."""
    plain = message.get_body(preferencelist=("plain",))
    text = "\n".join(line.rstrip() for line in _decoded(plain).splitlines()).strip() if plain is not None else ""
    if text:
        return text
    html = message.get_body(preferencelist=("html",))
    return html_to_text(_decoded(html)) if html is not None else ""


def _decoded(part: EmailMessage) -> str:
    try:
        return part.get_content()
    except LookupError:  # a charset Python does not know: the bytes as UTF-8 if they are, else as Windows-1252
        raw = part.get_payload(decode=True) or b""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("cp1252", errors="replace")


class _HtmlText(HTMLParser):
    """Visible text: script, style and title content dropped, entities decoded, one line per block."""

    HIDDEN = frozenset({"script", "style", "title"})
    BLOCKS = frozenset({"address", "article", "blockquote", "br", "div", "dl", "dt", "dd", "footer", "form", "h1", "h2",
                        "h3", "h4", "h5", "h6", "header", "hr", "li", "ol", "p", "pre", "section", "table", "tr", "ul"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self._mark(tag, 1)

    def handle_endtag(self, tag):
        self._mark(tag, -1)

    def _mark(self, tag: str, step: int) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden + step)
        elif tag in self.BLOCKS:
            self.chunks.append("\n")
        elif tag in ("td", "th"):  # cells of a row stay on its line, apart
            self.chunks.append(" ")

    def handle_data(self, data):
        if not self.hidden:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """The text a reader sees in an HTML body, one line per block (paragraph, row, list item), spaces collapsed."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.chunks).split("\n"))
    return "\n".join(line for line in lines if line)


class _Skipped:
    """Messages left out: counted, the first few named, reported in one warning line."""

    def __init__(self, root: Path):
        self.root, self.count, self.names = root, 0, []

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.names) < NAMED_SKIPS:
            self.names.append(name)

    def warn(self) -> None:
        if self.count:
            more = ", ..." if self.count > len(self.names) else ""
            log.warning("%s: %d message%s skipped (unreadable or empty): %s%s", self.root, self.count,
                        "" if self.count == 1 else "s", ", ".join(self.names), more)


def _texts(path: Path, root: Path, headers: Sequence[str], skipped: _Skipped) -> Iterator[tuple[str, str]]:
    for name, raw in _raw_messages(path, root):
        text = _text_of(name, raw, headers)
        if text:
            yield name, text
        else:
            skipped.add(name)


def _text_of(name: str, raw: bytes | None, headers: Sequence[str]) -> str:
    """The message's text, or "" when it cannot be read: a file without a single header is not mail (random
    bytes, a note named .eml), and malformed mail can raise from deep inside the email package."""
    if raw is None:
        return ""
    try:
        message = email.message_from_bytes(raw, policy=policy.default)
        return message_text(message, headers) if message.keys() else ""
    except Exception as e:  # one bad message must not stop a mailbox; it is named in the warning
        log.debug("%s: %s: %s", name, type(e).__name__, e)
        return ""


def _raw_messages(path: Path, root: Path) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each message under `path`, one at a time; None for a file that cannot be read."""
    for entry in _mail_entries(path):
        if entry.is_dir():
            files = (f for sub in ("cur", "new") for f in _visible(entry / sub) if f.is_file())
            yield from ((_name(f, root), _read(f)) for f in files)
        elif entry.suffix.lower() == ".eml":
            yield _name(entry, root), _read(entry)
        else:
            yield from _mbox_messages(entry, _name(entry, root))


def _name(file: Path, root: Path) -> str:
    return file.name if file == root else file.relative_to(root).as_posix()


def _read(file: Path) -> bytes | None:
    try:
        return file.read_bytes()
    except OSError:
        return None


def _mbox_messages(file: Path, name: str) -> Iterator[tuple[str, bytes | None]]:
    """One pass over the file holding one message at a time. Every line starting "From " begins a message, as the
    standard `mailbox` module reads mbox files."""
    count, lines = 0, []
    try:
        with open(file, "rb") as fh:
            for line in fh:
                if line.startswith(b"From "):
                    if count:
                        yield f"{name}#{count}", b"".join(lines)
                    count, lines = count + 1, []
                else:
                    lines.append(line[1:] if _MBOX_ESCAPE.match(line) else line)
    except OSError:
        yield f"{name}#{count + 1}", None
        return
    if count:
        yield f"{name}#{count}", b"".join(lines)


def _mail_entries(path: Path) -> Iterator[Path]:
    """Mail under `path` in name order: .eml files, mbox files and Maildirs. Hidden entries are skipped, among them
    a Maildir's own subfolders (.Sent, .Junk), which hold mail of other kinds."""
    if path.is_file():
        if _is_mail_file(path):
            yield path
    elif _is_maildir(path):
        yield path
    elif path.is_dir():
        for child in _visible(path):
            yield from _mail_entries(child)


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _is_maildir(folder: Path) -> bool:
    """cur/ and new/ make a Maildir; tmp/ may be missing from a copy (git, zip tools drop empty folders)."""
    return (folder / "cur").is_dir() and (folder / "new").is_dir()


def _is_mail_file(file: Path) -> bool:
    return file.suffix.lower() == ".eml" or _is_mbox(file)


def _is_mbox(file: Path) -> bool:
    """A first line starting "From " and a header on the next: a text file whose first message begins "From "
    is not taken for an mbox."""
    try:
        with open(file, "rb") as fh:
            first, second = fh.readline(1024), fh.readline(1024)
    except OSError:
        return False
    return first.startswith(b"From ") and _HEADER_LINE.match(second) is not None


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        what = "not found" if not root.exists() else "is a file, not a folder"
        raise DataError(f"{root}: {what}; give a folder with {LAYOUT}")
    if _is_maildir(root):
        raise DataError(f"{root}: is a Maildir, not a folder of classes; move it into a subfolder named after its "
                        f"class")
    folders = [p for p in _visible(root) if p.is_dir()]
    if not folders:
        raise DataError(f"{root}: no class subfolders; give it {LAYOUT}")
    return folders
