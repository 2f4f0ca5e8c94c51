"""The prediction cases: the predict CLI's throughput per engine, its cold start, and the int8 graph's labels
against its fp32 checkpoint's."""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.models import checkpoint_and_messages, export_graph, model_flags
from benchmarks.processes import watched_run
from benchmarks.training import gpt_sizes


def case_predict(args, engine: str | None = None) -> dict:
    """The prediction CLI on an N-line file of SMS messages, from a saved checkpoint or its ONNX export."""
    from spamclf.tokenizer import encode_texts

    engine = engine or f"torch:{args.predict_precision}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = checkpoint_and_messages(args, tmp)
        lines = [texts[i % len(texts)].replace("\n", " ") for i in range(args.predict_lines)]
        (tmp / "in.txt").write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "spamclf.predict", *model_flags(args, tmp, engine),
                   "--input", str(tmp / "in.txt"), "--output", str(tmp / "out.jsonl"), "--chunk-size", "4096"]
        run = watched_run(command)
        precision = next((ln.split(" -> ")[1].split(":")[0] for ln in run["stderr"].splitlines()
                          if ln.startswith("precision ")), "?")
        with open(tmp / "out.jsonl") as fh:
            written = sum(1 for _ in fh)
    tokens = sum(len(t) for t in encode_texts(lines[: len(texts)]))
    rss = run["rss"]
    quarter = max(1, len(rss) // 4)  # memory over time: the first quarter (model loaded, first chunks) against the rest
    return {"wall_s": run["wall_s"], "loaded_s": run["loaded_s"], "lines": written,
            "mean_tokens": tokens / min(len(texts), len(lines)), "peak_rss": max(rss) if rss else 0,
            "precision": precision, "engine": engine,
            "rss_first_quarter": max(rss[:quarter]) if rss else 0,
            "rss_rest": max(rss[quarter:] or rss[:1]) if rss else 0,
            "sizes": gpt_sizes(args.model)}


def case_cold_start(args) -> dict:
    """One message, process start to answer: `predict --onnx` (int8) against `predict --ckpt`, the median of 5 runs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint_and_messages(args, tmp)
        result = {}
        for engine in ("onnx:int8", "torch:auto"):
            command = [sys.executable, "-m", "spamclf.predict", *model_flags(args, tmp, engine),
                       "--text", "WINNER!! Claim now"]
            runs = [watched_run(command) for _ in range(5)]
            walls = [r["wall_s"] for r in runs]
            result[engine] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                              "cpu_median_s": statistics.median(r["cpu_s"] for r in runs)}
    return {"runs": result}


@dataclass(frozen=True)
class Answers:
    """A classifier's predictions, made once: label_agreement and the rates read the same ones."""

    predictions: list

    def predict(self, texts: list[str]) -> list:
        return self.predictions


def _rates(predictions, labels: list[str], positive: str) -> dict:
    """False-positive rate and recall of `predictions` against the true `labels`."""
    flagged = [p.label == positive for p in predictions]
    negatives = [f for f, y in zip(flagged, labels) if y != positive]
    positives = [f for f, y in zip(flagged, labels) if y == positive]
    return {"fpr": sum(negatives) / max(len(negatives), 1), "recall": sum(positives) / max(len(positives), 1),
            "false_positives": f"{sum(negatives)} of {len(negatives)}",
            "caught": f"{sum(positives)} of {len(positives)}"}


def _compare_on_splits(run: Path, fp32, int8) -> dict:
    """Agreement, FPR and recall of both classifiers on the run's validation, test and natural splits."""
    import pandas as pd

    from spamclf.agreement import label_agreement

    positive, splits = fp32.decision.positive_label, {}
    for split in ("validation", "test", "natural"):
        frame = pd.read_csv(run / f"{split}.csv")
        texts, labels = frame["text"].astype(str).tolist(), frame["label"].astype(str).tolist()
        a, b = Answers(fp32.predict(texts)), Answers(int8.predict(texts))
        splits[split] = {"count": len(texts), "agreement": label_agreement(a, b, texts),
                         "fp32": _rates(a.predictions, labels, positive),
                         "int8": _rates(b.predictions, labels, positive)}
    return splits


def case_int8_accuracy(args) -> dict:
    """For each run folder in --runs: the int8 graph's labels against the fp32 checkpoint's on the run's splits
    (validation.csv, test.csv, natural.csv), and FPR/recall at the checkpoint's threshold for both."""
    import spamclf

    results = {}
    for run in map(Path, filter(None, args.runs.split(","))):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "model.ckpt").symlink_to((run / "checkpoints" / "last.ckpt").resolve())
            fp32 = spamclf.load(tmp / "model.ckpt", precision="fp32")
            splits = _compare_on_splits(run, fp32, spamclf.load(export_graph(tmp, quantize=True)))
        results[str(run)] = {"model": fp32.info()["model_name"], "threshold": fp32.decision.threshold,
                             "splits": splits}
    return {"runs": results}
