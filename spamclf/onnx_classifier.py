"""A classifier exported to ONNX (`python -m spamclf.export --format onnx [--quantize int8]`), run by ONNX Runtime
alone: onnxruntime, numpy and tiktoken, no torch (`pip install 'spamclf[onnx]'`).

The same surface as `spamclf.inference.Classifier` — `OnnxClassifier.load(path).predict(texts)` gives the same
`Prediction`s, `.info()` the same model card — and the same rules: tokenization and truncation and the decision
through `spamclf.answers`, the decision (`Decision`) and padding rule from the graph's metadata, batches from
`spamclf.batching.length_batches`, right padding with <|endoftext|> in numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spamclf.answers import answer
from spamclf.batching import length_batches
from spamclf.decision import Decision, Prediction, load_decision, softmax
from spamclf.errors import CheckpointError
from spamclf.io import file_sha256
from spamclf.tokenizer import PAD_ID

CONTEXT_LENGTH = 1024  # GPT-2's; graphs exported before the metadata named it


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


def metadata_decision(meta: dict) -> Decision:
    """The decision the export stored; graphs exported before it had its own entry carry the labels and threshold."""
    if "decision" in meta:
        return load_decision({"decision": json.loads(meta["decision"])})
    labels = json.loads(meta["label_names"])
    return load_decision({"hyper_parameters": {"label_names": labels, "positive_label": meta.get("positive_label"),
                                               "threshold": float(meta.get("threshold", 0.5))}})


class OnnxClassifier:
    """An exported graph that classifies raw texts. Its `logits` output already has the temperature applied."""

    def __init__(self, session: ort.InferenceSession, path: str | os.PathLike):
        meta = dict(session.get_modelmeta().custom_metadata_map)
        self.session, self.path, self.meta = session, Path(path).resolve(), meta
        self.decision = metadata_decision(meta)
        self.tokenization: dict = json.loads(meta.get("padding") or "{}")
        self.readout: dict = json.loads(meta.get("readout") or '{"pooling": "last"}')
        self.quantization = meta.get("quantization", "none")
        used = "int8" if self.quantization == "int8" else "fp32"
        self.precision = GraphPrecision("onnx", used, f"ONNX Runtime {ort.__version__} on the CPU, "
                                        f"{'dynamic int8 weights' if used == 'int8' else 'fp32 weights'} as exported")
        self.pad_length: int | None = self.tokenization.get("pad_length")
        self.width = self.pad_length or self.tokenization.get("context_length") or int(meta.get("context_length", CONTEXT_LENGTH))
        # pooling=last reads the padded sequence's last position: without a fixed width, only equal widths batch together
        self.one_width = self.pad_length is None and self.readout.get("pooling") == "last"

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", precision: str = "auto", threads: int = 0) -> OnnxClassifier:
        """`device` and `precision` are there for the same signature as `Classifier.load`: the graph runs on the CPU,
        at the precision it was exported at (fp32, or int8 weights)."""
        if str(device) != "cpu":
            raise CheckpointError(f"--device {device}: an ONNX graph runs on the CPU here; drop --device")
        return cls(read_session(path, threads), path)

    @property
    def label_names(self) -> list[str]:
        return list(self.decision.label_names)

    def logits(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Class logits [B, C] (temperature applied) of right-padded ids [B, T] with `lengths` real tokens."""
        return self.session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})[0]

    def predict(self, texts: Sequence[str], batch_tokens: int = 2048,
                progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """As `Classifier.predict`: one Prediction per text, in order."""
        return answer(texts, self.width, self.decision, lambda ids: self._probabilities(ids, batch_tokens, progress))

    def _probabilities(self, ids: list[list[int]], batch_tokens: int, progress) -> list[list[float]]:
        widths = [self.pad_length or len(row) for row in ids]
        probs: list[list[float]] = [[]] * len(ids)
        for rows in length_batches(widths, tokens=batch_tokens, one_width=self.one_width):
            input_ids = np.full((len(rows), max(widths[r] for r in rows)), PAD_ID, dtype=np.int64)
            for j, r in enumerate(rows):
                input_ids[j, : len(ids[r])] = ids[r]
            lengths = np.array([len(ids[r]) for r in rows], dtype=np.int64)
            for r, row in zip(rows, self.logits(input_ids, lengths).tolist()):
                probs[r] = softmax(row)
            if progress is not None:
                progress(len(rows))
        return probs

    def info(self) -> dict:
        """The model card, as `Classifier.info`: model, labels, padding rule, decision, precision, sha256."""
        source = json.loads(self.meta.get("source") or "{}")
        return {"model_file": str(self.path), "sha256": file_sha256(self.path), "format": "onnx",
                "checkpoint": source.get("checkpoint"), "checkpoint_sha256": source.get("sha256"),
                "model_name": source.get("model_name"), "weights": source.get("weights"),
                "pooling": self.readout.get("pooling"), "label_names": self.label_names,
                "padding": {k: self.tokenization.get(k) for k in ("padding", "pad_length", "context_length")},
                "decision": self.decision.as_dict(),
                "precision": {"requested": self.precision.requested, "used": self.precision.name,
                              "reason": self.precision.reason}}
