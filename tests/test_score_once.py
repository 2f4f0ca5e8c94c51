"""A run whose natural set is its test split scores those messages once, and reports the natural set as a pass of
its own would have: the same metrics.json entries, computed from the test pass."""

import json

import pytest

from spamclf.cache import SplitCaches
from spamclf.datamodule import SpamDataModule
from spamclf.pipeline import run
from spamclf.reading import SMS_FILE, read_labelled_file
from spamclf.splits import NATURAL
from spamclf.tokenizer import asset_path
from tests.helpers import TINY, compose_cfg


@pytest.fixture(scope="module")
def distinct_sms(tmp_path_factory):
    """400 distinct SMS messages as a CSV: unbalanced on purpose, no text repeated, so with data.balance=false the
    natural set is exactly the test split."""
    frame = read_labelled_file(asset_path(SMS_FILE), "sms").drop_duplicates(subset="text").head(400)
    path = tmp_path_factory.mktemp("data") / "sms.csv"
    frame[["text", "label"]].to_csv(path, index=False)
    return path


def _run(distinct_sms, tmp_path, monkeypatch) -> tuple[dict, list[str], list[str]]:
    """metrics.json of a balance=false run whose frozen first block is cached, the splits the data served loaders
    for and the splits whose prefix cache the model asked for."""
    loaded, cached = [], []
    eval_dataloader, get = SpamDataModule.eval_dataloader, SplitCaches.get
    monkeypatch.setattr(SpamDataModule, "eval_dataloader", lambda dm, split: loaded.append(split) or
                        eval_dataloader(dm, split))
    monkeypatch.setattr(SplitCaches, "get", lambda caches, split, *a: cached.append(split) or get(caches, split, *a))
    cfg = compose_cfg([*TINY, "data=csv", f"data.path={distinct_sms}", "model.trainable_layers=last_block",
                       "data.padding=batch", "data.eval_batch_size=32"], tmp_path)
    run(cfg)
    return json.loads((tmp_path / "metrics.json").read_text()), loaded, cached


def test_natural_equal_to_test_is_scored_once_with_the_two_pass_numbers(distinct_sms, tmp_path, monkeypatch,
                                                                        caplog_info):
    once, loaded, cached = _run(distinct_sms, tmp_path / "once", monkeypatch)
    assert loaded.count("test") == 1 and NATURAL not in loaded and NATURAL not in cached and "test" in cached
    assert caplog_info.text.count("natural set = test split: scored once") == 1
    monkeypatch.undo()
    # the same run made to score the natural set in a pass of its own, as before
    monkeypatch.setattr(SpamDataModule, "scored_with", lambda dm: {})
    twice, loaded, cached = _run(distinct_sms, tmp_path / "twice", monkeypatch)
    assert loaded.count(NATURAL) == 1 and NATURAL in cached
    assert set(once[NATURAL]) >= {"acc", "loss", "auroc", "fpr", "precision_at_prevalence"}
    natural = once["operating_point"][NATURAL]
    assert natural["count"] == once["operating_point"]["test"]["count"] and "prevalence" in natural
    # the same figures, to the last bit (compared as JSON text, where NaN equals NaN)
    for split in ("test", NATURAL):
        assert _json(once[split]) == _json(twice[split])
        assert _json(once["operating_point"][split]) == _json(twice["operating_point"][split])


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)
