"""Which rows go together, how wide a batch is and how it is padded: the one length-bucketing rule and the one
right padding, shared by training batches, the prefix cache build and prediction (torch or ONNX Runtime). Plain
Python: no torch import."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spamclf.tokenizer import PAD_ID

FILL = 128  # packed batches are padded to a multiple of this many positions (small ones to a power of two)


def length_batches(widths: Sequence[int], rows: Iterable[int] | None = None, *, size: int | None = None,
                   tokens: int | None = None, one_width: bool = False,
                   padding_slack: float | None = None) -> list[list[int]]:
    """`rows` (default: all) sorted by width (ties keep their order), cut into batches of `size` rows or of at
    most `tokens` positions (a wider row goes alone): similar widths together, so little padding, and short rows
    many to a batch. `one_width`: every batch holds rows of a single width. `padding_slack`: a batch padded to its
    widest row holds at most about this many times its real positions (before any rounding of the width; a few
    texts of any lengths, a server's batch, become batches of similar lengths)."""
    batches, batch, total = [], [], 0
    for r in sorted(range(len(widths)) if rows is None else rows, key=widths.__getitem__):
        full = (size is not None and len(batch) == size) or (tokens is not None and total + widths[r] > tokens)
        padded = padding_slack is not None and (len(batch) + 1) * widths[r] > padding_slack * (total + widths[r])
        if batch and (full or padded or (one_width and widths[r] != widths[batch[0]])):
            batches.append(batch)
            batch, total = [], 0
        batch.append(r)
        total += widths[r]
    return batches + [batch] if batch else batches


def filled_rows(n: int) -> int:
    """How many rows a packed batch of n positions is padded to: few distinct matmul shapes (oneDNN generates
    and keeps kernels per shape), without computing 128 rows for one short message (a server's case)."""
    if n >= FILL:
        return -(-n // FILL) * FILL
    return max(16, 1 << (n - 1).bit_length())


def round_up(width: int, multiple: int, limit: int | None = None) -> int:
    """`width` rounded up to a multiple of `multiple`, at most `limit`."""
    rounded = -(-width // multiple) * multiple
    return min(rounded, limit) if limit else rounded


def right_padded(rows: Sequence[Sequence[int]], width: int, pad: int = PAD_ID) -> tuple[list[list[int]], list[int]]:
    """`rows` of token ids cut to `width` and right-padded to it with `pad` (<|endoftext|>), and how many real
    tokens each keeps."""
    cut = [list(row[:width]) for row in rows]
    return [row + [pad] * (width - len(row)) for row in cut], [len(row) for row in cut]
