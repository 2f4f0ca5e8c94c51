"""From one labelled frame to the book's splits: classes balanced by undersampling, shuffled and cut 70/10/20 with
`int()` as the book's `random_split` does, and the natural-rate evaluation set of everything balancing left out.

Under the book's reading (`data.reader=book`, `spamclf.reading.read_sms_as_the_book`) a row is a run of file
lines, `line` … `line + span - 1` (one merged row holds three), and the natural set maps rows onto the exact
messages of those lines (docs/book-protocol.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

SPLITS = ("train", "val", "test")
NATURAL = "natural"  # the test split plus every message balancing left out, at the file's own class ratio
SPLIT_FILES = {"train": "train.csv", "val": "validation.csv", "test": "test.csv", NATURAL: "natural.csv"}


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


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two splits hold the same texts with the same labels in the same order. Order counts: scored in the
    same batches, the two give the very same numbers (a multiset match would be batched, and summed, differently);
    the natural set starts with the test split in its order, so when it is the test split it matches in order."""
    columns = ["text", "label"]
    return len(a) == len(b) and a[columns].reset_index(drop=True).equals(b[columns].reset_index(drop=True))


def sample_at_most(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most `limit` rows of `frame` drawn with `random_state=seed`, in the frame's order (None: every row)."""
    if limit is None or len(frame) <= limit:
        return frame
    return frame.sample(limit, random_state=seed).sort_index().reset_index(drop=True)


def spanned_lines(rows: pd.DataFrame) -> list[int]:
    """Every line of the file the given book rows hold, in row order (a merged row gives all its lines)."""
    return [line + k for line, span in zip(rows["line"], rows["span"]) for k in range(span)]


def book_natural_frame(everything: pd.DataFrame, book: pd.DataFrame, used: pd.DataFrame,
                       splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The natural set under the book's reading, made of exact messages (`everything`, one per line).

    The same rule as `natural_frame`, with rows mapped onto lines: the messages on the lines of
    the test split's rows (in test order), then every message on a line no balanced row holds (file order);
    dropped: any message on a line of a training or validation row, and any message whose text, as the file
    has it or as the book reads it, is a training or validation text (either reading). `book` is every row
    the book's reader gave, `used` the balanced rows, `splits` their train/val/test split.
    """
    train_val = pd.concat([splits["train"], splits["val"]])
    taken = set(spanned_lines(train_val))
    test_order = {line: i for i, line in enumerate(spanned_lines(splits["test"]))}
    used_lines = set(spanned_lines(used))
    in_test = everything[everything["line"].isin(test_order)]
    in_test = in_test.iloc[in_test["line"].map(test_order).argsort(kind="stable")]
    unused = everything[~everything["line"].isin(used_lines)]
    natural = pd.concat([in_test, unused])
    seen = set(train_val["text"]) | set(everything.loc[everything["line"].isin(taken), "text"])
    single = book[book["span"] == 1]
    as_the_book = natural["line"].map(dict(zip(single["line"], single["text"])))  # NaN for the merged lines
    unseen = ~natural["text"].isin(seen) & ~as_the_book.isin(seen)
    return natural[unseen].reset_index(drop=True)
