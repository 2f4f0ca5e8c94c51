"""The scale case: for each size N of `--scale-sizes`, N distinct labelled messages generated from the SMS
collection, one training run over them (`benchmarks.stages`, a process of its own) and the predict CLI over them
(another): each stage's seconds per 1,000 messages and each process's peak RSS, to show they stay linear and
bounded as N grows."""

from __future__ import annotations

import csv
import random
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "split", "tokenize", "prefix cache", "train epoch", "validate", "evaluate", "predict")
DEFAULT_SIZES = "10000,100000,1000000"
SMALLEST = 1000  # fewer messages leave a validation split smaller than one batch
SEED = 123


def scale_sizes(spec: str) -> list[int]:
    """The sizes `--scale-sizes` names, ascending; a mistake ends in one line naming the flag."""
    from spamclf.errors import SpamclfError

    try:
        sizes = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise SpamclfError(f"--scale-sizes {spec}: not a comma-separated list of whole numbers, "
                           f"e.g. --scale-sizes {DEFAULT_SIZES}") from None
    if not sizes or sizes[0] < SMALLEST:
        raise SpamclfError(f"--scale-sizes {spec}: each size needs at least {SMALLEST:,} messages")
    return sizes


def generated_messages(n: int, seed: int = SEED) -> tuple[list[str], list[str]]:
    """`n` distinct (text, label) pairs, the same for the same seed: an SMS message followed by one to four
    consecutive words of another, keeping the first message's label (its class mix, ~13% spam)."""
    from spamclf.reading import SMS_FILE, read_labelled_file
    from spamclf.tokenizer import asset_path

    sms = read_labelled_file(asset_path(SMS_FILE))
    texts, labels = sms["text"].tolist(), sms["label"].tolist()
    words = [text.split() for text in texts]
    rng, seen, out_texts, out_labels = random.Random(seed), set(), [], []
    while len(out_texts) < n:
        first, other, count = rng.randrange(len(texts)), rng.randrange(len(texts)), rng.randint(1, 4)
        start = rng.randrange(max(1, len(words[other]) - count + 1))
        text = " ".join([*texts[first].split(), *words[other][start : start + count]])  # one line, single spaces
        if text not in seen:
            seen.add(text)
            out_texts.append(text)
            out_labels.append(labels[first])
    return out_texts, out_labels


def write_messages(folder: Path, texts: list[str], labels: list[str]) -> tuple[Path, Path]:
    """messages.csv (text, label: what `data=csv` reads) and messages.txt (one text a line: what predict reads)."""
    from spamclf.io import atomic_file

    with atomic_file(folder / "messages.csv") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    with atomic_file(folder / "messages.txt") as fh:
        fh.writelines(text + "\n" for text in texts)
    return folder / "messages.csv", folder / "messages.txt"


def predicted(checkpoint: str, messages: Path, out: Path, accelerator: str) -> dict:
    """The predict CLI over `messages`: its seconds after the model was loaded and its peak RSS (sampled)."""
    from benchmarks.processes import watched_run

    command = [sys.executable, "-m", "spamclf.predict", "--ckpt", checkpoint, "--input", str(messages),
               "--output", str(out), "--no-progress", "--device", "cuda" if accelerator == "gpu" else "cpu"]
    run = watched_run(command)
    with open(out) as fh:
        written = sum(1 for _ in fh)
    return {"seconds": run["wall_s"] - run["loaded_s"], "messages": written, "load_s": run["loaded_s"],
            "peak_rss": max(run["rss"], default=0)}


def one_size(n: int, args) -> dict:
    """Generate n messages, train on them in a process of its own, predict them in another."""
    from benchmarks.harness import run_case

    with tempfile.TemporaryDirectory(prefix="spamclf-scale-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        data, lines = write_messages(tmp, *generated_messages(n))
        generate_s = time.perf_counter() - start
        argv = ["--accelerator", args.accelerator, "--scale-data", str(data), "--scale-out", str(tmp / "run")]
        trained, train_rss = run_case("scale_train", argv)
        prediction = predicted(trained["checkpoint"], lines, tmp / "predictions.jsonl", args.accelerator)
    if prediction["messages"] != n:
        raise SystemExit(f"error: scale case: predict wrote {prediction['messages']} of {n} predictions")
    stages = {**trained["stages"], "predict": {k: prediction[k] for k in ("seconds", "messages")}}
    return {"messages": n, "stages": stages, "train_rss": train_rss, "train_rss_file": trained["peak_file"],
            "predict_rss": prediction["peak_rss"],
            "predict_load_s": prediction["load_s"], "generate_s": generate_s,
            **{k: trained[k] for k in ("reads", "spilled", "rows", "batch_size", "cache_cap_mb", "model")}}


def case_scale(args) -> dict:
    """Every size of --scale-sizes, smallest first."""
    sizes = []
    for n in scale_sizes(args.scale_sizes):
        print(f"scale: {n:,} messages …", file=sys.stderr, flush=True)
        sizes.append(one_size(n, args))
    return {"sizes": sizes}
