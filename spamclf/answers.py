"""From texts to `Prediction`s, whatever computes the probabilities: the torch `Classifier` and the ONNX Runtime
`OnnxClassifier` both answer through `answer`, so they tokenize, truncate, deduplicate and decide alike.
Plain Python: no torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spamclf.decision import Decision, Prediction
from spamclf.tokenizer import encode_truncated

Probabilities = Callable[[list[list[int]]], list[list[float]]]


def answer(texts: Sequence[str], width: int, decision: Decision, probabilities: Probabilities) -> list[Prediction]:
    """One Prediction per text, in order. Texts longer than `width` tokens are cut to it, keeping their beginning,
    and marked `truncated`; an empty text is a lone <|endoftext|>; identical texts are classified once.
    `probabilities(ids)`: each row's class probabilities (temperature applied)."""
    distinct = list(dict.fromkeys(str(t) for t in texts))
    ids, truncated = encode_truncated(distinct, width)
    probs = probabilities(ids)
    answers = {text: (p, cut) for text, p, cut in zip(distinct, probs, truncated)}
    return [decision.predict(str(text), *answers[str(text)]) for text in texts]
