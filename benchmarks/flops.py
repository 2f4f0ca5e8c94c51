"""FLOP counts of the training and prediction cases: 2 per weight per token forward, 4 more backward."""

from __future__ import annotations


def padded_positions(tokens: dict):
    """Positions the model computes per split: the fixed width × rows, or the real tokens (per-batch padding
    with length buckets leaves almost none)."""
    width = tokens["pad_length"]
    return lambda split: width * tokens["sizes"][split] if width else tokens["real"][split]


def last_block_flops(sizes: dict, tokens: int, rows: int, pooled_only: bool, backward: bool) -> float:
    """FLOPs of the trainable last block (2 per weight and token forward; backward twice that). With
    pooled_only, every token needs only its key and value (2·D² weights), each row one query, attention
    output and feed-forward (10·D²)."""
    d2 = sizes["emb_dim"] ** 2
    forward = 2 * (2 * d2 * tokens + 10 * d2 * rows) if pooled_only else 2 * sizes["block"] * tokens
    return forward * (3 if backward else 1)


def gflops(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e9:.0f}" if seconds > 0 else "-"


def forward_flops(r: dict, positions: float, rows: int) -> float:
    """FLOPs of one forward pass over `positions` in `rows` messages through the blocks a pass runs: the last one
    alone when the frozen prefix is cached, else every block (the last pooled only where configured)."""
    z = r["sizes"]
    last = last_block_flops(z, positions, rows, r["pooled_only"], backward=False)
    return last if r.get("cached") else last + 2 * (z["layers"] - 1) * z["block"] * positions


def training_work(r: dict) -> dict[str, float]:
    """A training case's work: FLOPs of the prefix cache (every split once), of the optimizer steps (forward and
    backward over the train split each epoch), of evaluation (validation each epoch, then the final pass over
    train, validation and test), and the number of optimizer steps."""
    t, z, pad = r["tokens"], r["sizes"], padded_positions(r["tokens"])
    n, splits = t["sizes"], ("train", "val", "test")
    forward = forward_flops(r, pad("train"), n["train"])
    trained = forward if r.get("trainable") == "all" else last_block_flops(z, pad("train"), n["train"],
                                                                           r["pooled_only"], backward=False)
    prefix = 2 * (z["layers"] - 1) * z["block"] * sum(pad(s) for s in splits) if r.get("cached") else 0.0
    return {"prefix": prefix, "train": (forward + 2 * trained) * r["epochs"],  # backward: twice what trains
            "fit_eval": forward_flops(r, pad("val"), n["val"]) * r["epochs"],
            "final_eval": sum(forward_flops(r, pad(s), n[s]) for s in splits),
            "steps": t["train_examples"] // t.get("batch_size", 8) * r["epochs"]}


def training_phases(case: str, r: dict) -> dict[str, tuple[float, float]]:
    """{phase: (FLOPs, seconds)} of a training case: the frozen prefix (or the whole model when nothing is cached)
    forward on every split once per pass, the trainable blocks forward and backward, validation each epoch."""
    s, work = r["summary"], training_work(r)
    fit, fitted = s["timings"].get("fit_s", 0.0), work["train"] + work["fit_eval"]
    cache_s = s["timings"].get("prefix_cache_s", 0.0)  # every split's cache; the test split's is built after fit
    if case == "fast":
        fit_cache_s = s["timings"].get("prefix_cache_fit_s", cache_s)
        return {"prefix cache": (work["prefix"], cache_s), "suffix training + eval": (fitted, fit - fit_cache_s)}
    if case == "ch06":
        return {"fit (all forward, last block backward)": (fitted, fit)}
    if case == "all_layers":
        return {"fit (all layers forward + backward)": (fitted, fit)}
    return {}


def prediction_flops(r: dict) -> float:
    """FLOPs of the prediction case: every block forward over the real tokens, the last one pooled only."""
    z = r["sizes"]
    return (2 * (z["layers"] - 1) * z["block"] * r["mean_tokens"] * r["lines"]
            + last_block_flops(z, r["mean_tokens"] * r["lines"], r["lines"], pooled_only=True, backward=False))
