"""One training run, from a composed Hydra config to metrics.json. `train.py` only calls `main`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spamclf.errors import CheckpointError, InvalidOption, SpamclfError
from spamclf.io import write_json
from spamclf.module import DataHandOver, SpamClassifier
from spamclf.precision import resolve
from spamclf.splits import NATURAL, SPLITS

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
USER_ERRORS = (SpamclfError, MisconfigurationException, OmegaConfBaseException)
# The distributed variables as this process was started with (torchrun, SLURM, or none): restored after each job.
_LAUNCH_ENV = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}


def build(group: str, node: DictConfig, **kwargs):
    """`instantiate`, with a user mistake inside a constructor reported as `group.key=value …`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, InvalidOption):
            raise SpamclfError(f"{group}.{cause}") from None
        if isinstance(cause, SpamclfError):
            raise cause from None
        if isinstance(cause, (*USER_ERRORS, TypeError)):
            raise SpamclfError(f"{group}: {cause}; check the keys under '{group}'") from None
        raise


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means this run folder's checkpoints/last.ckpt (resume into the same folder with hydra.run.dir).
    Unset, an unfinished run folder (a checkpoint, no metrics.json: a requeued job) resumes from its last.ckpt."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        if last.is_file() and not (output_dir / METRICS_FILE).exists():
            log.info("resuming the unfinished run in %s from %s", output_dir, last)
            return str(last)
        return None
    if ckpt_path == "last":
        if not last.is_file():
            raise CheckpointError(f"{last}: no last checkpoint to resume from; "
                                  f"set hydra.run.dir to the interrupted run's folder")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint not found; fix ckpt_path")
    return ckpt_path


def run(cfg: DictConfig) -> dict:
    """Seed, build data, model, callbacks, loggers and trainer; fit; test the best checkpoint once;
    write metrics.json. Returns the metrics (with the optimized metric under `objective`)."""
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build("data", cfg.data)
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"), output_dir)
    model = _model(cfg, datamodule, ckpt_path)
    precision = resolve(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    trainer, loggers = _trainer(cfg, precision.lightning, DataHandOver(datamodule, precision.lightning))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    timings = {}
    if cfg.train:
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        timings["fit_s"] = time.perf_counter() - t0
        timings["prefix_cache_fit_s"] = model.caches.build_seconds
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    objective = _objective(trainer, cfg.optimized_metric)
    metrics: dict = {}
    if cfg.test:
        t0 = time.perf_counter()
        metrics = _test_once(trainer, model, datamodule, (best or None) if cfg.train else None)
        timings["test_s"] = time.perf_counter() - t0
    timings["prefix_cache_s"] = model.caches.build_seconds
    timings["total_s"] = time.perf_counter() - start
    summary = {
        "objective": {"name": cfg.optimized_metric, "value": objective},
        **metrics,
        "best_checkpoint": best or ckpt_path,
        "trainable_parameters": model.trainable,
        "total_parameters": model.total,
        "overlap_with_train": datamodule.overlap,
        "data_protocol": datamodule.protocol,  # book: the SMS file read as the book reads it; exact: every line
        "precision": precision.as_dict(),
        "timings": timings,
    }
    if trainer.is_global_zero:
        write_json(output_dir / METRICS_FILE, summary)
        log.info("metrics: %s", json.dumps({k: summary[k] for k in ("objective", *metrics)}))
    return summary


def _trainer(cfg: DictConfig, precision: str, handover: DataHandOver) -> tuple[L.Trainer, list]:
    """The Trainer with the configured callbacks (and the data hand-over) and loggers."""
    callbacks = [build(f"callbacks.{k}", c) for k, c in (cfg.get("callbacks") or {}).items() if c and "_target_" in c]
    loggers = [build(f"logger.{k}", c) for k, c in (cfg.get("logger") or {}).items() if c and "_target_" in c]
    # Without a ModelCheckpoint in callbacks, Lightning would silently add one: no hidden multi-GB writes.
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    _ddp_ranks_join_this_job()
    trainer = build("trainer", cfg.trainer, callbacks=[*callbacks, handover], logger=loggers or False,
                    enable_checkpointing=checkpointing, precision=precision)
    return trainer, loggers


def _model(cfg: DictConfig, datamodule, ckpt_path: str | None) -> SpamClassifier:
    """The model to train (from the config, its outputs the data's classes), or to evaluate again (train=false:
    from ckpt_path). The Trainer sets the data up later; only the label names are read here."""
    if cfg.train:
        return build("model", cfg.model, label_names=datamodule.read_label_names())
    if ckpt_path is None:
        raise SpamclfError("train=false needs ckpt_path=PATH (the checkpoint to evaluate)")
    return SpamClassifier.from_checkpoint(ckpt_path)


def _test_once(trainer: L.Trainer, model: SpamClassifier, datamodule, ckpt_path: str | None) -> dict:
    """The best checkpoint (chosen on validation), once, on every split, with the decision chosen for it there."""
    datamodule.evaluate_on((*SPLITS, NATURAL))
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _split_metrics(trainer.callback_metrics)
    metrics["operating_point"] = {
        **{k: v for k, v in model.decision.as_dict().items() if k not in ("label_names", "measured")},
        **{split: _drawn_only(model.evaluated[split].point)
           for split in ("val", "test", NATURAL) if split in model.evaluated},
    }
    return metrics


def _ddp_ranks_join_this_job() -> None:
    """In a multirun job, Lightning's DDP launcher restarts `sys.argv` for the other ranks with
    `hydra.run.dir=<hydra.run.dir>` (Lightning 2.6.6, private `_hydra_subprocess_cmd`): the whole sweep again, into
    new folders (Lightning-AI/pytorch-lightning#11300, facebookresearch/hydra#2070; written against Hydra 1.3.8).
    Make that restart a single run of this job's overrides, in this job's folder. tests/test_upstream.py fails loudly
    when Lightning builds that command differently."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]


def _objective(trainer: L.Trainer, name: str) -> float | None:
    cb = trainer.checkpoint_callback
    if cb is not None and cb.monitor == name and cb.best_model_score is not None:
        return float(cb.best_model_score)
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _split_metrics(callback_metrics: dict) -> dict:
    """{"train": {...}, "val": {...}, "test": {...}, "natural": {...}} from the best checkpoint's final evaluation."""
    out: dict[str, dict] = {}
    for key, value in callback_metrics.items():
        prefix, _, name = key.rpartition("/")
        split = {"best_train": "train", "best_val": "val", "test": "test", NATURAL: NATURAL}.get(prefix)
        if split:
            out.setdefault(split, {})[name] = float(value)
    return {split: out[split] for split in (*SPLITS, NATURAL) if split in out}


def _drawn_only(point: dict) -> dict:
    """An operating point for metrics.json: the ROC curve's points are drawn in plots/, not listed."""
    return {k: v for k, v in point.items() if k != "roc"}


def _discard_incomplete(output_dir: Path) -> None:
    """A run that failed before it trained leaves no folder behind; one with checkpoints keeps them,
    but without metrics.json, which marks a complete run."""
    if not output_dir.is_dir() or (output_dir / METRICS_FILE).exists():
        return
    if not any((output_dir / "checkpoints").glob("*.ckpt")):
        shutil.rmtree(output_dir, ignore_errors=True)


def main(cfg: DictConfig) -> float | None:
    """Hydra task: the optimized metric for sweepers; user mistakes end in one line and exit status 2."""
    try:
        return run(cfg)["objective"]["value"]
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        try:
            _discard_incomplete(Path(cfg.paths.output_dir))
        except OmegaConfBaseException:
            pass
        if os.environ.get("SUBMITIT_EXECUTOR"):
            # A SLURM job (submitit): an exception becomes the job's result, so the sweep names the failed job; after an
            # exit there is no result, and without SLURM accounting (sacct) the sweep would wait for it for ever.
            raise SpamclfError(message) from None
        sys.exit(2)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """A sweep runs its jobs one after another in this process: a DDP job's process group must not outlive the
    job, nor the rank variables Lightning's launcher set in this process's environment (with LOCAL_RANK set,
    the next job would take its ranks as started from outside and wait for them forever)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in _LAUNCH_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
