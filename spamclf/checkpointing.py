"""Checkpoints that survive interruptions: preemption (SIGTERM) ends a run so that it can be requeued, and a run
resumed from a checkpoint, in its own folder or another, ends with the uninterrupted run's best checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75  # EX_TEMPFAIL, "try again later": the job was preempted and should be requeued


class Preempted(SystemExit):
    """Raised at a batch boundary after SIGTERM; exits the process with REQUEUE_EXIT."""

    def __init__(self):
        super().__init__(REQUEUE_EXIT)


class Preemption(L.Callback):
    """SIGTERM (SLURM's preemption or time-limit notice, `kill`, a container stop) ends training at the next batch
    boundary instead of the end of the epoch, with exit status 75 (requeue me). The checkpoint of the last
    finished epoch stays as last.ckpt: the requeued job, started in the same run folder, resumes from it
    (spamclf.pipeline does so by itself) and repeats the interrupted epoch exactly, so it ends as a run that
    never stopped would have."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One line per finished epoch, so a requeued job's log shows which epochs ran twice (none should).
        if trainer.is_global_zero and not trainer.sanity_checking:
            log.info("epoch %d finished (global step %d)", trainer.current_epoch, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.received_sigterm:
            log.warning("SIGTERM received: stopping at this batch; last.ckpt holds the last finished epoch; exit %d "
                        "asks for a requeue", REQUEUE_EXIT)
            raise Preempted()


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the best-so-far when a run resumes from a checkpoint into another folder.

    Lightning's own forgets the best score and checkpoint of the epochs before the interruption when the
    folder changes, so a resumed run would test a worse checkpoint. Here the interrupted run's best
    checkpoints are copied into this run's folder and their scores carried along."""

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.realpath(old) != os.path.realpath(self.dirpath):
            state_dict = self._carried(state_dict, Path(old), Path(self.dirpath))
        super().load_state_dict(state_dict)

    def _carried(self, state: dict, old: Path, new: Path) -> dict:
        def moved(path: str | None) -> str | None:
            if not path:
                return path
            source, target = Path(path), new / Path(path).name
            if source.is_file() and not target.exists():
                _copy(source, target)
            return str(target)

        best_k = {}
        for path, score in (state.get("best_k_models") or {}).items():
            if Path(path).is_file():
                best_k[moved(path)] = score
            else:
                log.warning("resumed run: the best checkpoint %s is gone; the best is chosen among the remaining "
                            "epochs", path)
        best = state.get("best_model_path")
        carried = {**state, "dirpath": str(new), "best_k_models": best_k, "last_model_path": ""}
        if best and Path(best).is_file():
            carried.update(best_model_path=moved(best), kth_best_model_path=moved(state.get("kth_best_model_path")))
            log.info("resumed run: best checkpoint so far %s (%s=%s) carried into %s", best, self.monitor,
                     float(state["best_model_score"]) if state.get("best_model_score") is not None else None, new)
        else:
            carried.update(best_model_path="", best_model_score=None, kth_best_model_path="")
        return carried


@rank_zero_only
def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
