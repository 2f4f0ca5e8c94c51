"""The decision a deployed filter makes from class scores: which class is "positive" (spam), the threshold
it must reach (fixed, or chosen on validation for a target false-positive rate, precision or F1), temperature
scaling so that a probability means what it says, and the metrics a filter is judged by at that operating
point: false-positive rate ("N of M ham flagged"), recall, precision, F1, AUROC, calibration error.

Plain torch and torchmetrics: the module, the reports and prediction all call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from spamclf.errors import InvalidOption, SpamclfError

THRESHOLD_RULES = ("fixed", "max_fpr", "min_precision", "max_f1")
THRESHOLD_HELP = ("a number in [0, 1], or one of threshold.fixed=P, threshold.max_fpr=R (highest recall with at most that "
                  "false-positive rate on validation), threshold.min_precision=P, threshold.max_f1=true")


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
        raise InvalidOption(f"threshold.{unknown[0]}", spec[unknown[0]], "one of the keys " + ", ".join(THRESHOLD_RULES))
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


def _counts(scores: torch.Tensor, positive: torch.Tensor, thresholds: torch.Tensor):
    """True and false positives when flagging score >= t, for every t in `thresholds` (ascending)."""
    order = torch.argsort(scores)
    sorted_scores, sorted_pos = scores[order], positive[order].float()
    # rows at or above t: those from searchsorted(t, left) onward
    start = torch.searchsorted(sorted_scores, thresholds, right=False)
    pos_above = torch.cat([sorted_pos.flip(0).cumsum(0).flip(0), torch.zeros(1)])[start]
    all_above = (len(scores) - start).float()
    return pos_above, all_above - pos_above


def choose_threshold(scores: torch.Tensor, positive: torch.Tensor, rule: str, target: float) -> float:
    """The threshold on the positive class's probability that meets `rule` on these (validation) scores.

    max_fpr: the highest recall whose false-positive rate is at most `target`; min_precision: the highest
    recall whose precision is at least `target`; max_f1: the best F1. Ties go to the higher threshold
    (fewer messages flagged). Where no threshold meets the target, nothing is flagged: a threshold just
    above every score."""
    if rule == "fixed":
        return float(target)
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise SpamclfError(f"threshold.{rule} needs both classes in the validation split; it has {n_pos} positive, "
                           f"{n_neg} negative; use threshold.fixed or more data")
    above_all = math.nextafter(float(scores.max()), math.inf)
    candidates = torch.cat([torch.unique(scores), torch.tensor([above_all], dtype=torch.float64)])
    tp, fp = _counts(scores, positive, candidates)
    recall, fpr = tp / n_pos, fp / n_neg
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.ones_like(tp))
    if rule == "max_fpr":
        ok, merit = fpr <= target + 1e-12, recall
    elif rule == "min_precision":
        ok, merit = precision >= target - 1e-12, recall
    else:
        ok, merit = torch.ones_like(recall, dtype=torch.bool), 2 * tp / (2 * tp + fp + (n_pos - tp)).clamp(min=1)
    merit = torch.where(ok, merit, torch.full_like(merit, -1.0))
    best = merit.max()
    if best < 0:
        return above_all
    return float(candidates[(merit == best).nonzero().max()])  # candidates ascend: the highest threshold of the ties


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """Temperature T minimising the cross-entropy of logits / T (Guo et al., 2017), fitted on validation.
    Runs with gradients even when called from evaluation (inference mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().clone().double(), labels.detach().clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) and temperature > 0 else 1.0


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).softmax(-1)


def decide(probs: torch.Tensor, positive: int | None, threshold: float) -> torch.Tensor:
    """Class ids: for two classes, the positive class where its probability reaches the threshold; else argmax."""
    if positive is None or probs.shape[1] != 2:
        return probs.argmax(-1)
    return torch.where(probs[:, positive] >= threshold, positive, 1 - positive)


def operating_point(probs: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str], positive: int,
                    threshold: float, prevalence: float | None = None) -> dict:
    """Metrics of decisions at `threshold` (two classes) or argmax (more). Two classes: the false-positive
    rate with its count ("3 of 1,210 ham"), recall, precision, F1 of the positive class, AUROC and expected
    calibration error; with `prevalence` (the positive class's share of real traffic) also the precision
    and F1 that recall and false-positive rate give at that share, whatever this set's own mix. More
    classes: macro precision/recall/F1/AUROC, ECE and a per-class table."""
    names, k = list(label_names), len(label_names)
    labels = labels.long()
    predicted = decide(probs, positive if k == 2 else None, threshold)
    out = {"count": len(labels), "accuracy": float((predicted == labels).float().mean()) if len(labels) else float("nan"),
           "ece": float(multiclass_calibration_error(probs, labels, num_classes=k, n_bins=15))}
    if k == 2:
        is_pos, flagged = labels == positive, predicted == positive
        tp, fp = int((flagged & is_pos).sum()), int((flagged & ~is_pos).sum())
        n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
        negative = names[1 - positive]
        out.update({
            "positive_label": names[positive], "threshold": threshold,
            "fpr": fp / n_neg if n_neg else float("nan"), "false_positives": f"{fp} of {n_neg} {negative}",
            "recall": tp / n_pos if n_pos else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "f1": 2 * tp / (2 * tp + fp + n_pos - tp) if n_pos + fp else float("nan"),
            "auroc": float(binary_auroc(probs[:, positive], is_pos.long())) if n_pos and n_neg else float("nan"),
            "positive_rate": n_pos / len(labels) if len(labels) else float("nan"),
        })
        if prevalence is not None and n_pos and n_neg:
            hits, alarms = out["recall"] * prevalence, out["fpr"] * (1 - prevalence)
            at_rate = hits / (hits + alarms) if hits + alarms else float("nan")
            out.update({"prevalence": prevalence, "precision_at_prevalence": at_rate,
                        "f1_at_prevalence": 2 * at_rate * out["recall"] / (at_rate + out["recall"]) if at_rate + out["recall"] else 0.0})
        return out
    kw = {"num_classes": k}
    out.update({
        "precision": float(multiclass_precision(probs, labels, average="macro", **kw)),
        "recall": float(multiclass_recall(probs, labels, average="macro", **kw)),
        "f1": float(multiclass_f1_score(probs, labels, average="macro", **kw)),
        "auroc": float(multiclass_auroc(probs, labels, average="macro", **kw)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int((labels == i).sum())}
            for i, (name, p, r, f) in enumerate(zip(
                names, multiclass_precision(probs, labels, average=None, **kw),
                multiclass_recall(probs, labels, average=None, **kw), multiclass_f1_score(probs, labels, average=None, **kw)))
        },
    })
    return out


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per confidence bin of the predicted class: the reliability diagram."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    bins = torch.clamp((confidence * n_bins).long(), max=n_bins - 1)
    return [(float(confidence[bins == b].mean()), float(correct[bins == b].mean()), int((bins == b).sum()))
            for b in range(n_bins) if (bins == b).any()]
