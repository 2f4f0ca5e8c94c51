"""Sweeps on a real (one-node) SLURM cluster through the project's command line: hydra/launcher=slurm_cpu, preemption
and requeue, a job failing on a user mistake, DDP over two SLURM tasks. The cluster comes from scripts/slurm-local
(the `slurm_cluster` fixture); without SLURM or root these tests skip, with SPAMCLF_REQUIRE_SLURM=1 they fail."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import QUIET, ROOT

pytestmark = pytest.mark.slurm

# Short CPU runs: 3 epochs of 20 batches padded per batch, natural-rate set left out, final evaluation on the first 128
# messages of each split; one CPU per task, so two jobs share the node.
FAST = ["model=gpt2-tiny", "trainer=cpu", *QUIET, "data.natural=false", "data.padding=batch", "data.bucket=true",
        "model.pooling=last_nonpad", "data.eval_batch_size=64"]
JOB = ["hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
       "hydra.launcher.mem_gb=4", *FAST, "trainer.max_epochs=3", "trainer.limit_train_batches=20",
       "trainer.limit_test_batches=2"]
SPLIT_KEYS = ("acc", "loss", "f1", "auroc")


def _train(args, log_dir: Path, env: dict, timeout=240, **kw):
    cmd = [sys.executable, "train.py", "-m", *args, f"paths.log_dir={log_dir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**env, "HF_HUB_OFFLINE": "1"}, **kw)


def _sweep_dir(log_dir: Path) -> Path:
    sweeps = list((log_dir / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _job_log(sweep: Path, stream: str = "out", task: int = 0) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob(f".submitit/*/*_{task}_log.{stream}")))


def _slurm(env: dict, *cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=30).stdout


def _same_ending(a: dict, b: dict) -> None:
    assert a["objective"]["value"] == pytest.approx(b["objective"]["value"], abs=1e-6)
    assert Path(a["best_checkpoint"]).name == Path(b["best_checkpoint"]).name  # the same best epoch
    for split in ("val", "test"):
        for key in SPLIT_KEYS:
            assert a[split][key] == pytest.approx(b[split][key], abs=1e-6), (split, key)


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("sweep")
    proc = _train([*JOB, "model.optimizer.lr=5e-5,2e-4"], log_dir, slurm_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, _sweep_dir(log_dir)


def test_a_two_job_sweep_runs_as_two_slurm_jobs_ranked_on_validation(sweep):
    proc, sweep_dir = sweep
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == ["0", "1"] and all((p / "metrics.json").is_file() for p in runs)
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # both jobs ran through SLURM (a job array)
    lines = (sweep_dir / "summary.csv").read_text().strip().splitlines()
    scores = [float(line.split(",")[2]) for line in lines[1:]]
    assert lines[0].startswith("job,overrides,val/acc") and len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert "#SBATCH --signal=TERM@120" in next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    assert "gpus" not in next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()  # the CPU path asks for no GPU


def test_preemption_exits_75_requeues_and_resumes_in_the_same_folder(sweep, slurm_cluster, tmp_path):
    cmd = [sys.executable, "train.py", "-m", *JOB, "model.optimizer.lr=5e-5", f"paths.log_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**slurm_cluster, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("train/multiruns/*/0/checkpoints/last.ckpt")):  # epoch 0 is finished
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not finish its first epoch"
            time.sleep(0.2)
        job = _slurm(slurm_cluster, "squeue", "-h", "-o", "%i").split()
        assert len(job) == 1
        _slurm(slurm_cluster, "scancel", "--signal=TERM", job[0])  # what SLURM sends before the time limit
        deadline = time.monotonic() + 180  # its own window: a slow first epoch on a busy machine left it 0 s once
        # SLURM holds a requeued job for two minutes (EligibleTime); an operator may release it at once.
        while "BeginTime" not in _slurm(slurm_cluster, "squeue", "-h", "-j", job[0], "-o", "%r"):
            assert proc.poll() is None and time.monotonic() < deadline, "the job was not requeued"
            time.sleep(0.2)
        # Released at once, the job can land on the node while slurmd still holds the old run's revoked credential
        # (it compares whole seconds): that start is refused ("Job credential revoked") and the job ends with no
        # result. A few seconds later the new credential is valid.
        time.sleep(3)
        deadline = time.monotonic() + 240
        while (state := _slurm(slurm_cluster, "squeue", "-h", "-j", job[0],
                               "-o", "%T %r").strip()).startswith("PENDING"):
            # released until the scheduler starts it (on a busy machine one release can be missed)
            _slurm(slurm_cluster, "scontrol", "update", f"JobId={job[0]}", "StartTime=now")
            assert proc.poll() is None and time.monotonic() < deadline, f"the requeued job did not start: {state}"
            time.sleep(2)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    sweep_dir = _sweep_dir(tmp_path)
    log = _job_log(sweep_dir)
    assert "SIGTERM received: stopping at this batch" in log
    assert f"job step exited 75 (preempted): requeueing job {job[0]}, restart 1 of 3" in log
    assert "Restarts=1" in _slurm(slurm_cluster, "scontrol", "show", "job", job[0])
    assert f"resuming the unfinished run in {sweep_dir / '0'}" in log  # the same folder
    finished = re.findall(r"epoch (\d+) finished", log)
    assert sorted(finished) == ["0", "1", "2"], finished  # each epoch finished once: none repeated after the requeue
    resumed = log.index("resuming the unfinished run")
    assert re.findall(r"epoch (\d+) finished", log[resumed:]) == ["1", "2"]
    _same_ending(json.loads((sweep_dir / "0" / "metrics.json").read_text()),
                 json.loads((sweep[1] / "0" / "metrics.json").read_text()))  # the uninterrupted run, lr=5e-5


def test_a_user_mistake_fails_once_is_not_requeued_and_the_sweep_names_the_job(slurm_cluster, tmp_path):
    proc = _train([*JOB, "model.trainable_layers=most"], tmp_path, slurm_cluster, timeout=120)
    assert proc.returncode != 0
    assert "Error executing job with overrides:" in proc.stderr and "model.trainable_layers=most" in proc.stderr
    sweep_dir = _sweep_dir(tmp_path)
    errors = [line for line in _job_log(sweep_dir, "err").splitlines() if line.startswith("error: ")]
    assert errors == ["error: model.trainable_layers='most' is not valid; choose one of head, last_block, "
                      "last_two_blocks, an integer, all, lora"] or (
        len(errors) == 1 and "model.trainable_layers='most'" in errors[0]), errors
    job = next(p for p in sweep_dir.glob(".submitit/*") if p.is_dir()).name
    assert ("Restarts=0" in _slurm(slurm_cluster, "scontrol", "show", "job", job)
            and "requeueing" not in _job_log(sweep_dir))


def test_ddp_over_two_slurm_tasks_takes_its_ranks_from_slurm_and_matches_one_process(slurm_cluster, tmp_path):
    proc = _train([*JOB, "trainer=ddp_sim", "trainer.max_epochs=1", "trainer.limit_test_batches=1.0"], tmp_path,
                  slurm_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = _sweep_dir(tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    for rank in (0, 1):  # one SLURM task per rank, each told its rank by SLURM (no process spawned by Lightning)
        task_log = _job_log(sweep_dir, "out", rank) + _job_log(sweep_dir, "err", rank)
        assert f"global_rank={rank}(2)" in task_log and f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in task_log
    run_dir = sweep_dir / "0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["operating_point"]["val"]["count"] == 149 and metrics["operating_point"]["test"]["count"] == 300
    single = subprocess.run([sys.executable, "train.py", *FAST, "train=false",
                             f"ckpt_path={metrics['best_checkpoint']}", f"hydra.run.dir={tmp_path}/single"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in SPLIT_KEYS:
            assert metrics[split][key] == pytest.approx(alone[split][key], abs=1e-5), (split, key)


def test_a_request_the_partition_cannot_hold_fails_before_submission(slurm_cluster, tmp_path):
    proc = _train([*JOB, "hydra.launcher.cpus_per_task=64"], tmp_path, slurm_cluster, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hydra.launcher.cpus_per_task=64 asks a node of partition debug for more than it has")
    assert not _slurm(slurm_cluster, "squeue", "-h").strip()  # nothing was submitted
