"""GPT-2's frozen prefix over packed token-budget batches: the linear layers see only the positions that are
computed ([N, D], no padding rows), attention sees them on the padded grid. The prefix cache build runs
through `packed_prefix`, the classifier's prediction through `prefix_batch` (one batch at a time)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spamclf.batching import filled_rows, length_batches, right_padded, round_up
from spamclf.gpt2 import Packed, real_tokens


@dataclass
class PrefixBatch:
    input_ids: torch.Tensor  # [B, width], padded with <|endoftext|>
    lengths: torch.Tensor  # [B] real tokens per row (within width)
    packed: Packed  # where `hidden`'s rows sit on the [B, width] grid
    hidden: torch.Tensor  # [N, D]: the stored positions of every row, row after row
    rows: list[int] = field(default_factory=list)  # row numbers in the input

    def grid(self) -> torch.Tensor:
        """`hidden` put back on the padded [B, width, D] grid (zeros where nothing was computed)."""
        b, width = self.input_ids.shape
        out = self.hidden.new_zeros(b * width, self.hidden.shape[1]).index_copy_(0, self.packed.index, self.hidden)
        return out.view(b, width, -1)


def grid_align(model, use_mask: bool, pad_length: int | None, one_width: bool) -> int:
    """What batch widths are rounded up to a multiple of: 16 (fewer kernel shapes) where trailing padding on the
    grid cannot reach what is computed (causal or masked attention, no fixed width, widths that may differ)."""
    return 16 if (model.cfg.causal or use_mask) and pad_length is None and not one_width else 1


def prefix_batch(model, input_ids: torch.Tensor, lengths: torch.Tensor, stored: torch.Tensor, depth: int,
                 use_mask: bool, device: torch.device, rows: list[int] | None = None) -> PrefixBatch:
    """Embeddings and the first `depth` blocks of `model` (a GPT2) over one right-padded batch [B, width] with
    `lengths` real tokens, computing each row's first `stored` positions (at most width) only."""
    width = input_ids.shape[1]
    valid = real_tokens(lengths, width).to(device) if use_mask else None
    packed = Packed.of(real_tokens(stored, width).to(device))
    n = packed.index.numel()
    x = model.embed(input_ids.to(device)).flatten(0, 1).index_select(0, packed.index)
    hidden = model.run_blocks(F.pad(x, (0, 0, 0, filled_rows(n) - n)), 0, depth, valid, packed=packed)
    return PrefixBatch(input_ids, lengths, packed, hidden[:n], rows or [])


def packed_prefix(model, ids: Sequence[Sequence[int]], stored: Sequence[int], depth: int, use_mask: bool,
                  pad_length: int | None, *, device: torch.device, batches: list[list[int]] | None = None,
                  tokens_per_batch: int = 2048, one_width: bool = False) -> Iterator[PrefixBatch]:
    """`prefix_batch` over rows of token ids, computing each row's first `stored[r]` positions (padding past a
    row's ids counts as tokens there).

    Rows go by width into batches of about `tokens_per_batch` positions (`spamclf.batching`); the packed rows
    are rounded up by `filled_rows` (few matmul shapes). `use_mask`: attend only to real tokens. `pad_length`:
    the fixed width every row is padded to, or None. `one_width`: batch only rows of the same width (their
    results then never depend on others)."""
    align = grid_align(model, use_mask, pad_length, one_width)
    if batches is None:
        batches = length_batches(stored, tokens=tokens_per_batch, one_width=one_width)
    for rows in batches:
        width = round_up(max(stored[r] for r in rows), align, model.cfg.context_length)
        input_ids, lengths = right_padded([ids[r] for r in rows], width)
        yield prefix_batch(model, torch.tensor(input_ids), torch.tensor(lengths),
                           torch.tensor([min(stored[r], width) for r in rows]), depth, use_mask, device, rows)
