"""What every trained classifier does, whatever runs its network: texts in, `Prediction`s out.

`TextClassifier` holds the rules prediction must repeat from training, written once: tokenization and
truncation to the trained width, identical texts computed once, the batch plan (length buckets of about
`batch_tokens` positions, right padding with <|endoftext|>), the decision and the model card. A backend — the
torch `spamclf.inference.Classifier` or ONNX Runtime's `spamclf.onnx_classifier.OnnxClassifier` — supplies only
`forward` (a padded batch → class probabilities) and its card's source entries. Plain Python: no torch.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

from spamclf.batching import length_batches, right_padded, round_up
from spamclf.decision import Decision, Prediction
from spamclf.errors import CheckpointError
from spamclf.tokenizer import TRUNCATION, encode_truncated

PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")  # what `--precision` offers; Lightning's own names work too


def release_freed_memory() -> None:
    """Hand the freed heap back to the OS (a no-op where the C library is not glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class TextClassifier(ABC):
    """A trained model that classifies raw texts. `decision`: from probabilities to labels; `tokenization`: the
    run's padding rule (padding, pad_length, context_length), how it cut long messages (truncation) and the mail
    headers it put first (mail_headers). A subclass sets `precision` (requested, name,
    reason) and may raise `align`: batch widths are rounded up to a multiple of it (fewer kernel shapes where
    trailing padding cannot change a result)."""

    # How much padding one batch may compute, over its real positions (`batching.length_batches`); None: no bound,
    # for a backend whose cost barely grows with padding (torch packs the positions its linear layers compute).
    padding_slack: float | None = None

    def __init__(self, decision: Decision, tokenization: dict, pooling: str, context_length: int):
        self.decision, self.tokenization, self.pooling = decision, dict(tokenization), pooling
        self.context_length, self.align = context_length, 1
        self.pad_length: int | None = self.tokenization.get("pad_length")
        self.width: int = self.pad_length or self.tokenization.get("context_length") or context_length
        # models trained before data.truncation existed kept each message's beginning
        self.truncation: str = self.tokenization.get("truncation") or "head"
        if self.truncation not in TRUNCATION:
            raise CheckpointError(f"the model's tokenization has truncation={self.truncation!r}, which this spamclf "
                                  f"does not know ({', '.join(TRUNCATION)}); upgrade spamclf to load it")
        # pooling=last reads the padded sequence's last position: without a fixed width, only equal widths batch
        # together, so a message's probability never depends on what it is batched with.
        self.one_width = self.pad_length is None and pooling == "last"

    @property
    def label_names(self) -> list[str]:
        return list(self.decision.label_names)

    @abstractmethod
    def forward(self, input_ids: list[list[int]], lengths: list[int]) -> list[list[float]]:
        """Class probabilities (temperature applied) of right-padded rows of ids with `lengths` real tokens."""

    @abstractmethod
    def _source_card(self) -> dict:
        """The model card's entries on where the model comes from (files, sha256, model name)."""

    def _computing(self) -> AbstractContextManager:
        """What `forward` runs inside for one call of `predict` (precision, prepacked kernels)."""
        return nullcontext()

    def predict(self, texts: Sequence[str], batch_tokens: int = 2048,
                progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """One Prediction per text, in order. Texts longer than the training width (or the context) are cut to it
        as training cut them (`encode`) and marked `truncated`; an empty text is a lone <|endoftext|>. Identical
        texts are classified once. `progress(n)`: n more distinct texts done."""
        distinct = list(dict.fromkeys(str(t) for t in texts))
        ids, truncated = self.encode(distinct)
        answers = dict(zip(distinct, zip(self._probabilities(ids, batch_tokens, progress), truncated)))
        return [self.decision.predict(str(text), *answers[str(text)]) for text in texts]

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of `texts` cut to the width the way training cut them (head, tail or head_tail), and whether
        each was cut: the rows the model sees."""
        return encode_truncated([str(t) for t in texts], self.width, self.truncation)

    def batch_plan(self, ids: Sequence[Sequence[int]], batch_tokens: int) -> Iterator[tuple[list[int], int]]:
        """(rows, width) of each batch: rows of similar width together, at most about `batch_tokens` positions."""
        widths = [self.pad_length or len(row) for row in ids]
        for rows in length_batches(widths, tokens=batch_tokens, one_width=self.one_width,
                                   padding_slack=self.padding_slack):
            yield rows, round_up(max(widths[r] for r in rows), self.align, self.context_length)

    def _probabilities(self, ids: list[list[int]], batch_tokens: int, progress) -> list[list[float]]:
        probs: list[list[float]] = [[]] * len(ids)
        with self._computing():
            for rows, width in self.batch_plan(ids, batch_tokens):
                for r, p in zip(rows, self.forward(*right_padded([ids[r] for r in rows], width))):
                    probs[r] = p
                if progress is not None:
                    progress(len(rows))
        if sum(self.pad_length or len(row) for row in ids) > batch_tokens:
            # Many batches leave glibc holding a fragmented heap (memory would creep up per chunk); one batch (a
            # server's) is not trimmed: the next call reuses it, where a trim would fault it in again (~10 ms).
            release_freed_memory()
        return probs

    def info(self) -> dict:
        """What the server's /info shows: the source, labels, padding rule, decision and precision."""
        precision = self.precision
        return {**self._source_card(), "pooling": self.pooling, "label_names": self.label_names,
                "padding": {k: self.tokenization.get(k) for k in ("padding", "pad_length", "context_length")},
                "truncation": self.truncation, "mail_headers": list(self.tokenization.get("mail_headers") or []),
                "decision": self.decision.as_dict(),
                "precision": {"requested": precision.requested, "used": precision.name, "reason": precision.reason}}
