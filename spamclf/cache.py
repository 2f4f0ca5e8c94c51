"""Frozen-prefix activation cache: run the frozen blocks once per message, train only the suffix.

With `trainable_layers=last_block` on gpt2-small, blocks 1-11 produce the same hidden states every
epoch; this keeps them (in memory, or in a file above `max_memory_mb`) and serves them by row index.
It is exact: the suffix sees the very states the full forward would compute (see `rows_to_store`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spamclf.gpt2 import Packed, real_tokens
from spamclf.hardware import onednn_bf16_inference
from spamclf.tokenizer import PAD_ID

log = logging.getLogger(__name__)
FILL = 128  # packed batches are padded to a multiple of this many positions (small ones to a power of two)


def filled_rows(n: int) -> int:
    """How many rows a packed batch of n positions is padded to: few distinct matmul shapes (oneDNN generates
    and keeps kernels per shape), without computing 128 rows for one short message (the server's case)."""
    if n >= FILL:
        return -(-n // FILL) * FILL
    return max(16, 1 << (n - 1).bit_length())


def cache_blocker(depth: int, drop_rate: float, causal: bool, pooling: str, pad_length: int | None) -> str | None:
    """Why the prefix cannot be cached exactly, or None when it can."""
    if depth == 0:
        return "no frozen prefix (embeddings or the first block train)"
    if drop_rate > 0:
        return f"dropout ({drop_rate}) acts in the frozen prefix during training"
    if not causal and pooling == "last" and pad_length is None:
        return "without a causal mask, padding tokens see the batch-dependent padding width"
    return None


class PrefixCache:
    """Hidden states after `depth` frozen blocks for every row of one split.

    Row i keeps `stored[i]` positions. Under a causal mask a position's state depends only on the
    tokens up to it, so rows keep their real tokens, or up to the split's longest row when the
    classifier reads the padded last position (pooling=last); with fixed padding every row keeps the
    fixed width. Positions past what a row keeps are served as zeros: nothing reads them.
    """

    def __init__(self, flat: torch.Tensor, starts: list[int], stored: list[int], depth: int, path: str | None):
        self.flat, self.starts, self.stored, self.depth, self.path = flat, starts, stored, depth, path
        self.build_seconds = 0.0
        self._remove_file = weakref.finalize(self, _remove, path) if path else None  # spill files never outlive us

    @classmethod
    @torch.no_grad()
    def build(cls, model, dataset, pad_length: int | None, depth: int, pooling: str, use_mask: bool, *,
              dtype: torch.dtype, device: torch.device, tokens_per_batch: int = 2048, max_memory_mb: float = 4096,
              spill_dir: str | None = None, progress: Callable[[int], None] | None = None) -> PrefixCache:
        """Run `model`'s (a GPT2) embeddings and first `depth` blocks over every row of `dataset`
        (an EncodedSplit), padded as training pads it. `use_mask`: attend only to real tokens.
        `progress(n)` is called as each batch of n rows is done."""
        start = time.perf_counter()
        lengths = dataset.lengths
        widest = max(lengths)
        stored = [pad_length or (widest if pooling == "last" else n) for n in lengths]
        batches = _token_batches(stored, tokens_per_batch)
        starts, position = [0] * len(stored), 0  # rows are stored in build order: one copy per batch
        for r in (r for rows in batches for r in rows):
            starts[r], position = position, position + stored[r]
        shape = (position, model.cfg.emb_dim)
        nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
        path = None
        if nbytes > max_memory_mb * 2**20 and device.type == "cpu":
            fd, path = tempfile.mkstemp(prefix="spamclf-prefix-", suffix=".bin", dir=spill_dir)
            os.close(fd)
            flat = torch.from_file(path, shared=True, size=shape[0] * shape[1], dtype=dtype).view(shape)
        else:
            flat = torch.empty(shape, dtype=dtype, device=device)
        was_training = model.training
        model.eval()
        with onednn_bf16_inference(model, depth):
            for batch in packed_prefix(model, dataset.ids, stored, depth, use_mask, pad_length, batches=batches, device=device):
                start_row = starts[batch.rows[0]]
                flat[start_row : start_row + len(batch.hidden)] = batch.hidden.to(dtype)
                if progress is not None:
                    progress(len(batch.rows))
        model.train(was_training)
        release_freed_memory()
        seconds = time.perf_counter() - start
        log.info(
            "prefix cache: %d rows, %d positions after %d frozen block(s), %.1f MB %s, built in %.2fs",
            len(lengths), shape[0], depth, nbytes / 2**20, f"in {path}" if path else f"on {device}",
            seconds,
        )
        cache = cls(flat, starts, stored, depth, path)
        cache.build_seconds = seconds
        return cache

    def gather(self, index: torch.Tensor, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Hidden states [B, width, D] for the rows `index`."""
        out = torch.zeros(len(index), width, self.flat.shape[1], dtype=self.flat.dtype, device=self.flat.device)
        for j, r in enumerate(index.tolist()):
            n = min(self.stored[r], width)
            out[j, :n] = self.flat[self.starts[r] : self.starts[r] + n]
        return out.to(device=device, dtype=dtype, non_blocking=True)

    def close(self) -> None:
        if self._remove_file is not None:
            self._remove_file()


@dataclass
class PrefixBatch:
    rows: list[int]  # row numbers in the input
    input_ids: torch.Tensor  # [B, width], padded with <|endoftext|>
    lengths: torch.Tensor  # [B] real tokens per row (within width)
    packed: Packed  # where `hidden`'s rows sit on the [B, width] grid
    hidden: torch.Tensor  # [N, D]: the stored positions of every row, row after row

    def grid(self) -> torch.Tensor:
        """`hidden` put back on the padded [B, width, D] grid (zeros where nothing was computed)."""
        b, width = self.input_ids.shape
        out = self.hidden.new_zeros(b * width, self.hidden.shape[1]).index_copy_(0, self.packed.index, self.hidden)
        return out.view(b, width, -1)


def packed_prefix(model, ids: Sequence[Sequence[int]], stored: Sequence[int], depth: int, use_mask: bool,
                  pad_length: int | None, *, device: torch.device, batches: list[list[int]] | None = None,
                  tokens_per_batch: int = 2048, one_width: bool = False) -> Iterator[PrefixBatch]:
    """Embeddings and the first `depth` blocks of `model` (a GPT2) over rows of token ids, computing each
    row's first `stored[r]` positions (padding past a row's ids counts as tokens there).

    Rows go by width into batches of about `tokens_per_batch` positions; the linear layers see only
    the stored positions, packed ([N, D], N rounded up by `filled_rows`: few matmul shapes), while
    attention sees them on the padded grid. `use_mask`: attend only to real tokens. `pad_length`: the
    fixed width every row is padded to, or None. `one_width`: batch only rows of the same width (their
    results then never depend on others)."""
    context = model.cfg.context_length
    # Where trailing padding on the grid cannot reach what is computed (causal or masked attention, no
    # fixed width, widths that may differ), grid widths are rounded up to 16: fewer kernel shapes.
    align = 16 if (model.cfg.causal or use_mask) and pad_length is None and not one_width else 1
    for rows in batches if batches is not None else _token_batches(stored, tokens_per_batch, one_width):
        width = min(-(-max(stored[r] for r in rows) // align) * align, context)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : min(len(ids[r]), width)] = torch.as_tensor(ids[r][:width])
        lengths = torch.tensor([min(len(ids[r]), width) for r in rows])
        valid = real_tokens(lengths, width).to(device) if use_mask else None
        packed = Packed.of(real_tokens(torch.tensor([min(stored[r], width) for r in rows]), width).to(device))
        n = packed.index.numel()
        x = model.embed(input_ids.to(device)).flatten(0, 1).index_select(0, packed.index)
        hidden = model.run_blocks(F.pad(x, (0, 0, 0, filled_rows(n) - n)), 0, depth, valid, packed=packed)
        yield PrefixBatch(rows, input_ids, lengths, packed, hidden[:n])


def _token_batches(widths: Sequence[int], budget: int, one_width: bool = False) -> list[list[int]]:
    """Rows sorted by width, cut into batches of at most `budget` positions (or one row): similar widths
    go together (little padding on the attention grid), short messages many to a batch (big matmuls).
    `one_width`: every batch holds rows of a single width."""
    batches, rows, total = [], [], 0
    for r in sorted(range(len(widths)), key=widths.__getitem__):
        if rows and (total + widths[r] > budget or (one_width and widths[r] != widths[rows[0]])):
            batches.append(rows)
            rows, total = [], 0
        rows.append(r)
        total += widths[r]
    return batches + [rows] if rows else batches


def release_freed_memory() -> None:
    """Hand the activations' freed heap back to the OS (glibc keeps fragmented frees otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
