"""Labelled text files into a frame of (line, label, text), with one-line errors naming the file, the line and the
fix: header-less `label<TAB>text` (the SMS Spam Collection), CSV and TSV with or without a header, JSONL; any
encoding; a folder of mail with a subfolder per class (`spamclf.mail`); the official SMS archive downloaded and
verified on request."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from lightning.pytorch.utilities import rank_zero_only

from spamclf.errors import DataError, InvalidOption
from spamclf.io import file_sha256, write_bytes
from spamclf.mail import LAYOUT, is_mail_source, read_mail_folder
from spamclf.mail import log as mail_log

log = logging.getLogger(__name__)


# Under DDP every rank prepares the data and rank zero reports it. Lightning's rank_zero_only, around this package's
# logger: its rank_zero_info logs to Lightning's own logger, which stops propagating to the root (Hydra's train.log)
# when Lightning is imported before logging is configured, and its rank_zero_warn raises Python warnings.
info_on_rank_zero = rank_zero_only(log.info)
warn_on_rank_zero = rank_zero_only(log.warning)

FORMATS = ("auto", "sms", "csv", "tsv", "jsonl")
READERS = ("book", "exact")  # how the SMS Spam Collection is read: as the book's pandas call does, or every line
SMS_FILE = "SMSSpamCollection"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
NOT_MAIL = f"a folder without mail; point data.path at a CSV, TSV or JSONL file, or at a folder with {LAYOUT}"


def _decode(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; fix data.path "
                        f"(or leave it null for the SMS Spam Collection)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: {NOT_MAIL}") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty; it needs one labelled text per line")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: bytes that are not valid {encoding}; re-save the file as UTF-8 or set data.encoding "
            f"(e.g. data.encoding=latin-1)"
        ) from None
    except LookupError:
        raise InvalidOption("encoding", encoding, "a Python codec name such as utf-8 or latin-1") from None


def _detect_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidOption("format", fmt, "one of " + ", ".join(FORMATS))
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}.get(suffix, "tsv")


def _rows_from_headerless(path: Path, text: str) -> list[tuple[int, str, str]]:
    """`label<TAB>text` lines, no quoting at all (csv.QUOTE_NONE): all 5,574 SMS messages, not pandas' 5,572."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, body = line.partition("\t")
        if not sep:
            raise DataError(
                f"{path}:{lineno}: no tab between label and text; each line must be 'label<TAB>text' "
                f"(or give the file a header row and set data.text_column / data.label_column)"
            )
        rows.append((lineno, label, body))
    return rows


def _rows_from_table(path: Path, text: str, sep: str, text_column, label_column, header: bool = True):
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, header=0 if header else None)
    except (pd.errors.ParserError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse as {'CSV' if sep == ',' else 'TSV'} ({str(e).strip()}); fix the quoting "
                        f"on that line or set data.format") from None
    if not header:
        text_column, label_column = _position(text_column, 1, "text_column"), _position(label_column, 0, "label_column")
        if max(text_column, label_column) >= frame.shape[1]:
            raise DataError(f"{path}:1: {frame.shape[1]} column(s), no column {max(text_column, label_column)} "
                            f"(counting from 0); set data.label_column / data.text_column to column positions")
    _require_columns(path, list(frame.columns), text_column, label_column)
    # Line numbers are right for files without multi-line quoted fields (a header is line 1).
    first = 2 if header else 1
    return [(i + first, lab, body) for i, (lab, body) in enumerate(zip(frame[label_column], frame[text_column]))]


def _position(column, default: int, key: str) -> int:
    """A column position for header-less files: an integer, or the default names' usual place (label 0, text 1)."""
    if isinstance(column, int) and not isinstance(column, bool) and column >= 0:
        return column
    if isinstance(column, str) and column.isdigit():
        return int(column)
    if column == {"text_column": "text", "label_column": "label"}[key]:
        return default
    raise InvalidOption(key, column, "a column position (0, 1, …) when data.header=false")


def _rows_from_jsonl(path: Path, text: str, text_column: str, label_column: str):
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with '{text_column}' and '{label_column}'")
        _require_columns(path, list(obj), text_column, label_column, lineno)
        body = obj[text_column]
        rows.append((lineno, "" if obj[label_column] is None else str(obj[label_column]),
                     "" if body is None else str(body)))
    return rows


def _require_columns(path, found, text_column, label_column, lineno=None):
    missing = [c for c in (text_column, label_column) if c not in found]
    if missing:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise DataError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, map(str, found)))}); set data.text_column / data.label_column"
        )


def read_labelled_file(
    path: str | os.PathLike,
    format: str = "auto",
    text_column: str | int = "text",
    label_column: str | int = "label",
    encoding: str = "utf-8",
    header: bool = True,
) -> pd.DataFrame:
    """Read a labelled text file into a frame with columns `text`, `label` (strings) and `line`.

    Formats: `sms`/`tsv` (header-less `label<TAB>text`, or a TSV with a header naming the columns),
    `csv` (with a header; `header=False`: columns by position, label 0 and text 1 unless given),
    `jsonl` (one object per line). Rows with an empty text are dropped with one warning; an empty label
    is an error that names its line.
    """
    path = Path(path)
    fmt = _detect_format(path, format)
    text = _decode(path, encoding)
    if fmt == "jsonl":
        rows = _rows_from_jsonl(path, text, text_column, label_column)
    elif fmt == "csv":
        rows = _rows_from_table(path, text, ",", text_column, label_column, header)
    else:
        first = text.split("\n", 1)[0].rstrip("\r").split("\t")
        has_header = header and fmt == "tsv" and text_column in first and label_column in first
        rows = (_rows_from_table(path, text, "\t", text_column, label_column) if has_header
                else _rows_from_headerless(path, text))
    frame = pd.DataFrame(rows, columns=["line", "label", "text"])
    frame["label"] = frame["label"].astype(str).str.strip()
    unlabelled = frame[frame["label"] == ""]
    if len(unlabelled):
        raise DataError(f"{path}:{unlabelled['line'].iloc[0]}: empty label; every row needs a label")
    empty = frame["text"].str.strip() == ""
    if empty.any():
        warn_on_rank_zero("%s: dropped %d row(s) with empty text", path, int(empty.sum()))
        frame = frame[~empty]
    if frame.empty:
        raise DataError(f"{path}: no rows with text; it needs one labelled text per line")
    return frame.reset_index(drop=True)


def _from_rank_zero(record: logging.LogRecord) -> bool:
    return rank_zero_only.rank == 0


def is_mail_data(path: str | os.PathLike) -> bool:
    """Whether `data.path` names mail (a folder, or an .eml or mbox file) rather than a file of labelled texts."""
    return Path(path).is_dir() or is_mail_source(path)


def read_mail_data(path: str | os.PathLike, headers: Sequence[str] = ()) -> pd.DataFrame:
    """A folder of mail, a subfolder per class, as a frame with columns `text` and `label` (`read_mail_folder`);
    `headers` are put first in each text. Its warning about skipped messages comes from rank zero only."""
    path = Path(path)
    if path.is_dir() and not is_mail_source(path):
        raise DataError(f"{path}: {NOT_MAIL}")
    mail_log.addFilter(_from_rank_zero)
    try:
        return read_mail_folder(path, headers)
    finally:
        mail_log.removeFilter(_from_rank_zero)


def read_sms_as_the_book(path: str | os.PathLike) -> pd.DataFrame:
    """The SMS Spam Collection as the book reads it: `pd.read_csv(sep="\\t", header=None)` with pandas'
    default quoting, which strips the `"` around quoted texts and merges lines 5082-5084 of the file into
    one row (5,572 rows, not 5,574). Columns `line` (the row's first line), `label`, `text`, `span` (how
    many lines of the file the row holds: 3 for the merged row, else 1)."""
    path = Path(path)
    book = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])  # the book's call, as printed
    lines = path.read_text(encoding="utf-8").split("\n")
    rows, cursor = [], 0
    for label, text in zip(book["Label"], book["Text"]):
        while cursor < len(lines) and not lines[cursor].strip():
            cursor += 1
        span = str(text).count("\n") + 1  # a quoted field that runs over line ends keeps them
        if cursor >= len(lines) or lines[cursor].partition("\t")[0] != label or not isinstance(text, str):
            raise DataError(f"{path}:{cursor + 1}: cannot line up the book's reading with the file; "
                            f"use data.reader=exact")
        rows.append((cursor + 1, label, text, span))
        cursor += span
    return pd.DataFrame(rows, columns=["line", "label", "text", "span"])


def download_sms(url: str = UCI_URL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the official UCI zip, extract SMSSpamCollection, verify its sha256, cache it. Idempotent."""
    cache = Path(cache_dir or Path.home() / ".cache" / "spamclf")
    target = cache / SMS_FILE
    if target.exists() and file_sha256(target) == SMS_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            archive = response.read()
    except OSError as e:
        raise DataError(f"cannot download {url} ({e}); check the network or leave data.download=false "
                        f"to use the embedded copy") from None
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == SMS_FILE), None)
            if member is None:
                raise DataError(f"{url}: the archive holds no {SMS_FILE}; check data.download_url")
            content = zf.read(member)
    except zipfile.BadZipFile:
        raise DataError(f"{url}: not a zip archive; check data.download_url") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != SMS_SHA256:
        raise DataError(f"{url}: {SMS_FILE} has sha256 {digest}, expected {SMS_SHA256}; "
                        f"the download is not the official file")
    write_bytes(target, content)
    return target
