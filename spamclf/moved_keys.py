"""Config keys that moved, so an override of the old name ends in one line naming the new one (Hydra itself would
answer that the key is not in the config)."""

from __future__ import annotations

from spamclf.optimization import SCHEDULES

MOVED = {
    "model.lr": "model.optimizer.lr",
    "model.weight_decay": "model.optimizer.weight_decay",
    "model.warmup_steps": "model.scheduler.warmup_steps",
    "model.cache_dtype": "model.prefix_cache.dtype",
    "model.cache_max_memory_mb": "model.prefix_cache.max_memory_mb",
}


def moved_key_error(overrides: list[str]) -> str | None:
    """The error for the first command-line override that uses a moved key, or None."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in MOVED:
            return f"{key} has moved to {MOVED[key]}; write {MOVED[key]}={value or 'VALUE'}"
        if key == "model.scheduler" and any(v.strip() in SCHEDULES for v in value.split(",")):
            return (f"model.scheduler is now the scheduler itself; write model.scheduler.schedule={value} "
                    f"(or model.scheduler=null for none)")
    return None
