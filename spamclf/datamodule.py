"""The LightningDataModule: labelled text in, padded GPT-2 token batches out.

`SpamDataModule()` with no arguments is the book's recipe (ch. 6): the embedded SMS Spam Collection,
"ham" undersampled to the 747 "spam", shuffled and cut 70/10/20 with seed 123 (1,045 / 149 / 300
messages), every batch padded with <|endoftext|> to the longest training message.
It knows the tokenizer, never the model: reading is `spamclf.reading`, the splits `spamclf.splits`, the
batches `spamclf.loaders`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pandas as pd
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from spamclf.batching import length_batches
from spamclf.decision import positive_index
from spamclf.errors import DataError, InvalidOption
from spamclf.io import write_bytes
from spamclf.loaders import (
    EncodedSplit,
    EpochShuffleSampler,
    LengthBucketBatchSampler,
    PadCollator,
    UnpaddedShardSampler,
)
from spamclf.prepared import PreparedData
from spamclf.reading import (
    READERS,
    SMS_FILE,
    UCI_URL,
    download_sms,
    info_on_rank_zero,
    is_mail_data,
    read_labelled_file,
    read_mail_data,
    read_sms_as_the_book,
    warn_on_rank_zero,
)
from spamclf.splits import (
    NATURAL,
    SPLIT_FILES,
    SPLITS,
    balance_classes,
    book_natural_frame,
    natural_frame,
    same_rows,
    sample_at_most,
    split_frame,
)
from spamclf.tokenizer import TRUNCATION, asset_path, encode_texts, truncate

log = logging.getLogger(__name__)
PADDING_CHOICES = ("longest_train", "batch", "fixed", "model", "none")


def _check_reading(reader: str, splits: Sequence[float], truncation: str, natural_max, mail_headers) -> None:
    if reader not in READERS:
        raise InvalidOption("reader", reader, "one of " + ", ".join(READERS))
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) > 1 + 1e-9:
        raise InvalidOption("splits", list(splits),
                            "three non-negative fractions (train, val, test) summing to at most 1")
    if truncation not in TRUNCATION:
        raise InvalidOption("truncation", truncation, "one of " + ", ".join(TRUNCATION))
    if natural_max is not None and not (isinstance(natural_max, int) and natural_max > 0):
        raise InvalidOption("natural_max", natural_max, "a positive number of messages, or null for all")
    if isinstance(mail_headers, str) or not all(isinstance(name, str) for name in mail_headers):
        raise InvalidOption("mail_headers", mail_headers, "a list of header names, e.g. [From, To]")


def _check_batching(padding: str, max_length, batch_size: int, eval_batch_size: int, pad_to_multiple_of) -> None:
    if padding not in PADDING_CHOICES:
        raise InvalidOption("padding", padding, "one of " + ", ".join(PADDING_CHOICES))
    if padding == "fixed" and not (isinstance(max_length, int) and max_length > 0):
        raise InvalidOption("max_length", max_length, "a positive integer when padding=fixed")
    if padding == "none" and (batch_size != 1 or eval_batch_size != 1):
        raise InvalidOption(
            "padding", padding, "'none' only with batch_size=1 and eval_batch_size=1 (unpadded messages of different "
            "lengths cannot share a batch); use padding=batch, or batch_size=1 with trainer.accumulate_grad_batches"
        )
    if not (isinstance(pad_to_multiple_of, int) and pad_to_multiple_of >= 1):
        raise InvalidOption("pad_to_multiple_of", pad_to_multiple_of, "a positive integer")


class SpamDataModule(L.LightningDataModule):
    """Labelled text → balanced, split, tokenized, padded batches. Defaults are the book's recipe.

    Args:
        path: CSV, TSV or JSONL file, or a folder of mail with a subfolder per class (docs/mail.md); None means
            the embedded SMS Spam Collection.
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
        truncation: which tokens a message longer than its width keeps: head, tail or head_tail
            (`spamclf.tokenizer.truncate`); prediction cuts the same way.
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
        reader: how the SMS Spam Collection is read. `book` (the default): as the book's
            `pd.read_csv(sep="\\t", header=None)` does, 5,572 rows, so balancing and splitting give the
            book's train/validation/test files row for row; `exact`: every one of the 5,574 lines. A file of
            your own (`path`) and `dedupe=True` are always read exactly, and the natural set always holds
            the exact messages (see docs/book-protocol.md).
        mail_headers: with a mail folder, these headers (e.g. From) are put first in each text; prediction puts
            the same ones first.
        natural_max: the natural set sampled down to at most this many messages (with `seed`); None keeps all.
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
        reader: str = "book",
        truncation: str = "head",
        mail_headers: Sequence[str] = (),
        natural_max: int | None = None,
    ):
        super().__init__()
        eval_batch_size = eval_batch_size or batch_size
        _check_batching(padding, max_length, batch_size, eval_batch_size, pad_to_multiple_of)
        _check_reading(reader, splits, truncation, natural_max, mail_headers)
        mail_headers = [str(name) for name in mail_headers]
        splits, labels = tuple(splits), (list(labels) if labels is not None else None)
        self.save_hyperparameters(logger=False)  # every argument, as `self.hparams.<name>`
        self.protocol = "book" if reader == "book" and path is None and not dedupe else "exact"  # what setup reads
        self.frames: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, EncodedSplit] = {}
        self.label_names: list[str] = []
        self.pad_length: int | None = None
        self.overlap: dict[str, int] = {}
        self.truncated: dict[str, int] = {}  # per split, the messages cut to the width (data.truncation)
        self.class_shares: dict[str, float] = {}  # each class's share of the file (after dedupe, before balancing)
        self._test_splits: tuple[str, ...] = ("test",)
        self.natural_is_test = False  # the natural set holds exactly the test split's rows (`splits.same_rows`)

    # -- preparation -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def source_path(self) -> Path:
        h = self.hparams
        if h.path is not None:
            return Path(h.path).expanduser()
        if h.download:
            return download_sms(h.download_url, h.cache_dir)
        return Path(asset_path(SMS_FILE))

    def _read(self, path: Path) -> pd.DataFrame:
        h = self.hparams
        if is_mail_data(path):
            return read_mail_data(path, h.mail_headers)
        if h.mail_headers:
            raise DataError(f"{path}: data.mail_headers applies to a folder of mail, not a file of labelled texts; "
                            f"leave data.mail_headers empty")
        return read_labelled_file(path, h.format, h.text_column, h.label_column, h.encoding, h.header)

    def read_label_names(self) -> list[str]:
        """The class names in the order of the model's outputs (`data.labels`, or the file's labels sorted), for
        building the model before the Trainer sets the data up. Reads the file; prepares nothing."""
        path = self.source_path()
        return self._label_names(path, self._read(path))

    def evaluate_on(self, splits: Sequence[str]) -> None:
        """The splits `test_dataloader` serves, in this order (by default only `test`; the pipeline's final
        evaluation asks for train, val, test and natural). Splits this data does not have are left out."""
        self._test_splits = tuple(splits)

    def scored_with(self) -> dict[str, str]:
        """Splits asked for (`evaluate_on`) that `test_dataloader` leaves out because another split asked for holds
        the very same rows, each with that split: {natural: test} when the natural set is the test split (no
        message left out by balancing, none cut by natural_max), so the final evaluation scores them once."""
        if self.natural_is_test and {NATURAL, "test"} <= set(self._test_splits):
            return {NATURAL: "test"}
        return {}

    def prepared(self) -> PreparedData:
        """What the model needs from the set-up data (`SpamClassifier.use_data`), with the splits to report from
        another split's pass (`scored_with`)."""
        return PreparedData(self.datasets, self.pad_length, self.describe(), self.class_shares, self.scored_with())

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        h, path = self.hparams, self.source_path()
        frame = self._read(path)
        self.label_names = self._label_names(path, frame)
        try:
            positive_index(self.label_names, h.positive_label)
        except InvalidOption as e:
            raise DataError(f"data.{e}") from None
        if h.dedupe:
            before = len(frame)
            frame = frame.drop_duplicates(subset="text", keep="first")
            info_on_rank_zero("dedupe: dropped %d repeated text(s) before balancing", before - len(frame))
        everything = frame
        self.class_shares = {n: float((frame["label"] == n).mean()) for n in self.label_names}
        if h.reader == "book" and self.protocol == "exact":
            info_on_rank_zero("data.reader=book applies to the SMS Spam Collection without dedupe; with %s the data is "
                              "read exactly", "data.path" if h.path is not None else "data.dedupe=true")
        if self.protocol == "book":
            frame = read_sms_as_the_book(path)  # the rows the book balances and splits; `everything` stays exact
        rows = frame
        if h.balance:
            frame = balance_classes(frame, h.seed, self.label_names)
        frames = split_frame(frame, h.splits, h.seed)
        for split, part in frames.items():
            if part.empty:
                raise DataError(
                    f"{path}: the {split} split would be empty ({len(frame)} usable rows, splits={list(h.splits)}); "
                    f"add data or change data.splits"
                )
        if h.natural:
            frames[NATURAL] = self._natural(everything, rows, frame, frames)
            self.natural_is_test = same_rows(frames[NATURAL], frames["test"])
        self.frames = frames
        self._log_overlap()
        self._encode()
        if h.output_dir is not None:
            self.write_splits(h.output_dir)

    def _natural(self, everything: pd.DataFrame, rows: pd.DataFrame, used: pd.DataFrame,
                 frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """The natural-rate set (`spamclf.splits`), sampled down to `data.natural_max` messages when given."""
        h = self.hparams
        natural = (natural_frame(everything, used, frames) if self.protocol == "exact"
                   else book_natural_frame(everything, rows, used, frames))
        if h.natural_max is not None:
            kept = sample_at_most(natural, h.natural_max, h.seed)
            info_on_rank_zero("natural set: %d of %d messages (data.natural_max)", len(kept), len(natural))
            natural = kept
        self._log_natural(natural)
        return natural

    def _log_natural(self, natural: pd.DataFrame) -> None:
        counts = natural["label"].value_counts()
        info_on_rank_zero(
            "natural set (test + messages balancing left out, none seen in train/val): %d messages, %s; the file: %s",
            len(natural), ", ".join(f"{counts.get(n, 0)} {n}" for n in self.label_names),
            ", ".join(f"{share:.1%} {n}" for n, share in self.class_shares.items()),
        )

    def _label_names(self, path: Path, frame: pd.DataFrame) -> list[str]:
        found = set(frame["label"])
        if self.hparams.labels is None:
            names = sorted(found)
        else:
            names = [str(name) for name in self.hparams.labels]
            unknown = frame[~frame["label"].isin(names)]
            if len(unknown):
                label = unknown["label"].iloc[0]
                # a mail folder's labels are its subfolders; a file's, the rows' labels
                where = f"{path}:{unknown['line'].iloc[0]}" if "line" in unknown else str(path / label)
                raise DataError(f"{where}: label {label!r} is not in data.labels {names} ({len(unknown)} row(s) like "
                                f"it); add it to data.labels or fix the {'file' if 'line' in unknown else 'folder'}")
            absent = [name for name in names if name not in found]
            if absent:
                raise DataError(f"{path}: class(es) {absent} listed in data.labels have no examples; "
                                f"remove them or add rows")
        if len(names) < 2:
            raise DataError(f"{path}: found only the label(s) {names}; a classifier needs at least two classes")
        return names

    def _log_overlap(self) -> None:
        train_texts = set(self.frames["train"]["text"])
        self.overlap = {split: int(self.frames[split]["text"].isin(train_texts).sum()) for split in ("val", "test")}
        info_on_rank_zero(
            "splits: %s; texts also in train: val %d/%d, test %d/%d%s",
            " / ".join(f"{s} {len(self.frames[s])}" for s in SPLITS),
            self.overlap["val"], len(self.frames["val"]), self.overlap["test"], len(self.frames["test"]),
            "" if self.hparams.dedupe else " (data.dedupe=true removes this leakage)",
        )

    def _encode(self) -> None:
        h, label_id = self.hparams, {name: i for i, name in enumerate(self.label_names)}
        ids = {split: encode_texts(self.frames[split]["text"].tolist()) for split in self.frames
               if not (split == NATURAL and self.natural_is_test)}
        if self.natural_is_test:  # the same messages: tokenized once
            ids[NATURAL] = ids["test"]
        too_long = sum(len(row) > h.context_length for rows in ids.values() for row in rows)
        if too_long:
            warn_on_rank_zero("%d message(s) longer than the context length %d were truncated (data.truncation=%s)",
                              too_long, h.context_length, h.truncation)
        train_max = max(min(len(row), h.context_length) for row in ids["train"])
        self.pad_length = {"longest_train": train_max, "fixed": h.max_length, "model": h.context_length}.get(h.padding)
        limit = self.pad_length or h.context_length
        for split in self.frames:
            rows = [truncate(row, limit, h.truncation) for row in ids[split]]
            self.datasets[split] = EncodedSplit(rows, [label_id[label] for label in self.frames[split]["label"]])
        self.truncated = {split: sum(len(row) > limit for row in ids[split]) for split in self.frames}
        info_on_rank_zero("truncation=%s: messages longer than %d tokens cut: %s", h.truncation, limit,
                          ", ".join(f"{split} {n} of {len(ids[split])}" for split, n in self.truncated.items()))
        info_on_rank_zero("padding=%s: %s", h.padding,
                          f"every batch padded to {self.pad_length} tokens" if self.pad_length else "per batch")

    @rank_zero_only  # every rank prepares the same splits; one writes them
    def write_splits(self, output_dir: str | os.PathLike) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for split, name in SPLIT_FILES.items():
            if split in self.frames:
                write_bytes(out / name, self.frames[split][["text", "label"]].to_csv(index=False).encode())

    @property
    def world_size(self) -> int:
        """The Trainer's processes; a datamodule used without a Trainer is one."""
        return 1 if self.trainer is None else self.trainer.world_size

    # -- loaders -----------------------------------------------------------------------------------
    def collator(self, split: str) -> PadCollator:
        h = self.hparams
        return PadCollator(self.pad_length, split, h.pad_to_multiple_of, h.context_length)

    def _loader(self, split: str, **kwargs) -> DataLoader:
        return DataLoader(self.datasets[split], collate_fn=self.collator(split), num_workers=self.hparams.num_workers,
                          **kwargs)

    def train_dataloader(self) -> DataLoader:
        h, dataset = self.hparams, self.datasets["train"]
        if h.bucket and self.world_size == 1:
            return self._loader("train", batch_sampler=LengthBucketBatchSampler(dataset.lengths, h.batch_size,
                                                                                h.drop_last, h.seed))
        if h.bucket:
            log.info("data.bucket is ignored with %d processes: each rank takes a DistributedSampler shard",
                     self.world_size)
        return self._loader("train", batch_size=h.batch_size, sampler=EpochShuffleSampler(len(dataset), h.seed),
                            drop_last=h.drop_last)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every row of `split` in a fixed order: by length when bucketing (less padding), else file order."""
        h, dataset = self.hparams, self.datasets[split]
        if self.world_size > 1:  # each rank its own rows, none repeated: metrics synced across ranks are exact
            sampler = UnpaddedShardSampler(dataset, self.trainer.world_size, self.trainer.global_rank)
            return self._loader(split, batch_size=h.eval_batch_size, sampler=sampler)
        if not h.bucket:
            return self._loader(split, batch_size=h.eval_batch_size)
        return self._loader(split, batch_sampler=length_batches(dataset.lengths, size=h.eval_batch_size))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        reused = self.scored_with()
        if NATURAL in reused:
            info_on_rank_zero("natural set = test split: scored once")
        loaders = [self.eval_dataloader(split) for split in self._test_splits
                   if split in self.datasets and split not in reused]
        return loaders[0] if len(loaders) == 1 else loaders

    def describe(self) -> dict:
        """What prediction must repeat: label names, the padding rule, how long messages are cut and the mail
        headers put first in each text (saved in checkpoints)."""
        h = self.hparams
        return {"label_names": self.label_names, "padding": h.padding, "pad_length": self.pad_length,
                "context_length": h.context_length, "pad_to_multiple_of": h.pad_to_multiple_of,
                "truncation": h.truncation, "mail_headers": list(h.mail_headers)}
