"""How a split's token ids become DataLoader batches: the dataset of (index, ids, label) items, the collator that
right-pads with <|endoftext|>, and the samplers (epoch-seeded shuffle, length buckets, unpadded evaluation shards)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from spamclf.batching import length_batches, round_up
from spamclf.tokenizer import PAD_ID


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
        width = self.pad_length or round_up(max(len(ids) for _, ids, _ in items), self.multiple_of, self.limit)
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
            batches += length_batches(self.lengths, order[start : start + pool], size=self.batch_size)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
