"""How a message longer than the width is cut: head, tail or head_tail, the same rule everywhere."""

import pytest

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
