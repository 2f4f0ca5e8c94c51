"""A SLURM request larger than the partition's nodes is refused before submission, in one line naming the key."""

from omegaconf import OmegaConf

from spamclf.slurm import oversized


def test_a_request_larger_than_the_node_names_the_setting():
    node = ("debug", 2, 7900, 0)
    fits = OmegaConf.create({"cpus_per_task": 1, "tasks_per_node": 2, "mem_gb": 4, "gpus_per_node": None})
    assert oversized(fits, node) is None
    assert oversized(OmegaConf.create({"cpus_per_task": None, "mem_gb": None, "gpus_per_node": None}), node) is None
    cpus = oversized(OmegaConf.merge(fits, {"cpus_per_task": 2}), node)
    assert cpus.startswith("hydra.launcher.cpus_per_task=2 asks a node of partition debug") and "2 tasks" in cpus
    assert "hydra.launcher.mem_gb=64" in oversized(OmegaConf.merge(fits, {"mem_gb": 64}), node)
    gpus = oversized(OmegaConf.merge(fits, {"gpus_per_node": 1}), node)
    assert "hydra.launcher.gpus_per_node=1" in gpus and "hydra/launcher=slurm_cpu" in gpus and "\n" not in gpus
