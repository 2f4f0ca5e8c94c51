import logging
import os

import pytest

# Nothing in the tests may reach the network: the hub client must answer from its cache or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sms_module():
    """The book's default split, built once (reading and tokenizing the file takes ~1 s)."""
    from spamclf.datamodule import SpamDataModule

    dm = SpamDataModule()
    dm.setup()
    return dm


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO)
    return caplog


SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "scontrol", "srun")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (scripts/slurm-local) for the session: yields the environment that points the SLURM
    commands at it. Skips where SLURM is missing or the user is not root; SPAMCLF_REQUIRE_SLURM=1 (CI) fails instead.
    Every daemon it started is stopped, by process id, even when a test fails."""
    import shutil
    import subprocess
    from pathlib import Path

    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    reason = (f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd slurm-client munge)"
              if missing else "slurmd needs root to start jobs" if os.geteuid() != 0 else None)
    if reason:
        if os.environ.get("SPAMCLF_REQUIRE_SLURM") == "1":
            pytest.fail(f"SPAMCLF_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local"
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(script), "start", "--dir", str(state)], capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("SLURM_"))
        yield {**os.environ, **env}
    finally:
        subprocess.run([str(script), "stop", "--keep", str(state)], timeout=120)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One trained gpt2-tiny run folder (checkpoints/last.ckpt, validation.csv, …), shared by the server, page
    and ONNX tests."""
    from spamclf.pipeline import run
    from tests.helpers import TINY, compose_cfg

    out = tmp_path_factory.mktemp("tiny-run")
    run(compose_cfg([*TINY, "test=false"], out))
    return out
