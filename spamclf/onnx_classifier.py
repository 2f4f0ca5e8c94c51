"""A classifier exported to ONNX (`python -m spamclf.export --format onnx [--quantize int8]`), run by ONNX Runtime
alone: onnxruntime, numpy and tiktoken, no torch (`pip install 'spamclf[onnx]'`).

A backend of `spamclf.classifier.TextClassifier`, as the torch `spamclf.inference.Classifier` is: the same
`predict`, `info` and rules (tokenization, truncation, batches, right padding, the decision); the decision and
the run's tokenization (padding rule, truncation mode, mail headers) come from the graph's metadata, and this
backend adds only the graph's forward. `spamclf.load(path)` picks it for a .onnx.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spamclf.classifier import TextClassifier
from spamclf.decision import load_decision, softmax
from spamclf.errors import CheckpointError
from spamclf.io import file_sha256


@dataclass(frozen=True)
class GraphPrecision:
    """What the graph computes in, named as `spamclf.precision.Precision` names it (requested, name, reason)."""

    requested: str
    name: str
    reason: str


def read_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU, or one line that says what is wrong with the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: ONNX model not found; pass the model.onnx that "
                              f"`python -m spamclf.export --format onnx` wrote (fix --onnx)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # No memory arena: with it a session keeps the high-water mark of every batch shape it has seen (a server's
    # RSS went from ~0.37 to ~0.74 GB over a few batches of 32 messages, gpt2-small int8); without it ~0.46 GB,
    # at the same speed within noise.
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types for every kind of bad file
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__}); pass the model.onnx that "
                              f"`python -m spamclf.export --format onnx` wrote") from None


METADATA = ("decision", "padding", "readout", "context_length", "quantization", "source")


def read_metadata(session: ort.InferenceSession, path: str | os.PathLike) -> dict:
    """The entries `python -m spamclf.export` stored beside the graph, JSON-decoded (quantization: a plain name)."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in METADATA if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: the graph's metadata has no {missing[0]} entry (an older spamclf exported "
                              f"it); export it again with `python -m spamclf.export --format onnx`")
    return {key: meta[key] if key == "quantization" else json.loads(meta[key]) for key in METADATA}


class OnnxClassifier(TextClassifier):
    """An exported graph that classifies raw texts. Its `logits` output already has the temperature applied."""

    # The graph computes every padded position. 16 SMS of arbitrary lengths (a server's batch) in one batch cost
    # 2.7x their cost in batches within 1.3x of their real positions (int8, 1 thread, 2-core Intel Xeon with AMX),
    # which matched the CLI's length-sorted batches; 1.6 and 2 were 5% and 16% slower than 1.3.
    padding_slack = 1.3

    def __init__(self, session: ort.InferenceSession, path: str | os.PathLike):
        meta = read_metadata(session, path)
        self.session, self.path, self.source = session, Path(path).resolve(), meta["source"]
        self.quantization, self.readout = meta["quantization"], meta["readout"]
        used = "int8" if self.quantization == "int8" else "fp32"
        self.precision = GraphPrecision("onnx", used, f"ONNX Runtime {ort.__version__} on the CPU, "
                                        f"{'dynamic int8 weights' if used == 'int8' else 'fp32 weights'} as exported")
        super().__init__(load_decision(meta, path), meta["padding"], self.readout["pooling"],
                         int(meta["context_length"]))

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 0) -> OnnxClassifier:
        """`threads`: ONNX Runtime's intra-op threads (0: its own choice). The graph runs on the CPU, at the
        precision it was exported at (fp32, or int8 weights)."""
        return cls(read_session(path, threads), path)

    def logits(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Class logits [B, C] (temperature applied) of right-padded ids [B, T] with `lengths` real tokens."""
        return self.session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})[0]

    def forward(self, input_ids: list[list[int]], lengths: list[int]) -> list[list[float]]:
        logits = self.logits(np.array(input_ids, dtype=np.int64), np.array(lengths, dtype=np.int64))
        return [softmax(row) for row in logits.tolist()]

    def _source_card(self) -> dict:
        return {"model_file": str(self.path), "sha256": file_sha256(self.path), "format": "onnx",
                "checkpoint": self.source.get("checkpoint"), "checkpoint_sha256": self.source.get("sha256"),
                "model_name": self.source.get("model_name"), "weights": self.source.get("weights")}
