"""Before a sweep is submitted to SLURM: a job that asks for more than its partition's nodes have would wait in the
queue for ever (SLURM accepts it), so the sweep stops first, in one line naming the setting and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def partition_nodes(partition: str | None) -> tuple[str, int, int, int] | None:
    """(partition, CPUs a node, memory a node in MB, GPUs a node) of the largest node in `partition` (None: the default
    partition), from `sinfo`; None where SLURM cannot be asked."""
    if shutil.which("sinfo") is None:
        return None
    fields = ["sinfo", "-h", "-N", "-o", "%P %c %m %G"] + (["-p", partition] if partition else [])
    try:
        lines = subprocess.run(fields, capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [lines[i:i + 4] for i in range(0, len(lines) - len(lines) % 4, 4)]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        return None
    gpus = [sum(int(g.split(":")[-1].split("(")[0]) for g in r[3].split(",") if g.startswith("gpu")) for r in rows]
    best = max(range(len(rows)), key=lambda i: (int(rows[i][1]), int(rows[i][2].rstrip("+"))))
    return rows[best][0].rstrip("*"), int(rows[best][1]), int(rows[best][2].rstrip("+")), gpus[best]


def oversized(launcher: DictConfig, node: tuple[str, int, int, int]) -> str | None:
    """The first setting that asks a node for more than the partition's largest node has, as a one-line error."""
    name, cpus, mem_mb, gpus = node
    tasks = launcher.get("tasks_per_node") or 1
    asks = [("cpus_per_task", (launcher.get("cpus_per_task") or 0) * tasks, cpus, f"{cpus} CPUs"),
            ("mem_gb", (launcher.get("mem_gb") or 0) * 1024, mem_mb, f"{mem_mb // 1024} GB"),
            ("gpus_per_node", launcher.get("gpus_per_node") or 0, gpus, f"{gpus} GPUs")]
    for key, want, has, says in asks:
        if want > has:
            return (f"hydra.launcher.{key}={launcher.get(key)} asks a node of partition {name} for more than it has "
                    f"({says} a node{f', {tasks} tasks' if key == 'cpus_per_task' and tasks > 1 else ''}); "
                    "lower it, set it to null for the partition's default"
                    f"{', or use hydra/launcher=slurm_cpu' if key == 'gpus_per_node' else ''}")
    return None


class PartitionFits(Callback):
    """Hydra callback: on a SLURM launcher, check the request against `sinfo` before anything is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if "slurm" not in str(launcher.get("_target_", "")).lower():
            return
        node = partition_nodes(launcher.get("partition"))
        problem = oversized(launcher, node) if node else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
