"""A sweep's trials reuse the frozen-prefix cache: in one process (the basic launcher) and across processes
(`model.prefix_cache.dir`), only under the very key that built it, with the states of a fresh build bit for bit."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spamclf.cache import CacheSettings, PrefixCache, SplitCaches
from spamclf.loaders import EncodedSplit
from spamclf.module import SpamClassifier
from spamclf.prefix_store import STORE
from spamclf.prepared import PreparedData
from tests.helpers import ROOT, TINY, train_cli

pytestmark = pytest.mark.hardware  # the cache build is where the oneDNN kernels run
ROWS = [[5, 6, 7, 8], [9, 8], [5, 6, 7, 8], [1, 2, 3, 4, 5, 6], [40, 41, 42]]


@pytest.fixture(autouse=True)
def _empty_store():
    STORE.clear()
    yield
    STORE.clear()


def _classifier(seed: int = 0, trainable_layers: str = "last_block") -> SpamClassifier:
    torch.manual_seed(seed)
    return SpamClassifier("gpt2-tiny", weights="random", trainable_layers=trainable_layers)


def _data(rows: list[list[int]]) -> PreparedData:
    return PreparedData({"train": EncodedSplit(rows, [0] * len(rows))}, None, {"label_names": ["ham", "spam"]})


def _get(clf: SpamClassifier, rows=ROWS, **settings) -> PrefixCache:
    caches = SplitCaches(CacheSettings(**settings))
    return caches.get("train", clf.model, clf.readout, 0.0, _data(rows), "32-true", torch.device("cpu"), False)


def _fresh(clf: SpamClassifier, rows=ROWS) -> PrefixCache:
    return PrefixCache.build(clf.model, EncodedSplit(rows, [0] * len(rows)), None, 1, clf.readout.pooling,
                             clf.readout.use_mask, dtype=torch.float32, device=torch.device("cpu"))


def _same(a: PrefixCache, b: PrefixCache) -> bool:
    return torch.equal(a.flat, b.flat) and a.starts == b.starts and a.stored == b.stored and a.depth == b.depth


def test_a_later_trial_reuses_the_states_a_fresh_build_computes(caplog):
    clf = _classifier()
    with caplog.at_level(logging.INFO, logger="spamclf.cache"):
        built = _get(clf)
        reused = _get(_classifier())  # the next trial: the same seed gives the same prefix
    assert reused is built and "prefix cache (train): reused (built by process" in caplog.text
    assert _same(reused, _fresh(clf))


def test_a_cache_over_the_trials_memory_limit_is_not_served(caplog):
    clf = _classifier()
    _get(clf)
    with caplog.at_level(logging.INFO, logger="spamclf.cache"):
        spilled = _get(clf, max_memory_mb=0)
    assert "reused" not in caplog.text and spilled.path is not None


def test_a_cache_written_to_the_shared_folder_is_read_back_bit_for_bit(tmp_path, caplog):
    clf = _classifier()
    written = _get(clf, dir=str(tmp_path))
    STORE.clear()  # another process: nothing in memory
    with caplog.at_level(logging.INFO, logger="spamclf.cache"):
        read = _get(clf, dir=str(tmp_path))
    assert read is not written and "read from" in caplog.text
    assert _same(read, _fresh(clf)) and len(list(tmp_path.glob("*.prefix"))) == 1


@pytest.mark.parametrize("change", ["another seed", "deeper freezing", "other rows", "bf16 storage"])
def test_any_change_to_what_the_states_depend_on_builds_anew(change, tmp_path, caplog):
    base = _get(_classifier(), dir=str(tmp_path))
    clf = _classifier(seed=1 if change == "another seed" else 0,
                      trainable_layers="head" if change == "deeper freezing" else "last_block")
    rows = [*ROWS[:-1], [40, 41, 43]] if change == "other rows" else ROWS
    with caplog.at_level(logging.INFO, logger="spamclf.cache"):
        other = _get(clf, rows, dir=str(tmp_path), dtype="bf16" if change == "bf16 storage" else "auto")
    assert "reused" not in caplog.text and "read from" not in caplog.text
    assert not torch.equal(other.flat.float(), base.flat.float()) or other.depth != base.depth
    assert len(list(tmp_path.glob("*.prefix"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "another key", "not a cache"])
def test_a_damaged_or_foreign_file_is_never_served(damage, tmp_path, caplog):
    clf = _classifier()
    _get(clf, dir=str(tmp_path))
    path = next(tmp_path.glob("*.prefix"))
    content = path.read_bytes()
    damaged = {"truncated": content[:-8], "another key": content.replace(path.stem.encode(), b"0" * 64, 1),
               "not a cache": b"{}"}[damage]
    path.write_bytes(damaged)
    STORE.clear()
    with caplog.at_level(logging.INFO, logger="spamclf.cache"):
        rebuilt = _get(clf, dir=str(tmp_path))
    assert "read from" not in caplog.text and "written to" in caplog.text
    assert _same(rebuilt, _fresh(clf)) and path.read_bytes() == content


def test_an_unusable_cache_folder_is_one_line_naming_the_key(tmp_path):
    from spamclf.errors import SpamclfError

    (tmp_path / "file").write_text("")
    with pytest.raises(SpamclfError, match=r"^model.prefix_cache.dir=.*cannot create the folder.*null$"):
        _get(_classifier(), dir=str(tmp_path / "file" / "cache"))


BUILD_IN_A_PROCESS = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tests.test_cache_reuse import _classifier, _get
torch.save(_get(_classifier(), dir=sys.argv[1]).flat.clone(), sys.argv[2])
"""


def test_two_processes_sharing_a_folder_build_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"states{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_A_PROCESS, str(tmp_path / "shared"), str(out)],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for out in outs]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted("written to" in text for text in logs) == [False, True], logs
    assert sum("read from" in text for text in logs) == 1, logs
    assert len(list((tmp_path / "shared").glob("*.prefix"))) == 1
    assert torch.equal(torch.load(outs[0]), torch.load(outs[1]))


def _metrics_by_lr(folder: Path) -> dict[str, dict]:
    runs = {}
    for file in folder.rglob("metrics.json"):
        metrics = json.loads(file.read_text())
        metrics.pop("timings", None), metrics.pop("best_checkpoint", None)
        config = (file.parent / ".hydra" / "config.yaml").read_text()
        lr = next(line.split(":")[1].strip() for line in config.splitlines() if line.strip().startswith("lr:"))
        runs[lr] = metrics
    return runs


def test_a_basic_launcher_sweep_gives_each_trial_the_metrics_it_has_alone(tmp_path):
    common = [*TINY, "model.trainable_layers=last_block", "model.pooling=last_nonpad", "data.padding=batch",
              "data.max_length=24", "data.eval_batch_size=64", "trainer.limit_train_batches=20", "data.natural=false"]
    lrs = ["0.001", "0.002", "0.005"]
    sweep = train_cli(["-m", *common, f"model.optimizer.lr={','.join(lrs)}"], tmp_path / "sweep", timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for trial in ("1", "2"):
        log = next(p for p in (tmp_path / "sweep").rglob("train.log") if p.parent.name == trial).read_text()
        assert "prefix cache (train): reused (built by trial 0)" in log and "built in" not in log, log[-3000:]
    for lr in lrs:
        alone = train_cli([*common, f"model.optimizer.lr={lr}"], tmp_path / "alone" / lr, timeout=600)
        assert alone.returncode == 0, alone.stderr[-3000:]
    swept, single = _metrics_by_lr(tmp_path / "sweep"), _metrics_by_lr(tmp_path / "alone")
    assert sorted(swept) == sorted(single) == lrs
    assert all(swept[lr] == single[lr] for lr in lrs), (swept, single)


def test_a_second_hand_over_of_the_same_splits_keeps_the_caches_and_other_rows_drop_them(monkeypatch):
    clf, data = _classifier(), _data(ROWS)
    closed = []
    monkeypatch.setattr(clf.caches, "close", lambda: closed.append(True))
    clf.use_data(data, "32-true")
    again = PreparedData(data.datasets, data.pad_length, data.tokenization, scored_with={"natural": "test"})
    clf.use_data(again, "32-true")  # the Trainer sets the data up again for the test: the same rows
    assert closed == []  # the caches built during fit (a spilled one included) stay for the final evaluation
    clf.use_data(_data(ROWS), "32-true")  # other rows, even if equal: built for other objects
    assert closed == [True]
