"""Prefix caches kept across the trials of a sweep: in this process (an LRU bounded by bytes) and on disk
(content-addressed files that trials running in parallel share). A cache is found only by its key, a sha256 over
everything that changes its states: the split's token ids, the frozen prefix's weights and config, its depth, the
stored widths rule, the mask, the stored dtype, the computing precision and the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from spamclf.io import atomic_file

log = logging.getLogger(__name__)
FILE_FORMAT = "spamclf-prefix-cache/1"
DATA_ALIGNMENT = 64  # the states start at a multiple of this offset, after the JSON header


def weights_digest(model, depth: int) -> str:
    """sha256 over the GPT2 `model`'s config and the bytes of its embeddings and first `depth` blocks: whatever
    the weights came from (a file, a seed, a config), equal digests mean equal prefixes."""
    digest = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True, default=str).encode())
    parts = {"tok_emb": model.tok_emb, "pos_emb": model.pos_emb}
    parts.update({f"trf_blocks.{i}": block for i, block in enumerate(model.trf_blocks[:depth])})
    for prefix, module in parts.items():
        for name, param in module.named_parameters():
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def rows_digest(ids: list[list[int]]) -> str:
    """sha256 over a split's token ids, row by row (each row's length first, so rows cannot run into each other)."""
    digest = hashlib.sha256()
    for row in ids:
        digest.update(len(row).to_bytes(8, "little"))
        digest.update(array("q", row).tobytes())
    return digest.hexdigest()


def cache_key(**parts) -> str:
    """The key of a cache from its parts (digests and settings, all plain values); torch's version included, since
    another build of the kernels may round differently."""
    described = {**parts, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def trial_label() -> str:
    """Who builds: 'trial N' in a Hydra multirun, the run's output folder in a single Hydra run, else the process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return f"process {os.getpid()}"
    config = HydraConfig.get()
    return f"trial {config.job.num}" if config.mode == RunMode.MULTIRUN else str(config.runtime.output_dir)


class MemoryStore:
    """Caches (any object with `nbytes`) by key, least recently used first out, at most `limit` bytes in all."""

    def __init__(self):
        self.entries: OrderedDict[str, tuple[object, str]] = OrderedDict()

    def get(self, key: str, limit: int) -> tuple[object, str] | None:
        """(cache, who built it), or None; a cache over this trial's `limit` is not served: it keeps less."""
        entry = self.entries.get(key)
        if entry is None or entry[0].nbytes > limit:
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, cache, built_by: str, limit: int) -> None:
        if cache.nbytes > limit:
            return
        self.entries[key] = (cache, built_by)
        self.entries.move_to_end(key)
        while sum(c.nbytes for c, _ in self.entries.values()) > limit:
            self.entries.popitem(last=False)  # a trial still using an evicted cache keeps its own reference

    def clear(self) -> None:
        self.entries.clear()


STORE = MemoryStore()  # one per process: Hydra's basic launcher runs a sweep's trials one after another in it


@dataclass(frozen=True)
class StoredStates:
    """A cache file's contents: the states (memory-mapped, copy on write) and where each row's start."""

    flat: torch.Tensor
    starts: list[int]
    stored: list[int]
    depth: int
    built_by: str


def _data_offset(header_size: int) -> int:
    return -(-(8 + header_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT


def write_states(path: Path, key: str, states: StoredStates) -> None:
    """The file appears whole under its final name or not at all (temporary sibling, then rename)."""
    flat = states.flat.detach().cpu().contiguous()
    header = json.dumps({"format": FILE_FORMAT, "key": key, "shape": list(flat.shape),
                         "dtype": str(flat.dtype).removeprefix("torch."), "starts": states.starts,
                         "stored": states.stored, "depth": states.depth, "built_by": states.built_by}).encode()
    with atomic_file(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.write(b"\0" * (_data_offset(len(header)) - 8 - len(header)))
        for rows in flat.reshape(-1, flat.shape[-1]).split(4096):
            fh.write(rows.reshape(-1).view(torch.uint8).numpy().data)


def read_states(path: Path, key: str) -> StoredStates | None:
    """The states of `path`, or None when it is absent or is not whole and of this key (its header says)."""
    try:
        with open(path, "rb") as fh:
            header_size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_size))
        if header.get("format") != FILE_FORMAT or header.get("key") != key:
            return None
        dtype, shape = getattr(torch, header["dtype"]), tuple(header["shape"])
        nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
        offset = _data_offset(header_size)
        if os.path.getsize(path) != offset + nbytes or nbytes == 0:
            return None
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    flat = torch.from_numpy(raw).view(dtype).view(shape)
    return StoredStates(flat, header["starts"], header["stored"], header["depth"], header["built_by"])


@contextmanager
def building_lock(path: Path, what: str) -> Iterator[None]:
    """One process builds `path` while the others wait for it (a lock file beside it)."""
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for another trial to finish %s", what, path.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
