"""Running the package's command lines as the benchmark's subjects: their wall and CPU time, and their memory."""

from __future__ import annotations

import resource
import subprocess
import threading
import time

import psutil


def tree_rss(process: psutil.Process, proportional: bool = False) -> int:
    """Resident memory of a process and all its children. `proportional`: PSS, where pages that forked processes
    share (LitServe forks its API server from the main process) count once in all instead of once per process."""
    total = 0
    for p in (process, *process.children(recursive=True)):
        try:
            total += p.memory_full_info().pss if proportional else p.memory_info().rss
        except psutil.Error:
            pass
    return total


def watched_run(command: list[str]) -> dict:
    """Run `command`, sampling its RSS; `loaded_s`: when it printed its first stderr line (the model is loaded then);
    `cpu_s`: the CPU time it used (user + system), which a busy machine does not inflate as it does wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    watched, samples, stderr, loaded = psutil.Process(proc.pid), [], [], []

    def read_stderr():
        for line in proc.stderr:
            loaded.append(loaded[0] if loaded else time.perf_counter() - start)
            stderr.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            samples.append(watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.25)
    reader.join()
    proc.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {command[2]} failed: {stderr[-1:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "loaded_s": loaded[0] if loaded else 0.0, "rss": samples,
            "stderr": "".join(stderr)}
