"""Beyond one process: launchers, DDP inside a sweep, exact metrics across ranks, preemption and resume."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from spamclf.checkpointing import REQUEUE_EXIT
from tests.helpers import CONF, TINY, train_cli

SPLIT_KEYS = ("acc", "loss", "f1", "auroc")


def _hydra_cfg(overrides, tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.log_dir={tmp_path}", "paths.root_dir=."],
                       return_hydra_config=True)


def test_launcher_and_fsdp_presets_compose(tmp_path):
    slurm = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"],
                       tmp_path)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and launcher.max_num_timeout > 0  # one task per GPU; preempted jobs requeue
    local = _hydra_cfg(["hydra/launcher=local"], tmp_path)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    fsdp = _hydra_cfg(["trainer=fsdp", "model=gpt2-xl", "model.trainable_layers=all"], tmp_path)
    strategy = instantiate(fsdp.trainer.strategy)
    from lightning.pytorch.strategies import FSDPStrategy

    from spamclf.gpt2 import TransformerBlock

    assert isinstance(strategy, FSDPStrategy) and fsdp.trainer.precision == "auto"
    assert TransformerBlock in fsdp_policy_classes(fsdp.trainer.strategy.auto_wrap_policy)
    assert TransformerBlock in fsdp_policy_classes(fsdp.trainer.strategy.activation_checkpointing_policy)


def fsdp_policy_classes(node):
    return set(instantiate(node)._module_classes)


def _runs(sweep_root: Path) -> list[Path]:
    sweeps = list((sweep_root / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # the sweep ran once
    return sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))


def test_local_launcher_runs_the_sweep_in_parallel_processes(tmp_path):
    proc = train_cli(["-m", "hydra/launcher=local", *TINY, "model.trainable_layers=all,head", "test=false"], tmp_path,
                     timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path)
    assert [p.name for p in runs] == ["0", "1"] and all((p / "metrics.json").is_file() for p in runs)
    lines = (runs[0].parent / "summary.csv").read_text().strip().splitlines()
    scores = [float(line.split(",")[2]) for line in lines[1:]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert "Joblib" in proc.stdout + proc.stderr


def test_ddp_inside_a_sweep_gives_one_complete_folder_per_job_with_exact_metrics(tmp_path):
    proc = train_cli(["-m", "trainer=ddp_sim", *TINY, "model.trainable_layers=last_block,all"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path)
    assert [p.name for p in runs] == ["0", "1"]
    assert not list(tmp_path.rglob("train_ddp_process_*")) and not (tmp_path / "train" / "runs").exists()
    for run_dir in runs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and list((run_dir / "tensorboard").rglob("events.*"))
        log = (run_dir / "train.log").read_text()
        assert log.count("splits: train") == 1  # one writer per run folder
        assert metrics["operating_point"]["val"]["count"] == 149 and metrics["operating_point"]["test"]["count"] == 300
        # The same checkpoint scored by one process: every row once, the same numbers.
        single = train_cli([*TINY, "train=false", f"ckpt_path={metrics['best_checkpoint']}",
                            f"hydra.run.dir={run_dir}-single"], tmp_path)
        assert single.returncode == 0, single.stderr[-3000:]
        alone = json.loads((Path(f"{run_dir}-single") / "metrics.json").read_text())
        for split in ("val", "test"):
            for key in SPLIT_KEYS:
                assert metrics[split][key] == pytest.approx(alone[split][key], abs=1e-5), (run_dir.name, split, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    proc = train_cli([*TINY[:-1], "trainer.max_epochs=3", f"hydra.run.dir={tmp}/run"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "run" / "metrics.json").read_text())


def _assert_same_ending(resumed: dict, whole: dict) -> None:
    assert resumed["objective"]["value"] == pytest.approx(whole["objective"]["value"], abs=1e-6)
    assert Path(resumed["best_checkpoint"]).name == Path(whole["best_checkpoint"]).name
    for split in ("train", "val", "test"):
        for key in SPLIT_KEYS:
            assert resumed[split][key] == pytest.approx(whole[split][key], abs=1e-6), (split, key)


def test_killed_then_resumed_into_a_new_folder_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    common = [*TINY[:-1], "trainer.max_epochs=3"]
    killed = train_cli([*common, f"hydra.run.dir={tmp_path}/killed", "+callbacks.die._target_=tests.helpers.DieAt",
                   "+callbacks.die.epoch=2", "+callbacks.die.batch=10"], tmp_path)
    assert killed.returncode == 3
    resumed = train_cli([*common, f"hydra.run.dir={tmp_path}/new",
                         f"ckpt_path={tmp_path}/killed/checkpoints/last.ckpt"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert Path(metrics["best_checkpoint"]).parent == tmp_path / "new" / "checkpoints"  # carried into the new folder
    _assert_same_ending(metrics, uninterrupted)


def test_sigterm_is_preemption_and_the_requeued_job_resumes(uninterrupted, tmp_path):
    common = [*TINY[:-1], "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}/job"]
    first = train_cli([*common, "+callbacks.term._target_=tests.helpers.SigtermAt", "+callbacks.term.epoch=1",
                  "+callbacks.term.batch=20"], tmp_path)
    assert first.returncode == REQUEUE_EXIT, first.stderr[-3000:]
    assert ((tmp_path / "job" / "checkpoints" / "last.ckpt").is_file()
            and not (tmp_path / "job" / "metrics.json").exists())
    requeued = train_cli(common, tmp_path)  # the same command again, as a requeue runs it
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming the unfinished run" in requeued.stdout + requeued.stderr
    _assert_same_ending(json.loads((tmp_path / "job" / "metrics.json").read_text()), uninterrupted)
