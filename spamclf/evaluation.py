"""After the model has scored a split: choosing the decision on validation (temperature, then threshold) and the
metrics a filter is judged by at that operating point, computed once per split from (probabilities, labels,
decision) — false-positive rate ("N of M ham flagged"), recall, precision, F1, AUROC, calibration error, the
confusion matrix and the ROC curve. The module logs them, metrics.json holds them, the reports draw them.

Training side (torch, torchmetrics); the decision itself is `spamclf.decision`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_roc,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from spamclf.decision import Decision
from spamclf.errors import SpamclfError
from spamclf.inference import probabilities  # the one temperature-scaled softmax, shared with prediction


def decide(probs: torch.Tensor, decision: Decision) -> torch.Tensor:
    """Class ids of many messages, as `Decision.label` decides one."""
    if probs.shape[1] != 2:
        return probs.argmax(-1)
    positive = decision.positive
    return torch.where(probs[:, positive] >= decision.threshold, positive, 1 - positive)


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


def choose_decision(decision: Decision, logits: torch.Tensor, labels: torch.Tensor, calibrate: bool) -> Decision:
    """The decision chosen on validation outputs: a temperature (when `calibrate`), then the threshold its rule
    asks for (a fixed threshold stays), with what that operating point measured there."""
    temperature = fit_temperature(logits, labels) if calibrate else decision.temperature
    probs = probabilities(logits, temperature)
    threshold = decision.threshold
    if decision.chosen_on_validation:
        threshold = choose_threshold(probs[:, decision.positive], labels == decision.positive, decision.rule,
                                     decision.target)
    chosen = decision.chosen(threshold, temperature)
    point = operating_point(probs, labels, chosen)
    measured = {k: point[k] for k in ("count", "false_positives", "fpr", "recall", "precision") if k in point}
    return chosen.chosen(threshold, temperature, {"split": "validation", **measured})


@dataclass
class Evaluated:
    """One split's final scores and what they give at the operating point."""

    probs: torch.Tensor  # [N, C], calibrated
    labels: torch.Tensor  # [N]
    point: dict  # operating_point(...)


def operating_point(probs: torch.Tensor, labels: torch.Tensor, decision: Decision,
                    prevalence: float | None = None) -> dict:
    """Metrics of the decisions `decision` makes on these messages: accuracy, expected calibration error and the
    confusion matrix (rows: true class), then the positive class's figures (two classes) or macro averages and a
    per-class table (more)."""
    k, labels = probs.shape[1], labels.long()
    predicted = decide(probs, decision)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    out = {"count": len(labels),
           "accuracy": float((predicted == labels).float().mean()) if len(labels) else float("nan"),
           "ece": float(multiclass_calibration_error(probs, labels, num_classes=k, n_bins=15)),
           "confusion": confusion.tolist()}
    out.update(_binary_point(probs, labels, predicted, decision, prevalence) if k == 2
               else _multiclass_point(probs, labels, decision))
    return out


def _binary_point(probs, labels, predicted, decision: Decision, prevalence: float | None) -> dict:
    """The false-positive rate with its count ("3 of 1,210 ham"), recall, precision, F1 of the positive class, AUROC;
    with `prevalence` (the positive class's share of real traffic) also the precision and F1 that recall and
    false-positive rate give at that share, whatever this set's own mix."""
    positive = decision.positive
    is_pos, flagged = labels == positive, predicted == positive
    tp, fp = int((flagged & is_pos).sum()), int((flagged & ~is_pos).sum())
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    out = {
        "positive_label": decision.positive_label, "threshold": decision.threshold,
        "fpr": fp / n_neg if n_neg else float("nan"),
        "false_positives": f"{fp} of {n_neg} {decision.label_names[1 - positive]}",
        "recall": tp / n_pos if n_pos else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + n_pos - tp) if n_pos + fp else float("nan"),
        "auroc": float(binary_auroc(probs[:, positive], is_pos.long())) if n_pos and n_neg else float("nan"),
        "positive_rate": n_pos / len(labels) if len(labels) else float("nan"),
    }
    if n_pos and n_neg:
        fpr, tpr, _ = binary_roc(probs[:, positive], is_pos.long())
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if prevalence is not None and n_pos and n_neg:
        hits, alarms = out["recall"] * prevalence, out["fpr"] * (1 - prevalence)
        at_rate = hits / (hits + alarms) if hits + alarms else float("nan")
        out.update({"prevalence": prevalence, "precision_at_prevalence": at_rate,
                    "f1_at_prevalence": 2 * at_rate * out["recall"] / (at_rate + out["recall"])
                    if at_rate + out["recall"] else 0.0})
    return out


def _multiclass_point(probs, labels, decision: Decision) -> dict:
    kw = {"num_classes": probs.shape[1]}
    per_class = zip(decision.label_names, multiclass_precision(probs, labels, average=None, **kw),
                    multiclass_recall(probs, labels, average=None, **kw),
                    multiclass_f1_score(probs, labels, average=None, **kw))
    return {
        "precision": float(multiclass_precision(probs, labels, average="macro", **kw)),
        "recall": float(multiclass_recall(probs, labels, average="macro", **kw)),
        "f1": float(multiclass_f1_score(probs, labels, average="macro", **kw)),
        "auroc": float(multiclass_auroc(probs, labels, average="macro", **kw)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                             "support": int((labels == i).sum())}
                      for i, (name, p, r, f) in enumerate(per_class)},
    }


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per confidence bin of the predicted class: the reliability diagram."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    bins = torch.clamp((confidence * n_bins).long(), max=n_bins - 1)
    return [(float(confidence[bins == b].mean()), float(correct[bins == b].mean()), int((bins == b).sum()))
            for b in range(n_bins) if (bins == b).any()]


def gathered(outputs: dict[str, dict[str, list[torch.Tensor]]],
             world_size: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Every rank's outputs ({split: {"logits": [...], "labels": [...]}}) on every rank: each rank saw a shard."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return outputs
    shards = [None] * world_size
    torch.distributed.all_gather_object(shards, outputs)
    merged: dict[str, dict[str, list[torch.Tensor]]] = {}
    for shard in shards:
        for split, tensors_by_key in shard.items():
            for key, tensors in tensors_by_key.items():
                merged.setdefault(split, {}).setdefault(key, []).extend(tensors)
    return merged
