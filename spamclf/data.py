"""Labelled text in, padded GPT-2 token batches out: reading, balancing, splitting, batching.

`SpamDataModule()` with no arguments is the book's recipe (ch. 6): the embedded SMS Spam Collection,
"ham" undersampled to the 747 "spam", shuffled and cut 70/10/20 with seed 123 (1,045 / 149 / 300
messages), every batch padded with <|endoftext|> to the longest training message.
This module knows the tokenizer, never the model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from spamclf.decision import positive_index
from spamclf.errors import DataError, InvalidOption
from spamclf.tokenizer import PAD_ID, asset_path, encode_texts

log = logging.getLogger(__name__)


class _RankZeroLog:
    """The module's logger, quiet on every rank but zero: under DDP each rank prepares the data, one reports it."""

    def __getattr__(self, level: str):
        method = getattr(log, level)
        return method if rank_zero_only.rank == 0 else (lambda *args, **kwargs: None)


rank_zero_log = _RankZeroLog()

SPLITS = ("train", "val", "test")
NATURAL = "natural"  # the test split plus every message balancing left out, at the file's own class ratio
SPLIT_FILES = {"train": "train.csv", "val": "validation.csv", "test": "test.csv", NATURAL: "natural.csv"}
PADDING_CHOICES = ("longest_train", "batch", "fixed", "model", "none")
FORMATS = ("auto", "sms", "csv", "tsv", "jsonl")
SMS_FILE = "SMSSpamCollection"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"


# ----------------------------------------------------------------------------------------------- reading
def _decode(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; fix data.path (or leave it null for the SMS Spam Collection)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file; point data.path at a CSV, TSV or JSONL file") from None
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
            raise DataError(f"{path}:1: {frame.shape[1]} column(s), no column {max(text_column, label_column)} (counting "
                            f"from 0); set data.label_column / data.text_column to column positions")
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
        rows.append((lineno, "" if obj[label_column] is None else str(obj[label_column]), "" if body is None else str(body)))
    return rows


def _require_columns(path, found, text_column, label_column, lineno=None):
    missing = [c for c in (text_column, label_column) if c not in found]
    if missing:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise DataError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))} (found {', '.join(map(repr, map(str, found)))}); "
            f"set data.text_column / data.label_column"
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
        rows = _rows_from_table(path, text, "\t", text_column, label_column) if has_header else _rows_from_headerless(path, text)
    frame = pd.DataFrame(rows, columns=["line", "label", "text"])
    frame["label"] = frame["label"].astype(str).str.strip()
    unlabelled = frame[frame["label"] == ""]
    if len(unlabelled):
        raise DataError(f"{path}:{unlabelled['line'].iloc[0]}: empty label; every row needs a label")
    empty = frame["text"].str.strip() == ""
    if empty.any():
        rank_zero_log.warning("%s: dropped %d row(s) with empty text", path, int(empty.sum()))
        frame = frame[~empty]
    if frame.empty:
        raise DataError(f"{path}: no rows with text; it needs one labelled text per line")
    return frame.reset_index(drop=True)


def download_sms(url: str = UCI_URL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the official UCI zip, extract SMSSpamCollection, verify its sha256, cache it. Idempotent."""
    cache = Path(cache_dir or Path.home() / ".cache" / "spamclf")
    target = cache / SMS_FILE
    if target.exists() and _sha256(target.read_bytes()) == SMS_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            archive = response.read()
    except OSError as e:
        raise DataError(f"cannot download {url} ({e}); check the network or leave data.download=false to use the embedded copy") from None
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == SMS_FILE), None)
            if member is None:
                raise DataError(f"{url}: the archive holds no {SMS_FILE}; check data.download_url")
            content = zf.read(member)
    except zipfile.BadZipFile:
        raise DataError(f"{url}: not a zip archive; check data.download_url") from None
    if _sha256(content) != SMS_SHA256:
        raise DataError(f"{url}: {SMS_FILE} has sha256 {_sha256(content)}, expected {SMS_SHA256}; the download is not the official file")
    _write_atomic(target, content)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(target: Path, content: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the splits from other readers
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------ balance and split
def balance_classes(frame: pd.DataFrame, seed: int, label_order: Sequence[str]) -> pd.DataFrame:
    """Undersample every class to the smallest one's size (the book: ham sampled down to the 747 spam).

    Classes are concatenated in label order, each larger class sampled with `random_state=seed` and the
    smallest left in file order, so with ham/spam this is exactly the book's `create_balanced_dataset`.
    """
    groups = [frame[frame["label"] == name] for name in label_order]
    smallest = min(len(g) for g in groups)
    return pd.concat([g.sample(smallest, random_state=seed) if len(g) > smallest else g for g in groups])


def split_frame(frame: pd.DataFrame, fractions: Sequence[float], seed: int) -> dict[str, pd.DataFrame]:
    """Shuffle with `random_state=seed`, then cut by `int()` of each fraction (the book's `random_split`)."""
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * fractions[0])
    val_end = train_end + int(len(shuffled) * fractions[1])
    test_end = len(shuffled) if math.isclose(sum(fractions), 1.0) else val_end + int(len(shuffled) * fractions[2])
    return {"train": shuffled[:train_end], "val": shuffled[train_end:val_end], "test": shuffled[val_end:test_end]}


def natural_frame(everything: pd.DataFrame, used: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The test split plus every row of `everything` that balancing left out of `used`, minus any text that
    is also a training or validation text: messages never seen in training. Balancing uses every message of
    the smallest class, so this set is mostly the larger classes (SMS: ~4,100 ham, ~110 spam)."""
    unused = everything[~everything.index.isin(used.index)]
    seen = set(splits["train"]["text"]) | set(splits["val"]["text"])
    natural = pd.concat([splits["test"], unused], ignore_index=True)
    return natural[~natural["text"].isin(seen)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ batching
class EncodedSplit(Dataset):
    """Token ids and class ids of one split; items are (index, ids, label) so caches can look rows up."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels
        self.lengths = [len(row) for row in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return index, self.ids[index], self.labels[index]


class PadCollator:
    """Stacks (index, ids, label) items into a batch, right-padding with <|endoftext|>.

    `pad_length=None` pads to the batch's longest message, rounded up to `multiple_of` (at most `limit`).
    Batches carry `input_ids` [B, T],
    `labels` [B], `lengths` [B] (real tokens per row), `index` [B] (row in the split) and `split`.
    """

    def __init__(self, pad_length: int | None, split: str, multiple_of: int = 1, limit: int | None = None):
        self.pad_length, self.split, self.multiple_of, self.limit = pad_length, split, multiple_of, limit

    def __call__(self, items) -> dict:
        width = self.pad_length or self._round(max(len(ids) for _, ids, _ in items))
        input_ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        for row, (_, ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.as_tensor(ids[:width], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "labels": torch.tensor([label for _, _, label in items], dtype=torch.long),
            "lengths": torch.tensor([min(len(ids), width) for _, ids, _ in items], dtype=torch.long),
            "index": torch.tensor([index for index, _, _ in items], dtype=torch.long),
            "split": self.split,
        }

    def _round(self, width: int) -> int:
        rounded = -(-width // self.multiple_of) * self.multiple_of
        return min(rounded, self.limit) if self.limit else rounded


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a run resumed from a checkpoint sees the
    same batches as one that never stopped (a DataLoader's own shuffle follows the global RNG)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def __len__(self) -> int:
        return self.size


class UnpaddedShardSampler(DistributedSampler):
    """Rows rank, rank + world, rank + 2·world, …: every row evaluated by exactly one rank. (Lightning's default
    DistributedSampler pads the shards to equal length with repeated rows, which evaluation would count twice.)"""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.rows = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class LengthBucketBatchSampler(BatchSampler):
    """Random batches of similar length: shuffle, cut into pools of `pool_batches` batches, sort each pool
    by length, batch it, then shuffle the batch order. Padding shrinks to almost nothing while the order
    stays random across pools and epochs (Lightning calls `set_epoch`)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, drop_last: bool, seed: int, pool_batches: int = 50):
        self.lengths, self.batch_size, self.drop_last = list(lengths), batch_size, drop_last
        self.seed, self.pool_batches, self.epoch = seed, pool_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


# ---------------------------------------------------------------------------------------- data module
class SpamDataModule(L.LightningDataModule):
    """Labelled text → balanced, split, tokenized, padded batches. Defaults are the book's recipe.

    Args:
        path: CSV, TSV or JSONL file; None means the embedded SMS Spam Collection.
        format: auto (by suffix), sms, csv, tsv or jsonl.
        text_column, label_column: column names for files with a header (CSV, TSV, JSONL keys).
        labels: explicit class order; None means the sorted distinct labels.
        encoding: the file's text encoding.
        balance: undersample every class to the smallest (the book).
        dedupe: drop repeated texts before balancing, so no text crosses splits.
        seed: sampling and shuffling seed.
        splits: train/val/test fractions, cut with int().
        batch_size, eval_batch_size: eval_batch_size None means batch_size.
        padding: longest_train | batch | fixed | model | none (see README).
        pad_to_multiple_of: with padding=batch, round each batch's width up to a multiple of this: fewer
            distinct shapes, so oneDNN compiles (and keeps in memory) fewer kernels.
        max_length: the length for padding=fixed.
        context_length: the model's context; longer messages are truncated (with one warning).
        bucket: length-bucketed random batches for the training set (with padding=batch).
        num_workers: DataLoader workers (tokenization is done up front, so 0 is usually fastest).
        output_dir: where train.csv, validation.csv and test.csv are written (None: not written).
        download: fetch the official UCI archive instead of using the embedded copy.
        download_url, cache_dir: where from and where to cache it.
        header: False reads CSV files without a header row, columns by position (label_column,
            text_column: 0 and 1 unless given).
        natural: also build the `natural` evaluation set: the test split plus every message that balancing
            left out, minus any text that is also in train or validation. Its false-positive rate comes from
            thousands of real ham messages; precision is also reported at the file's own class ratio.
        positive_label: the class a filter flags (spam); None means "spam" if present, else the last label.
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "auto",
        text_column: str = "text",
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        encoding: str = "utf-8",
        balance: bool = True,
        dedupe: bool = False,
        seed: int = 123,
        splits: Sequence[float] = (0.7, 0.1, 0.2),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        padding: str = "longest_train",
        pad_to_multiple_of: int = 1,
        max_length: int | None = None,
        context_length: int = 1024,
        bucket: bool = False,
        drop_last: bool = True,
        num_workers: int = 0,
        output_dir: str | None = None,
        download: bool = False,
        download_url: str = UCI_URL,
        cache_dir: str | None = None,
        header: bool = True,
        natural: bool = True,
        positive_label: str | None = None,
    ):
        super().__init__()
        if padding not in PADDING_CHOICES:
            raise InvalidOption("padding", padding, "one of " + ", ".join(PADDING_CHOICES))
        if padding == "fixed" and not (isinstance(max_length, int) and max_length > 0):
            raise InvalidOption("max_length", max_length, "a positive integer when padding=fixed")
        eval_batch_size = eval_batch_size or batch_size
        if padding == "none" and (batch_size != 1 or eval_batch_size != 1):
            raise InvalidOption(
                "padding", padding, "'none' only with batch_size=1 and eval_batch_size=1 (unpadded messages of different "
                "lengths cannot share a batch); use padding=batch, or batch_size=1 with trainer.accumulate_grad_batches"
            )
        if not (isinstance(pad_to_multiple_of, int) and pad_to_multiple_of >= 1):
            raise InvalidOption("pad_to_multiple_of", pad_to_multiple_of, "a positive integer")
        if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) > 1 + 1e-9:
            raise InvalidOption("splits", list(splits), "three non-negative fractions (train, val, test) summing to at most 1")
        self.path, self.format, self.encoding = path, format, encoding
        self.text_column, self.label_column = text_column, label_column
        self.labels = list(labels) if labels is not None else None
        self.balance, self.dedupe, self.seed, self.splits = balance, dedupe, seed, tuple(splits)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.padding, self.max_length, self.context_length = padding, max_length, context_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bucket, self.drop_last, self.num_workers = bucket, drop_last, num_workers
        self.output_dir, self.download, self.download_url, self.cache_dir = output_dir, download, download_url, cache_dir
        self.header, self.natural, self.positive_label = header, natural, positive_label
        self.frames: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, EncodedSplit] = {}
        self.label_names: list[str] = []
        self.pad_length: int | None = None
        self.overlap: dict[str, int] = {}
        self.class_shares: dict[str, float] = {}  # each class's share of the file (after dedupe, before balancing)
        self.test_splits: Sequence[str] = ("test",)  # the final evaluation sets all of SPLITS (and NATURAL)

    # -- preparation -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def source_path(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        if self.download:
            return download_sms(self.download_url, self.cache_dir)
        return Path(asset_path(SMS_FILE))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        path = self.source_path()
        frame = read_labelled_file(path, self.format, self.text_column, self.label_column, self.encoding, self.header)
        self.label_names = self._label_names(path, frame)
        try:
            positive_index(self.label_names, self.positive_label)
        except InvalidOption as e:
            raise DataError(f"data.{e}") from None
        if self.dedupe:
            before = len(frame)
            frame = frame.drop_duplicates(subset="text", keep="first")
            rank_zero_log.info("dedupe: dropped %d repeated text(s) before balancing", before - len(frame))
        everything = frame
        self.class_shares = {n: float((frame["label"] == n).mean()) for n in self.label_names}
        if self.balance:
            frame = balance_classes(frame, self.seed, self.label_names)
        frames = split_frame(frame, self.splits, self.seed)
        for split, part in frames.items():
            if part.empty:
                raise DataError(
                    f"{path}: the {split} split would be empty ({len(frame)} usable rows, splits={list(self.splits)}); "
                    f"add data or change data.splits"
                )
        if self.natural:
            frames[NATURAL] = natural_frame(everything, frame, frames)
            counts = frames[NATURAL]["label"].value_counts()
            rank_zero_log.info("natural set (test + messages balancing left out, none seen in train/val): %d messages, %s; "
                     "the file: %s", len(frames[NATURAL]), ", ".join(f"{counts.get(n, 0)} {n}" for n in self.label_names),
                     ", ".join(f"{share:.1%} {n}" for n, share in self.class_shares.items()))
        self.frames = frames
        self._log_overlap()
        self._encode()
        if self.output_dir is not None and self._is_global_zero():
            self.write_splits(self.output_dir)

    def _label_names(self, path: Path, frame: pd.DataFrame) -> list[str]:
        found = set(frame["label"])
        if self.labels is None:
            names = sorted(found)
        else:
            names = [str(name) for name in self.labels]
            unknown = frame[~frame["label"].isin(names)]
            if len(unknown):
                raise DataError(
                    f"{path}:{unknown['line'].iloc[0]}: label {unknown['label'].iloc[0]!r} is not in data.labels {names} "
                    f"({len(unknown)} row(s) like it); add it to data.labels or fix the file"
                )
            absent = [name for name in names if name not in found]
            if absent:
                raise DataError(f"{path}: class(es) {absent} listed in data.labels have no examples; remove them or add rows")
        if len(names) < 2:
            raise DataError(f"{path}: found only the label(s) {names}; a classifier needs at least two classes")
        return names

    def _log_overlap(self) -> None:
        train_texts = set(self.frames["train"]["text"])
        self.overlap = {split: int(self.frames[split]["text"].isin(train_texts).sum()) for split in ("val", "test")}
        rank_zero_log.info(
            "splits: %s; texts also in train: val %d/%d, test %d/%d%s",
            " / ".join(f"{s} {len(self.frames[s])}" for s in SPLITS),
            self.overlap["val"], len(self.frames["val"]), self.overlap["test"], len(self.frames["test"]),
            "" if self.dedupe else " (data.dedupe=true removes this leakage)",
        )

    def _encode(self) -> None:
        label_id = {name: i for i, name in enumerate(self.label_names)}
        ids = {split: encode_texts(self.frames[split]["text"].tolist()) for split in self.frames}
        too_long = sum(len(row) > self.context_length for rows in ids.values() for row in rows)
        if too_long:
            rank_zero_log.warning("%d message(s) longer than the context length %d were truncated", too_long, self.context_length)
        train_max = max(min(len(row), self.context_length) for row in ids["train"])
        self.pad_length = {"longest_train": train_max, "fixed": self.max_length, "model": self.context_length}.get(self.padding)
        limit = self.pad_length or self.context_length
        for split in self.frames:
            rows = [row[:limit] for row in ids[split]]
            self.datasets[split] = EncodedSplit(rows, [label_id[label] for label in self.frames[split]["label"]])
        rank_zero_log.info("padding=%s: %s", self.padding, f"every batch padded to {self.pad_length} tokens" if self.pad_length else "per batch")

    def write_splits(self, output_dir: str | os.PathLike) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for split, name in SPLIT_FILES.items():
            if split in self.frames:
                _write_atomic(out / name, self.frames[split][["text", "label"]].to_csv(index=False).encode())

    def _is_global_zero(self) -> bool:
        """Rank zero of a multi-process run; also before a trainer exists (the pipeline sets the data up first), when
        the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID) says which process this is."""
        return self.trainer.is_global_zero if self.trainer is not None else rank_zero_only.rank == 0

    def _world_size(self) -> int:
        return 1 if self.trainer is None else self.trainer.world_size

    # -- loaders -----------------------------------------------------------------------------------
    def collator(self, split: str) -> PadCollator:
        return PadCollator(self.pad_length, split, self.pad_to_multiple_of, self.context_length)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        if self.bucket and self._world_size() == 1:
            sampler = LengthBucketBatchSampler(dataset.lengths, self.batch_size, self.drop_last, self.seed)
            return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator("train"), num_workers=self.num_workers)
        if self.bucket:
            log.info("data.bucket is ignored with %d processes: each rank takes a DistributedSampler shard", self._world_size())
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(dataset), self.seed),
            drop_last=self.drop_last, collate_fn=self.collator("train"), num_workers=self.num_workers,
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every row of `split` in a fixed order: by length when bucketing (less padding), else file order."""
        dataset = self.datasets[split]
        if self._world_size() > 1:  # each rank its own rows, none repeated: metrics synced across ranks are exact
            sampler = UnpaddedShardSampler(dataset, self.trainer.world_size, self.trainer.global_rank)
            return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=self.collator(split),
                              num_workers=self.num_workers)
        if not self.bucket:
            return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=self.collator(split), num_workers=self.num_workers)
        order = sorted(range(len(dataset)), key=dataset.lengths.__getitem__)
        batches = [order[i : i + self.eval_batch_size] for i in range(0, len(order), self.eval_batch_size)]
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.collator(split), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self.eval_dataloader(split) for split in self.test_splits if split in self.datasets]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def describe(self) -> dict:
        """What prediction must repeat: label names and the padding rule (saved in checkpoints)."""
        return {"label_names": self.label_names, "padding": self.padding, "pad_length": self.pad_length,
                "context_length": self.context_length, "pad_to_multiple_of": self.pad_to_multiple_of}

