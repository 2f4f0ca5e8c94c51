"""Does a quantized graph decide as its checkpoint does? `python -m spamclf.export --quantize int8` compares the
int8 graph's labels with the fp32 checkpoint's on the run's validation split (`validation.csv`, which training
writes beside `checkpoints/`) and says in one line when they agree on fewer than 99% of its messages."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import spamclf

FLOOR = 0.99  # below this share of equal labels on validation, the export warns


def validation_file(checkpoint: str | Path) -> Path:
    """Where a run keeps its validation split: <run>/validation.csv for <run>/checkpoints/<name>.ckpt."""
    return Path(checkpoint).resolve().parent.parent / "validation.csv"


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def label_agreement(reference, candidate, texts: list[str]) -> float:
    """The share of `texts` that two classifiers (anything with `.predict(texts)`) give the same label."""
    same = sum(a.label == b.label for a, b in zip(reference.predict(texts), candidate.predict(texts)))
    return same / len(texts) if texts else 1.0


def report_agreement(clf, graph: Path, out=sys.stderr) -> float | None:
    """Compare the graph at `graph` with the checkpoint's `clf` on the run's validation split; print one line
    (a warning below FLOOR, or when there is no validation split to compare on). Returns the agreement."""
    checkpoint = clf.about.get("checkpoint")
    where = validation_file(checkpoint) if checkpoint else None
    if where is None or not where.is_file():
        print(f"warning: agreement of the quantized graph with the checkpoint was not checked: no validation.csv "
              f"beside checkpoints/ ({where or 'no checkpoint path'})", file=out)
        return None
    texts = read_texts(where)
    share = label_agreement(clf, spamclf.load(graph), texts)
    if share < FLOOR:
        print(f"warning: the quantized graph gives the checkpoint's label to only {share:.1%} of the {len(texts)} "
              f"validation messages (below {FLOOR:.0%}); export without --quantize where labels must match", file=out)
    else:
        print(f"the quantized graph gives the checkpoint's label to {share:.1%} of the {len(texts)} validation "
              "messages", file=out)
    return share
