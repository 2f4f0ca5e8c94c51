"""Frozen-prefix activation cache: run the frozen blocks once per message, train only the suffix.

With `trainable_layers=last_block` on gpt2-small, blocks 1-11 produce the same hidden states every
epoch; this keeps them (in memory, or in a file above `max_memory_mb`) and serves them by row index.
It is exact: the suffix sees the very states the full forward would compute (see `rows_to_store`).
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spamclf.batching import length_batches
from spamclf.classifier import release_freed_memory
from spamclf.errors import InvalidOption, SpamclfError
from spamclf.heads import Readout, frozen_prefix_depth
from spamclf.kernels import onednn_bf16_inference
from spamclf.packing import packed_prefix
from spamclf.precision import dtype_of
from spamclf.prefix_store import (
    STORE,
    StoredStates,
    building_lock,
    cache_key,
    read_states,
    rows_digest,
    trial_label,
    weights_digest,
    write_states,
)
from spamclf.prepared import PreparedData
from spamclf.progress import progress_bar

log = logging.getLogger(__name__)
CACHE_DTYPES = ("auto", "bf16", "fp32")
READ_AROUND = 64 * 2**10  # Linux maps up to this much of the page cache around a faulting read (fault_around_bytes)


@dataclass(frozen=True)
class CacheSettings:
    """`model.prefix_cache`: whether to cache (`enabled`), the stored dtype (auto: bf16 under bf16 precision,
    else fp32), the size above which a CPU cache lives in a temporary file instead of memory (also what this
    process keeps for a sweep's next trials), and `dir`, a folder that trials in other processes share (null: none)."""

    enabled: bool = True
    dtype: str = "auto"
    max_memory_mb: float = 4096
    dir: str | None = None

    def __post_init__(self):
        if self.dtype not in CACHE_DTYPES:
            raise InvalidOption("prefix_cache.dtype", self.dtype, "one of " + ", ".join(CACHE_DTYPES))

    @classmethod
    def of(cls, value: bool | dict | CacheSettings) -> CacheSettings:
        """From the config's node (a dict of these fields), a bare on/off switch, or settings already."""
        if isinstance(value, cls):
            return value
        return cls(enabled=value) if isinstance(value, bool) else cls(**value)

    def as_dict(self) -> dict:
        """The fields as plain values; `dir` only where set (a run's location, not a setting of the model)."""
        fields = asdict(self)
        if fields["dir"] is None:
            del fields["dir"]
        return fields


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

    def __init__(self, flat: torch.Tensor, starts: list[int], stored: list[int], depth: int, path: str | None,
                 pages: SpillPages | None = None):
        self.flat, self.starts, self.stored, self.depth, self.path = flat, starts, stored, depth, path
        self.pages = pages  # the spill file's mapping (None in memory or on a device)
        self.build_seconds = 0.0
        # spill files never outlive us; the mapping first (it stays while views of it live), then the file
        self._release = weakref.finalize(self, _release, pages, path) if path else None

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

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
        # A repeated message (the SMS collection repeats ~7% of its texts) is computed once; its copies read the
        # same stored states, as they would read equal ones.
        first: dict[tuple, int] = {}
        distinct = [r for r in range(len(stored)) if first.setdefault((stored[r], tuple(dataset.ids[r])), r) == r]
        batches = length_batches(stored, distinct, tokens=tokens_per_batch)
        starts, position = [0] * len(stored), 0  # rows are stored in build order: one copy per batch
        for r in (r for rows in batches for r in rows):
            starts[r], position = position, position + stored[r]
        for r in range(len(stored)):
            starts[r] = starts[first[(stored[r], tuple(dataset.ids[r]))]]
        shape = (position, model.cfg.emb_dim)
        flat, path, pages = _storage(shape, dtype, device, max_memory_mb, spill_dir)
        was_training = model.training
        model.eval()
        with onednn_bf16_inference(model, depth):
            for batch in packed_prefix(model, dataset.ids, stored, depth, use_mask, pad_length, batches=batches,
                                       device=device):
                start_row = starts[batch.rows[0]]
                flat[start_row : start_row + len(batch.hidden)] = batch.hidden.to(dtype)
                if pages is not None:
                    pages.touched(len(batch.hidden))
                if progress is not None:
                    progress(len(batch.rows))
        if progress is not None:
            progress(len(stored) - len(distinct))
        model.train(was_training)
        release_freed_memory()
        seconds = time.perf_counter() - start
        log.info(
            "prefix cache: %d rows (%d distinct), %d positions after %d frozen block(s), %.1f MB %s, built in %.2fs",
            len(lengths), len(distinct), shape[0], depth, flat.nbytes / 2**20, f"in {path}" if path else f"on {device}",
            seconds,
        )
        cache = cls(flat, starts, stored, depth, path, pages)
        cache.build_seconds = seconds
        return cache

    def gather(self, index: torch.Tensor, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Hidden states [B, width, D] for the rows `index`."""
        out = torch.zeros(len(index), width, self.flat.shape[1], dtype=self.flat.dtype, device=self.flat.device)
        positions = 0
        for j, r in enumerate(index.tolist()):
            n = min(self.stored[r], width)
            out[j, :n] = self.flat[self.starts[r] : self.starts[r] + n]
            positions += n
        if self.pages is not None:
            self.pages.touched(positions, pieces=len(index))
        return out.to(device=device, dtype=dtype, non_blocking=True)

    def close(self) -> None:
        """Unmap and remove a spill file; the cache serves no rows after this."""
        if self._release is not None:
            # no view of ours pins the mapping then (views handed out still do)
            self.flat = torch.empty(0, self.flat.shape[1], dtype=self.flat.dtype)
            self._release()


class SplitCaches:
    """A run's prefix caches, one per split, each found or built the first time its split is evaluated or trained on
    (and kept: the frozen prefix never changes). A cache of the same key that an earlier trial of this process
    built is reused (`prefix_store.STORE`), or one in `settings.dir` that a trial in any process wrote."""

    def __init__(self, settings: CacheSettings):
        self.settings = settings
        self.caches: dict[str, PrefixCache | None] = {}
        self.built_seconds: dict[str, float] = {}  # splits this run built itself (reused ones cost nothing)
        self.digests: dict[int, str] = {}  # frozen depth -> the prefix weights' digest (frozen: computed once)

    def plan(self, model, readout: Readout, drop_rate: float, pad_length: int | None) -> tuple[int, str | None]:
        """(frozen depth, reason the prefix cannot be cached, or None)."""
        depth = frozen_prefix_depth(model)
        if not self.settings.enabled:
            return depth, "model.prefix_cache=false"
        return depth, cache_blocker(depth, drop_rate, readout.causal, readout.pooling, pad_length)

    def get(self, split: str, model, readout: Readout, drop_rate: float, data: PreparedData | None, precision: str,
            device: torch.device, show_progress: bool) -> PrefixCache | None:
        """The cache of `split` (one of `data.datasets`), or None when it cannot be cached or no data was handed
        over (a module used outside a training run)."""
        if split in self.caches:
            return self.caches[split]
        depth, reason = self.plan(model, readout, drop_rate, None if data is None else data.pad_length)
        if reason is not None or data is None or split not in data.datasets:
            if split == "train" and reason is not None:
                log.info("prefix cache off: %s", reason)
            self.caches[split] = None
            return None
        dataset, dtype = data.datasets[split], self.dtype(precision)

        def build() -> PrefixCache:
            with progress_bar(f"prefix cache ({split})", len(dataset), enabled=show_progress) as advance:
                cache = PrefixCache.build(
                    model, dataset, data.pad_length, depth, readout.pooling, readout.use_mask, dtype=dtype,
                    device=device, max_memory_mb=self.settings.max_memory_mb, progress=advance,
                )
            self.built_seconds[split] = cache.build_seconds
            return cache

        key = self.key(model, dataset.ids, depth, readout, data.pad_length, dtype, precision, device)
        self.caches[split] = self._find_or_build(split, key, build, device)
        return self.caches[split]

    def key(self, model, ids: list[list[int]], depth: int, readout: Readout, pad_length: int | None,
            dtype: torch.dtype, precision: str, device: torch.device) -> str:
        """Everything that changes the stored states, as one sha256 (`prefix_store.cache_key`)."""
        if depth not in self.digests:
            self.digests[depth] = weights_digest(model, depth)
        return cache_key(rows=rows_digest(ids), weights=self.digests[depth], depth=depth, pad_length=pad_length,
                         pooling=readout.pooling, use_mask=readout.use_mask, causal=readout.causal,
                         dtype=str(dtype), precision=precision, device=str(device))

    def _find_or_build(self, split: str, key: str, build: Callable[[], PrefixCache],
                       device: torch.device) -> PrefixCache:
        limit = int(self.settings.max_memory_mb * 2**20)
        found = STORE.get(key, limit)
        if found is not None:
            log.info("prefix cache (%s): reused (built by %s)", split, found[1])
            return found[0]
        if self.settings.dir is None:
            cache, built_by = build(), trial_label()
        else:
            cache, built_by = self._shared_file(split, key, build, device)
        STORE.put(key, cache, built_by, limit)
        return cache

    def _shared_file(self, split: str, key: str, build: Callable[[], PrefixCache],
                     device: torch.device) -> tuple[PrefixCache, str]:
        """(the cache, who built it) from `settings.dir`; built and written there first if no trial has."""
        folder = Path(self.settings.dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpamclfError(f"model.prefix_cache.dir={self.settings.dir}: cannot create the folder "
                               f"({error.strerror}); choose a writable folder, or null") from None
        path = folder / f"{key}.prefix"
        with building_lock(path, f"prefix cache ({split})"):
            states = read_states(path, key)
            if states is not None:
                log.info("prefix cache (%s): read from %s (built by %s)", split, path, states.built_by)
                flat = states.flat if device.type == "cpu" else states.flat.to(device)
                return PrefixCache(flat, states.starts, states.stored, states.depth, None), states.built_by
            cache, built_by = build(), trial_label()
            write_states(path, key, StoredStates(cache.flat, cache.starts, cache.stored, cache.depth, built_by))
            if cache.pages is not None:
                cache.pages.drop()  # writing it read every page
            log.info("prefix cache (%s): written to %s", split, path)
            return cache, built_by

    def dtype(self, precision: str) -> torch.dtype:
        """The stored dtype: as set, or (auto) bf16 when the run's precision computes in bf16, else fp32."""
        if self.settings.dtype == "auto":
            return torch.bfloat16 if dtype_of(precision) == torch.bfloat16 else torch.float32
        return torch.bfloat16 if self.settings.dtype == "bf16" else torch.float32

    @property
    def build_seconds(self) -> float:
        return sum(self.built_seconds.values())

    def close(self) -> None:
        """Drop this run's caches (other rows or weights follow); a spill file goes with the last reference to it."""
        for cache in self.caches.values():
            if cache is not None:
                cache.close()
        self.caches, self.built_seconds, self.digests = {}, {}, {}


class SpillPages:
    """The mapping of a spill file, and the pages this process touched in it.

    Every page of a file mapping that the process has read or written counts in its resident memory until
    unmapped, so a file the size of the cache would cost as much as keeping it in memory. Every `budget` bytes
    mapped (`touched` counts stored positions, and READ_AROUND for each separate piece), this drops the
    mapping's pages (MADV_DONTNEED): on a shared file mapping the data stays in the file and the page cache,
    which the kernel reclaims when memory runs short, and a later read maps the pages again. Where the platform
    has no MADV_DONTNEED, every page stays.
    """

    def __init__(self, mapping: mmap.mmap, position_bytes: int, budget: int):
        self.mapping, self.position_bytes, self.budget, self.since_drop = mapping, position_bytes, budget, 0

    @classmethod
    def budget_for(cls, max_memory_mb: float) -> int:
        """Bytes between drops: a quarter of the memory limit, at least 64 MB (a drop costs a page-table walk)."""
        return max(64 * 2**20, int(max_memory_mb * 2**20) // 4)

    def touched(self, positions: int, pieces: int = 1) -> None:
        self.since_drop += positions * self.position_bytes + pieces * READ_AROUND
        if self.since_drop >= self.budget:
            self.drop()

    def drop(self) -> None:
        """Unmap every page of the file from this process (its data stays in the file)."""
        if hasattr(mmap, "MADV_DONTNEED") and not self.mapping.closed:
            self.mapping.madvise(mmap.MADV_DONTNEED)
        self.since_drop = 0

    def close(self) -> None:
        """Unmap, unless a tensor still views the mapping: then it goes with the last such tensor."""
        try:
            self.mapping.close()
        except BufferError:
            pass


def _storage(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, max_memory_mb: float,
             spill_dir: str | None) -> tuple[torch.Tensor, str | None, SpillPages | None]:
    """An empty [positions, D] tensor for the states: in memory, or (over `max_memory_mb`, on the CPU) viewing a
    temporary file."""
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if not (nbytes > max_memory_mb * 2**20 and device.type == "cpu"):
        return torch.empty(shape, dtype=dtype, device=device), None, None
    fd, path = tempfile.mkstemp(prefix="spamclf-prefix-", suffix=".bin", dir=spill_dir)
    try:
        # Reserved now: a full disk is an OSError here, not a SIGBUS when a write through the mapping finds no space.
        os.posix_fallocate(fd, 0, nbytes) if hasattr(os, "posix_fallocate") else os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes)  # shared, read and write
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read in random order: no read-ahead into large pages
            mapping.madvise(mmap.MADV_RANDOM)
    except BaseException:
        os.remove(path)
        raise
    finally:
        os.close(fd)
    # torch.frombuffer keeps a reference to its argument but no buffer export: through a memoryview the mapping
    # cannot be closed (BufferError) while a tensor views it.
    flat = torch.frombuffer(memoryview(mapping), dtype=dtype).view(shape)
    return flat, path, SpillPages(mapping, flat[0].nbytes, SpillPages.budget_for(max_memory_mb))


def _release(pages: SpillPages | None, path: str) -> None:
    if pages is not None:
        pages.close()
    if os.path.exists(path):
        os.remove(path)
