"""What a run shows a person: loss/accuracy curves and a confusion matrix as PNGs (like the book's
figures), and in TensorBoard the confusion matrix image, per-class PR curves and hparams with results."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

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
                    ax.plot(*zip(*points), style, label=f"{'Training' if split == 'train' else 'Validation'} {title.lower()}")
            ax.set_xlabel("Epochs")
            ax.set_ylabel(title)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.plots_dir / f"{'loss' if metric == 'loss' else 'accuracy'}.png", dpi=120)
            plt.close(fig)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outputs = getattr(pl_module, "test_outputs", {})
        if not outputs.get("probs"):
            return
        probs, labels = torch.cat(outputs["probs"]), torch.cat(outputs["labels"])
        names = list(pl_module.label_names)
        k = len(names)
        confusion = torch.bincount(labels * k + probs.argmax(-1), minlength=k * k).reshape(k, k)
        fig = confusion_figure(confusion, names)
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.plots_dir / "confusion_matrix.png", dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_figure("test/confusion_matrix", fig, global_step=trainer.global_step)
                for i, name in enumerate(names):
                    writer.add_pr_curve(f"test/pr_curve/{name}", labels == i, probs[:, i], global_step=trainer.global_step)
                results = {k2: float(v) for k2, v in trainer.callback_metrics.items() if k2.startswith(("test/", "best_"))}
                logger.log_hyperparams(dict(pl_module.hparams), results)
        plt.close(fig)


def confusion_figure(confusion: torch.Tensor, names: list[str]):
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    top = int(confusion.max()) if confusion.numel() else 0
    for (i, j), v in ((ij, int(confusion[ij])) for ij in ((a, b) for a in range(len(names)) for b in range(len(names)))):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    return fig
