"""What a run shows a person: loss/accuracy curves, the confusion matrix at the operating threshold, a
reliability diagram and a ROC curve as PNGs (like the book's figures), and in TensorBoard the same images,
per-class PR curves and hparams with results."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from spamclf.evaluation import reliability
from spamclf.splits import NATURAL

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


class RunReport(L.Callback):
    def __init__(self, plots_dir: str):
        self.plots_dir = Path(plots_dir)
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"history": self.history}  # a resumed run keeps the epochs before it

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        for key in ("train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"):
            if key in m:
                row[key.removesuffix("_epoch")] = float(m[key])
        self.history.append(row)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        for metric, title in (("loss", "Loss"), ("acc", "Accuracy")):
            fig, ax = plt.subplots(figsize=(5, 3))
            for split, style in (("train", "-"), ("val", "-.")):
                points = [(r["epoch"], r[f"{split}/{metric}"]) for r in self.history if f"{split}/{metric}" in r]
                if points:
                    ax.plot(*zip(*points), style,
                            label=f"{'Training' if split == 'train' else 'Validation'} {title.lower()}")
            ax.set_xlabel("Epochs")
            ax.set_ylabel(title)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.plots_dir / f"{'loss' if metric == 'loss' else 'accuracy'}.png", dpi=120)
            plt.close(fig)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluated = {split: e for split, e in getattr(pl_module, "evaluated", {}).items() if split in ("test", NATURAL)}
        if "test" not in evaluated:
            return
        decision = pl_module.decision
        names = list(decision.label_names)
        probs, labels = evaluated["test"].probs, evaluated["test"].labels
        figures = {
            "test/confusion_matrix": (confusion_figure(torch.tensor(evaluated["test"].point["confusion"]), names),
                                      "confusion_matrix.png"),
            "test/reliability_diagram": (reliability_figure(evaluated), "reliability.png"),
        }
        if len(names) == 2:
            figures["test/roc_curve"] = (roc_figure(evaluated, decision), "roc_curve.png")
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        for fig, filename in figures.values():
            fig.savefig(self.plots_dir / filename, dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for tag, (fig, _) in figures.items():
                    writer.add_figure(tag, fig, global_step=trainer.global_step, close=False)
                for i, name in enumerate(names):
                    writer.add_pr_curve(f"test/pr_curve/{name}", labels == i, probs[:, i],
                                        global_step=trainer.global_step)
                results = {k2: float(v) for k2, v in trainer.callback_metrics.items()
                           if k2.startswith(("test/", "best_", f"{NATURAL}/"))}
                logger.log_hyperparams(dict(pl_module.hparams), results)
        for fig, _ in figures.values():
            plt.close(fig)


def reliability_figure(evaluated: dict):
    """Accuracy against confidence per bin, for each evaluated split: on the diagonal means calibrated."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    for split, e in evaluated.items():
        bins = reliability(e.probs, e.labels)
        ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label=f"{split} ({len(e.labels)})")
    ax.set_xlabel("Confidence (predicted class)")
    ax.set_ylabel("Accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def roc_figure(evaluated: dict, decision):
    """ROC curve of the positive class per evaluated split, with the operating point marked."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for split, e in evaluated.items():
        point = e.point
        if "roc" not in point:  # one class only: no curve
            continue
        (line,) = ax.plot(point["roc"]["fpr"], point["roc"]["tpr"], label=f"{split}")
        ax.plot([point["fpr"]], [point["recall"]], "o", color=line.get_color())
    ax.set_xlabel(f"False-positive rate ({decision.label_names[1 - decision.positive]} flagged)")
    ax.set_ylabel(f"Recall ({decision.positive_label})")
    ax.set_title(f"ROC, threshold {decision.threshold:.3g} marked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: torch.Tensor, names: list[str]):
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    top = int(confusion.max()) if confusion.numel() else 0
    for (i, j), v in ((ij, int(confusion[ij]))
                      for ij in ((a, b) for a in range(len(names)) for b in range(len(names)))):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    return fig
