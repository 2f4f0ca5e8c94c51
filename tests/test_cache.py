import os
from functools import partial

import lightning as L
import pytest
import torch

from spamclf.datamodule import SpamDataModule
from spamclf.module import DataHandOver, SpamClassifier

pytestmark = pytest.mark.hardware  # the cache build is where the oneDNN kernels run


class StepLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(data_kwargs, model_kwargs, prefix_cache, max_memory_mb=4096, precision="32-true"):
    L.seed_everything(123)
    dm = SpamDataModule(**data_kwargs)
    clf = SpamClassifier("gpt2-tiny", weights="random", trainable_layers="last_block",
                         optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
                         prefix_cache={"enabled": prefix_cache, "max_memory_mb": max_memory_mb}, **model_kwargs)
    record = StepLosses()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=15, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0,
                        callbacks=[record, DataHandOver(dm, precision)], precision=precision)
    trainer.fit(clf, datamodule=dm)
    used = {split for split, cache in clf.caches.caches.items() if cache is not None}
    spilled = [c.path for c in clf.caches.caches.values() if c is not None and c.path]
    metrics = trainer.callback_metrics
    return record.losses, float(metrics["val/acc"]), float(metrics["val/loss"]), used, spilled


@pytest.mark.parametrize(
    "data_kwargs, model_kwargs",
    [
        ({}, {}),  # the book: padded to 120, last position
        ({"padding": "batch", "bucket": True, "eval_batch_size": 32}, {"pooling": "last_nonpad"}),  # experiment=fast
        ({"padding": "batch"}, {"pooling": "last"}),  # reads padding: the cache keeps the split's full width
        ({"padding": "batch"}, {"pooling": "mean", "causal": False}),  # masked, bidirectional
        # padding as tokens, fixed width
        ({"padding": "fixed", "max_length": 64}, {"pooling": "last", "causal": False}),
    ],
)
def test_cache_gives_the_same_steps_and_metrics(data_kwargs, model_kwargs):
    off = _run(data_kwargs, model_kwargs, prefix_cache=False)
    on = _run(data_kwargs, model_kwargs, prefix_cache=True)
    assert off[3] == set() and on[3] == {"train", "val"}
    assert len(on[0]) == len(off[0]) == 30
    assert torch.allclose(torch.tensor(on[0]), torch.tensor(off[0]), atol=1e-5, rtol=1e-4)
    assert on[1] == pytest.approx(off[1], abs=1e-6)
    assert on[2] == pytest.approx(off[2], abs=1e-4)


def test_cache_under_bf16_matches_within_bf16_rounding():
    """Under bf16 the cached prefix runs packed (other matmul shapes), so results agree to bf16 rounding."""
    kwargs = ({"padding": "batch", "bucket": True, "eval_batch_size": 32}, {"pooling": "last_nonpad"})
    off = _run(*kwargs, prefix_cache=False, precision="bf16-mixed")
    on = _run(*kwargs, prefix_cache=True, precision="bf16-mixed")
    assert on[3] == {"train", "val"}
    assert torch.allclose(torch.tensor(on[0]), torch.tensor(off[0]), atol=2e-2, rtol=2e-2)
    assert on[1] == pytest.approx(off[1], abs=0.02)


def test_cache_spills_to_a_file_above_its_memory_limit():
    kwargs = ({"padding": "batch", "bucket": True}, {"pooling": "last_nonpad"})
    in_memory = _run(*kwargs, prefix_cache=True)
    on_disk = _run(*kwargs, prefix_cache=True, max_memory_mb=0)
    assert on_disk[4] and not in_memory[4]
    assert torch.allclose(torch.tensor(on_disk[0]), torch.tensor(in_memory[0]), atol=1e-6)


@pytest.mark.parametrize(
    "model_kwargs, reason",
    [
        ({"trainable_layers": "all"}, "no frozen prefix"),
        ({"trainable_layers": "lora"}, "no frozen prefix"),
        ({"drop_rate": 0.1}, "dropout"),
        ({"pooling": "last", "causal": False}, "padding tokens see"),
        ({"prefix_cache": False}, "prefix_cache=false"),
    ],
)
def test_cache_turns_itself_off_where_it_would_not_be_exact(model_kwargs, reason):
    kwargs = {"trainable_layers": "last_block", **model_kwargs}
    clf = SpamClassifier("gpt2-tiny", weights="random", **kwargs)
    depth, why = clf.caches.plan(clf.model, clf.readout, clf.hparams.drop_rate, pad_length=None)
    assert why is not None and reason in why
    ok = SpamClassifier("gpt2-tiny", weights="random", trainable_layers="last_block")
    assert ok.caches.plan(ok.model, ok.readout, ok.hparams.drop_rate, pad_length=120) == (1, None)


@pytest.mark.parametrize("pooling, pad_length", [("last_nonpad", None), ("last", None), ("last", 12)])
def test_repeated_messages_are_computed_once_and_read_the_same_states(pooling, pad_length):
    from spamclf.cache import PrefixCache
    from spamclf.gpt2 import GPT2, preset
    from spamclf.loaders import EncodedSplit

    torch.manual_seed(0)
    model = GPT2.random(preset("gpt2-tiny")).eval()
    rows = [[5, 6, 7], [9, 8], [5, 6, 7], [1, 2, 3, 4], [9, 8], [5, 6]]
    build = dict(pad_length=pad_length, depth=1, pooling=pooling, use_mask=False, dtype=torch.float32,
                 device=torch.device("cpu"))
    done = []
    cache = PrefixCache.build(model, EncodedSplit(rows, [0] * len(rows)), **build, progress=done.append)
    distinct = PrefixCache.build(model, EncodedSplit([rows[i] for i in (0, 1, 3, 5)], [0] * 4), **build)
    assert sum(done) == len(rows)  # the progress bar still counts every row
    assert cache.flat.shape == distinct.flat.shape  # four distinct messages stored, not six
    index = torch.arange(len(rows))
    states = cache.gather(index, 4, torch.device("cpu"), torch.float32)
    assert torch.equal(states[2], states[0]) and torch.equal(states[4], states[1])
    expected = distinct.gather(torch.tensor([0, 1, 0, 2, 1, 3]), 4, torch.device("cpu"), torch.float32)
    assert torch.allclose(states, expected, atol=1e-6)


def _build_tiny(rows: list[list[int]], max_memory_mb: float, dtype=torch.float32, depth: int = 1, **kwargs):
    from spamclf.cache import PrefixCache
    from spamclf.gpt2 import GPT2, preset
    from spamclf.loaders import EncodedSplit

    torch.manual_seed(0)
    model = GPT2.random(preset("gpt2-tiny")).eval()
    return PrefixCache.build(model, EncodedSplit(rows, [0] * len(rows)), None, depth, "last_nonpad", False,
                             dtype=dtype, device=torch.device("cpu"), max_memory_mb=max_memory_mb, **kwargs)


def _random_rows(count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (count, length), generator=generator).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_spilled_cache_holds_the_in_memory_states_bit_for_bit_in_its_file(dtype):
    rows = [row[: 3 + i % 17] for i, row in enumerate(_random_rows(64, 20))]
    in_memory, spilled = _build_tiny(rows, 4096, dtype), _build_tiny(rows, 0, dtype)
    assert in_memory.path is None and spilled.path is not None and spilled.pages is not None
    assert torch.equal(spilled.flat, in_memory.flat)
    index = torch.randperm(len(rows))
    spilled.pages.budget = 0
    for _ in range(3):  # every read drops the pages (budget 0): the data comes back from the file
        assert torch.equal(spilled.gather(index, 20, torch.device("cpu"), dtype),
                           in_memory.gather(index, 20, torch.device("cpu"), dtype))
    raw = open(spilled.path, "rb").read()  # the tensor is the file, not a copy of it
    assert raw == in_memory.flat.view(torch.uint8).numpy().tobytes()


def test_closing_a_spilled_cache_removes_its_file_and_leaves_views_readable():
    import gc
    import os

    rows = _random_rows(8, 12)
    cache = _build_tiny(rows, 0)
    view, expected, path = cache.flat[2:5], cache.flat[2:5].clone(), cache.path
    cache.close()
    assert not os.path.exists(path) and cache.flat.numel() == 0
    assert torch.equal(view, expected)  # the mapping stays while a view of it lives
    dropped = _build_tiny(rows, 0)
    path = dropped.path
    del dropped
    gc.collect()
    assert not os.path.exists(path)


def _rss_file_kb() -> int:
    """Resident pages of mapped files: RssFile, plus RssShmem where the spill folder is a tmpfs."""
    fields = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith(("RssFile:", "RssShmem:"))}
    if "RssFile" not in fields:
        pytest.skip("no RssFile in /proc/self/status")
    return sum(fields.values())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_a_spilled_cache_keeps_only_a_budget_of_its_file_resident():
    """~300 MB of states (the embeddings: quick to compute) written to a file, every row read twice in
    batches of 64: the pages touched leave the mapping every budget (64 MB here), so the file never counts whole
    in the process's resident memory."""
    from spamclf.cache import SpillPages

    _build_tiny(_random_rows(64, 128), 0, depth=0)  # the code that runs below is loaded (and counted) already
    before = _rss_file_kb()
    cache = _build_tiny(_random_rows(9_600, 128, seed=1), 0, depth=0, tokens_per_batch=32768)
    budget = SpillPages.budget_for(0)
    assert cache.path is not None and cache.nbytes > 4.5 * budget
    grown = [_rss_file_kb() - before]
    for _ in range(2):
        for index in torch.randperm(9_600).split(64):
            cache.gather(index, 128, torch.device("cpu"), torch.float32)
            grown.append(_rss_file_kb() - before)
    assert max(grown) * 1024 < budget + 16 * 2**20 < cache.nbytes / 3
    cache.pages.budget = 2**62  # no drops: the measure does see the whole file
    for index in torch.arange(9_600).split(64):
        cache.gather(index, 128, torch.device("cpu"), torch.float32)
    assert (_rss_file_kb() - before) * 1024 > 0.9 * cache.nbytes
    cache.close()


def test_a_spilled_cache_written_to_the_shared_folder_reads_back_the_same_states(tmp_path):
    from spamclf.cache import CacheSettings, PrefixCache, SplitCaches
    from spamclf.loaders import EncodedSplit
    from spamclf.prefix_store import STORE
    from spamclf.prepared import PreparedData

    torch.manual_seed(0)
    clf = SpamClassifier("gpt2-tiny", weights="random", trainable_layers="last_block")
    rows = _random_rows(40, 16)
    data = PreparedData({"train": EncodedSplit(rows, [0] * len(rows))}, None, {"label_names": ["ham", "spam"]})

    def get():
        caches = SplitCaches(CacheSettings(max_memory_mb=0, dir=str(tmp_path)))
        return caches.get("train", clf.model, clf.readout, 0.0, data, "32-true", torch.device("cpu"), False)

    STORE.clear()
    written, read = get(), get()  # the second finds the file the first wrote (a spilled cache is never in STORE)
    assert written.path is not None and written.pages.since_drop == 0 and read is not written
    in_memory = PrefixCache.build(clf.model, data.datasets["train"], None, 1, clf.readout.pooling,
                                  clf.readout.use_mask, dtype=torch.float32, device=torch.device("cpu"))
    index = torch.arange(len(rows))
    assert torch.equal(read.flat, written.flat)
    assert torch.equal(written.gather(index, 16, torch.device("cpu"), torch.float32),
                       in_memory.gather(index, 16, torch.device("cpu"), torch.float32))
