"""last.ckpt is the last finished epoch, whatever the best did
(the checkpoint a preempted or killed run resumes from)."""

import torch

from spamclf.pipeline import run
from tests.helpers import TINY, compose_cfg


def test_last_ckpt_is_the_last_epoch_when_the_best_is_an_earlier_one(tmp_path):
    # mode=min on val/acc makes the "best" the worst epoch (the first, as the tiny model learns): Lightning 2.6's
    # save_last=True would then leave last.ckpt at that epoch.
    cfg = compose_cfg([*TINY[:-1], "trainer.max_epochs=3", "trainer.limit_train_batches=30",
                       "callbacks.model_checkpoint.mode=min", "test=false", "data.natural=false"], tmp_path)
    metrics = run(cfg)
    best = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] < 2, "precondition: the best epoch is not the last one"
    assert last["epoch"] == 2 and last["global_step"] > best["global_step"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
        {"last.ckpt", f"epoch_{best['epoch']:03d}.ckpt"})
