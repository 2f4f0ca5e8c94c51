"""After a multirun: a table of the runs sorted by the optimized validation metric, also as CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

SUMMARY_FILE = "summary.csv"


def collect_runs(sweep_dir: Path) -> list[dict]:
    """One row per finished job folder: its overrides, objective and final metrics; best first."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        row = {"job": job.name, "overrides": " ".join(map(str, overrides)),
               metrics["objective"]["name"]: metrics["objective"]["value"]}
        for split in ("train", "val", "test"):
            for name in ("acc", "loss"):
                if name in metrics.get(split, {}):
                    row[f"{split}/{name}"] = metrics[split][name]
        row["fit_s"] = metrics.get("timings", {}).get("fit_s")
        rows.append(row)
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        objective = config.get("optimized_metric", "val/acc")
        rows = collect_runs(sweep_dir)
        if not rows:
            return
        rows.sort(key=lambda r: (r.get(objective) is None, -(r.get(objective) or 0.0)))
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(sweep_dir / SUMMARY_FILE, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        table = Table(title=f"{len(rows)} runs by {objective} (validation), best first; {sweep_dir / SUMMARY_FILE}")
        for column in columns:
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(*(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns))
        Console(width=160).print(table)
