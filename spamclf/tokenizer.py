"""GPT-2's byte-pair encoding, built offline from the BPE files shipped in `spamclf/assets/`.

The files are byte-identical to those `tiktoken.get_encoding("gpt2")` downloads (their hashes are
checked here as tiktoken checks them), so the ids are the same without network access.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

PAD_ID = 50256  # <|endoftext|>, GPT-2's only special token, doubles as padding
ENDOFTEXT = "<|endoftext|>"
VOCAB_SIZE = 50257

# tiktoken's regex for GPT-2 (r50k), copied from tiktoken_ext.openai_public so we do not import a private module.
_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def asset_path(name: str) -> str:
    """Path of a file shipped in spamclf/assets (the SMS collection, the BPE files)."""
    return str(files("spamclf") / "assets" / name)


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding, identical to `tiktoken.get_encoding("gpt2")`, built from packaged files."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=asset_path("vocab.bpe"),
        encoder_json_file=asset_path("encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: PAD_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_texts(texts: list[str]) -> list[list[int]]:
    """Token ids per text. A literal "<|endoftext|>" in user text is encoded as plain text, never as the
    special token, so no message can smuggle in padding. An empty text becomes [PAD_ID] so that every
    message has at least one position to classify."""
    # One text at a time: tiktoken's `encode_ordinary_batch` starts a pool of 8 threads per call, which on a 2-core
    # Intel Xeon with AMX cost 1.5 ms for 16 SMS (a server's batch) against 0.12 ms in a loop, and was slower for
    # 2,000 SMS too (54 vs 11 ms) and no faster for 100 texts of ~1,250 tokens (32 vs 24 ms).
    encoding = gpt2_encoding()
    ids = [encoding.encode_ordinary(text) for text in texts]
    return [row if row else [PAD_ID] for row in ids]


TRUNCATION = ("head", "tail", "head_tail")  # which tokens a message longer than the width keeps


def truncate(row: list[int], width: int, mode: str = "head") -> list[int]:
    """`row` cut to `width` tokens: its beginning (head), its end (tail), or both (head_tail: the first quarter of
    the width from the beginning, the rest from the end, the split that did best on long documents in Sun et al.,
    "How to Fine-Tune BERT for Text Classification?", 2019)."""
    if len(row) <= width:
        return row
    if mode == "head":
        return row[:width]
    if mode == "tail":
        return row[len(row) - width:]
    head = width // 4
    return row[:head] + row[len(row) - (width - head):]


def encode_truncated(texts: list[str], width: int, mode: str = "head") -> tuple[list[list[int]], list[bool]]:
    """Token ids cut to `width` as training cuts them (`truncate`), and whether each text was cut."""
    ids = encode_texts(texts)
    return [truncate(row, width, mode) for row in ids], [len(row) > width for row in ids]
