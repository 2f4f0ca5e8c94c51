"""The benchmark's cases by name: the training runs and their Hydra overrides, and the prediction engines."""

from __future__ import annotations

CASES = ("ch06", "fast", "peer", "all_layers", "sweep", "predict", "predict_fp32", "predict_onnx", "predict_int8",
         "cold_start", "serve", "serve_int8", "int8_accuracy")
PREDICT_ENGINES = {"predict_fp32": "torch:fp32", "predict_onnx": "onnx:fp32", "predict_int8": "onnx:int8"}
# experiment=fast with one piece taken away: what each piece contributes (`--cases ablations`).
ABLATIONS = {
    "fast-no_cache": ["model.prefix_cache=false"],
    "fast-full_last_block": ["model.pooled_only=false"],
    "fast-fp32": ["trainer.precision=32-true"],
    "fast-no_bucket": ["data.bucket=false"],
    "fast-pad120": ["data.padding=longest_train", "data.bucket=false"],
}
TRAIN_CASES = {"ch06": ["experiment=ch06"], "fast": ["experiment=fast"],
               "all_layers": ["experiment=fast", "model.trainable_layers=all"],
               **{name: ["experiment=fast", *extra] for name, extra in ABLATIONS.items()}}
OPT_IN = ("scale",)  # not part of a plain `python -m benchmarks`: it trains on up to a million messages
KNOWN = (*CASES, *ABLATIONS, *OPT_IN)
# The cases through the package's pipeline, whose work the report sets against this machine's measured rates.
FLOORED = (*TRAIN_CASES, "sweep")
