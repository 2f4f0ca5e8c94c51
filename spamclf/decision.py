"""The decision a deployed filter makes from class probabilities, as one typed object: which class is "positive"
(spam), the threshold its probability must reach (fixed, or chosen on validation for a target false-positive
rate, precision or F1), and the temperature that calibrates the probabilities. It is chosen after each
validation (`spamclf.evaluation`), saved in every checkpoint, and read back by `load_decision` alone: the
classifier, the server, the exports and the page all decide through it.

Plain Python: no torch, so the ONNX Runtime path decides exactly as the torch one does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from spamclf.errors import CheckpointError, InvalidOption

THRESHOLD_RULES = ("fixed", "max_fpr", "min_precision", "max_f1")
THRESHOLD_HELP = ("a number in [0, 1], or one of threshold.fixed=P, threshold.max_fpr=R (highest recall with at most "
                  "that false-positive rate on validation), threshold.min_precision=P, threshold.max_f1=true")


def positive_index(label_names: Sequence[str], positive_label: str | None = None) -> int:
    """The positive class: `positive_label`, else "spam" where that label exists, else the last label."""
    names = list(label_names)
    if positive_label is None:
        return names.index("spam") if "spam" in names else len(names) - 1
    if str(positive_label) not in names:
        raise InvalidOption("positive_label", positive_label, "one of the labels " + ", ".join(names))
    return names.index(str(positive_label))


def threshold_rule(spec) -> tuple[str, float]:
    """(rule, target) from `model.threshold`: a number (fixed) or a mapping with one rule set, e.g.
    {fixed: 0.5, max_fpr: 0.001, min_precision: null, max_f1: false}."""
    if isinstance(spec, bool):
        raise InvalidOption("threshold", spec, THRESHOLD_HELP)
    if isinstance(spec, (int, float)):
        spec = {"fixed": spec}
    if not isinstance(spec, Mapping):
        raise InvalidOption("threshold", spec, THRESHOLD_HELP)
    unknown = sorted(set(spec) - set(THRESHOLD_RULES))
    if unknown:
        raise InvalidOption(f"threshold.{unknown[0]}", spec[unknown[0]],
                            "one of the keys " + ", ".join(THRESHOLD_RULES))
    chosen = [(k, spec[k]) for k in ("max_fpr", "min_precision", "max_f1") if spec.get(k) not in (None, False)]
    if len(chosen) > 1:
        raise InvalidOption("threshold", dict(spec), "only one of max_fpr, min_precision, max_f1 at a time")
    rule, target = chosen[0] if chosen else ("fixed", spec.get("fixed", 0.5))
    if rule == "max_f1":
        if target is not True:
            raise InvalidOption("threshold.max_f1", target, "true or false")
        return rule, 1.0
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) <= 1.0:
        raise InvalidOption(f"threshold.{rule}", target, "a number between 0 and 1")
    return rule, float(target)


@dataclass(frozen=True)
class Prediction:
    """One message's answer: the decided label, its probability, every class's probability, and whether the text
    was cut to the width the model was trained on."""

    text: str
    label: str
    probability: float
    probabilities: dict[str, float]
    truncated: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """From calibrated class probabilities to a label. Two classes: the positive class wherever its probability
    reaches `threshold`; more classes: the most probable one. `measured`: what this operating point measured on
    the validation split when it was chosen (false positives "N of M ham", recall, precision), for people."""

    label_names: tuple[str, ...]
    positive: int
    threshold: float = 0.5
    rule: str = "fixed"
    target: float = 0.5
    temperature: float = 1.0
    measured: dict = field(default_factory=dict)

    @classmethod
    def configured(cls, label_names: Sequence[str], positive_label: str | None = None, threshold=0.5) -> Decision:
        """The decision as configured, before anything is chosen on validation (a rule starts at 0.5)."""
        names = tuple(str(n) for n in label_names)
        rule, target = threshold_rule(threshold)
        if rule != "fixed" and len(names) != 2:
            raise InvalidOption("threshold", threshold, f"a fixed threshold: rules need two classes, not {len(names)}")
        return cls(names, positive_index(names, positive_label), target if rule == "fixed" else 0.5, rule, target)

    @property
    def positive_label(self) -> str:
        return self.label_names[self.positive]

    @property
    def chosen_on_validation(self) -> bool:
        return self.rule != "fixed"

    def chosen(self, threshold: float, temperature: float, measured: dict | None = None) -> Decision:
        return replace(self, threshold=float(threshold), temperature=float(temperature), measured=dict(measured or {}))

    def label(self, probs: Sequence[float]) -> int:
        """The class id for one message's probabilities."""
        if len(probs) == 2:
            return self.positive if probs[self.positive] >= self.threshold else 1 - self.positive
        return max(range(len(probs)), key=probs.__getitem__)

    def predict(self, text: str, probs: Sequence[float], truncated: bool) -> Prediction:
        probs = [float(p) for p in probs]
        best = self.label(probs)
        return Prediction(text, self.label_names[best], probs[best], dict(zip(self.label_names, probs)), truncated)

    def as_dict(self) -> dict:
        return {"label_names": list(self.label_names), "positive_label": self.positive_label,
                "threshold": self.threshold, "rule": self.rule, "target": self.target,
                "temperature": self.temperature, "measured": dict(self.measured)}


def load_decision(checkpoint: Mapping, source: str | os.PathLike = "the checkpoint") -> Decision:
    """The decision a checkpoint (a dict as torch.load returns it) carries in its `decision` entry; `source`
    names the file in the error when there is none."""
    stored = checkpoint.get("decision")
    if stored is None:
        raise CheckpointError(f"{source}: no decision entry (the threshold and temperature to predict with); an older "
                              f"spamclf wrote it: train it again with this one")
    names = stored["label_names"]
    return Decision(tuple(names), names.index(stored["positive_label"]), stored["threshold"], stored["rule"],
                    stored["target"], stored["temperature"], dict(stored.get("measured") or {}))


def softmax(logits: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Class probabilities of one row of logits at `temperature` (for backends without torch)."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]
