"""How a message longer than the width is cut: head, tail or head_tail, the same rule everywhere."""

import logging

import pytest

from spamclf.errors import InvalidOption
from spamclf.tokenizer import TRUNCATION, encode_texts, encode_truncated, truncate


@pytest.mark.parametrize("mode", TRUNCATION)
def test_short_rows_are_kept_whole(mode):
    assert truncate([1, 2, 3], 3, mode) == [1, 2, 3]


def test_each_mode_keeps_its_part():
    row = list(range(100))
    assert truncate(row, 8, "head") == list(range(8))
    assert truncate(row, 8, "tail") == list(range(92, 100))
    # a quarter of the width from the beginning, the rest from the end
    assert truncate(row, 8, "head_tail") == [0, 1, *range(94, 100)]


def test_encoded_texts_are_cut_and_marked():
    long_text = " ".join(f"word{i}" for i in range(50))
    full = encode_texts([long_text])[0]
    ids, cut = encode_truncated([long_text, "hi"], 10, "tail")
    assert ids[0] == full[-10:] and ids[1] == encode_texts(["hi"])[0]
    assert cut == [True, False]


@pytest.mark.parametrize("mode", TRUNCATION)
def test_training_rows_are_cut_by_the_mode_and_counted_per_split(mode, caplog):
    from spamclf.datamodule import SpamDataModule

    caplog.set_level(logging.INFO)
    dm = SpamDataModule(padding="fixed", max_length=16, truncation=mode, natural=False)
    dm.setup()
    for split, frame in dm.frames.items():
        full = encode_texts(frame["text"].tolist())
        assert dm.datasets[split].ids == [truncate(row, 16, mode) for row in full]
        assert dm.truncated[split] == sum(len(row) > 16 for row in full) > 0
    counts = ", ".join(f"{split} {n} of {len(dm.frames[split])}" for split, n in dm.truncated.items())
    assert f"truncation={mode}: messages longer than 16 tokens cut: {counts}" in caplog.text
    assert dm.describe()["truncation"] == mode


def test_an_unknown_mode_is_a_one_line_error():
    from spamclf.datamodule import SpamDataModule

    with pytest.raises(InvalidOption, match=r"^truncation='middle' is not valid; choose one of head, tail, head_tail$"):
        SpamDataModule(truncation="middle")
