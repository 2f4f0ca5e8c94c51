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


def training_phases(case: str, r: dict) -> dict[str, tuple[float, float]]:
    """{phase: (FLOPs, seconds)} of a training case: the frozen prefix (or the whole model when nothing is cached)
    forward on every split once per pass, the trainable blocks forward and backward."""
    s, t, z = r["summary"], r["tokens"], r["sizes"]
    fit, blk, pad = s["timings"].get("fit_s", 0.0), z["block"], padded_positions(t)
    cache_s = s["timings"].get("prefix_cache_s", 0.0)  # every split's cache; the test split's is built after fit
    if case == "fast":
        prefix = 2 * (z["layers"] - 1) * blk * sum(pad(sp) for sp in ("train", "val", "test"))
        n = t["sizes"]
        suffix = (last_block_flops(z, pad("train"), n["train"], r["pooled_only"], backward=True)
                  + last_block_flops(z, pad("val"), n["val"], r["pooled_only"], backward=False)) * r["epochs"]
        fit_cache_s = s["timings"].get("prefix_cache_fit_s", cache_s)
        return {"prefix cache": (prefix, cache_s), "suffix training + eval": (suffix, fit - fit_cache_s)}
    if case == "ch06":
        per_epoch = 2 * z["layers"] * blk * pad("train") + 4 * blk * pad("train") + 2 * z["layers"] * blk * pad("val")
        return {"fit (all forward, last block backward)": (per_epoch * r["epochs"], fit)}
    if case == "all_layers":
        return {"fit (all layers forward + backward)": (6 * z["layers"] * blk * pad("train") * r["epochs"], fit)}
    return {}


def prediction_flops(r: dict) -> float:
    """FLOPs of the prediction case: every block forward over the real tokens, the last one pooled only."""
    z = r["sizes"]
    return (2 * (z["layers"] - 1) * z["block"] * r["mean_tokens"] * r["lines"]
            + last_block_flops(z, r["mean_tokens"] * r["lines"], r["lines"], pooled_only=True, backward=False))
