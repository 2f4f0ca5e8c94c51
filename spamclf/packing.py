"""GPT-2's frozen prefix over packed token-budget batches: the linear layers see only the positions that are
computed ([N, D], no padding rows), attention sees them on the padded grid. The prefix cache build and the
classifier's prediction both run through `packed_prefix`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spamclf.batching import filled_rows, length_batches
from spamclf.gpt2 import Packed, real_tokens
from spamclf.tokenizer import PAD_ID


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

    Rows go by width into batches of about `tokens_per_batch` positions (`spamclf.batching`); the packed rows
    are rounded up by `filled_rows` (few matmul shapes). `use_mask`: attend only to real tokens. `pad_length`:
    the fixed width every row is padded to, or None. `one_width`: batch only rows of the same width (their
    results then never depend on others)."""
    context = model.cfg.context_length
    # Where trailing padding on the grid cannot reach what is computed (causal or masked attention, no
    # fixed width, widths that may differ), grid widths are rounded up to 16: fewer kernel shapes.
    align = 16 if (model.cfg.causal or use_mask) and pad_length is None and not one_width else 1
    if batches is None:
        batches = length_batches(stored, tokens=tokens_per_batch, one_width=one_width)
    for rows in batches:
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
