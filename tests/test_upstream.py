"""Private behaviour of dependencies that spamclf relies on, each pinned by a test that fails loudly when upstream
changes it (the code names the upstream issue and version beside each use)."""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from spamclf.pipeline import _ddp_ranks_join_this_job

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_lightning_restarts_ddp_ranks_as_one_run_of_the_sweep_job(tmp_path, monkeypatch):
    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    job = tmp_path / "sweep" / "1"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=gpt2-tiny", "seed=7"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(job)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.overrides.task = ["model=gpt2-tiny", "seed=7"]
    hydra = HydraConfig.instance()
    monkeypatch.setattr(hydra, "cfg", hydra.cfg)  # restored afterwards: later tests see no Hydra run
    hydra.set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model=gpt2-tiny", "seed=5,7"])
    _ddp_ranks_join_this_job()
    command, cwd = _hydra_subprocess_cmd(local_rank=1)
    args = command[command.index("model=gpt2-tiny"):]  # after the interpreter and the program
    assert "-m" not in args and "seed=5,7" not in args, command  # not the whole sweep again
    assert args[:2] == ["model=gpt2-tiny", "seed=7"] and f'hydra.run.dir="{job}"' in args, command
    assert cwd == str(tmp_path)


def test_litserve_leaves_its_own_routes_open_on_a_server_of_several_apis():
    """spamclf.serve.litserve_route_auth exists because of this (Lightning-AI/LitServe#659, LitServe 0.2.19): when
    it fails, LitServe asks an API's `authorize` itself; drop the shim."""
    import litserve as ls

    class Keyed(ls.test_examples.SimpleLitAPI):
        def authorize(self, request):
            raise AssertionError("never called here")

    class Other(ls.test_examples.SimpleLitAPI):
        pass

    server = ls.LitServer([Keyed(), Other(api_path="/other")], accelerator="cpu")
    assert server.setup_auth() != server.lit_api[0].authorize  # the list has no `authorize`: routes stay open
    assert server.setup_auth(server.lit_api[0]) == server.lit_api[0].authorize  # the argument the shim passes
