"""Exports: a Hugging Face folder that transformers loads as it is, and an ONNX file for ONNX Runtime."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spamclf.inference import Classifier
from spamclf.pipeline import run
from spamclf.tokenizer import encode_texts
from tests.helpers import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["last_block", "lora"])
def ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    run(compose_cfg([*TINY, "test=false", "model.pooling=last_nonpad", "data.padding=batch", "model.calibrate=true",
                     f"model.trainable_layers={request.param}", "trainer.limit_train_batches=30"], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def sms_texts(sms_module):
    return sms_module.frames["test"]["text"].tolist()[:24] + ["", "ok"]


def _padded(texts):
    ids = encode_texts(texts)
    width = max(map(len, ids))
    x = torch.tensor([row + [50256] * (width - len(row)) for row in ids])
    return x, torch.tensor([len(row) for row in ids])


def _export(ckpt, out, fmt):
    return subprocess.run([sys.executable, "-m", "spamclf.export", "--ckpt", str(ckpt), "--out", str(out),
                           "--format", fmt], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_hf_folder_loads_in_transformers_with_our_logits_and_labels(ckpt, sms_texts, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    proc = _export(ckpt, tmp_path / "hf", "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    clf = Classifier.load(ckpt, precision="fp32")
    assert clf.decision.temperature != 1.0  # calibrated: the temperature is folded into the exported head
    x, lengths = _padded(sms_texts)
    with torch.no_grad():
        ours = clf.logits(x, lengths) / clf.decision.temperature
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
        theirs = model(input_ids=x, attention_mask=(torch.arange(x.shape[1])[None] < lengths[:, None]).long()).logits
    assert (ours - theirs).abs().max() < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["pad_token_id"] == 50256
    classify = pipeline("text-classification", model=str(tmp_path / "hf"))
    texts = [t for t in sms_texts if t]  # transformers' tokenizer gives an empty message no token at all
    expected = clf.predict(texts)
    for got, want in zip(classify(texts), expected):
        assert got["label"] == want.label and got["score"] == pytest.approx(want.probability, abs=1e-4)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~_umask())}, modes  # every file readable as the umask allows


def test_onnx_runs_in_onnxruntime_with_our_logits(ckpt, sms_texts, tmp_path):
    import onnx
    import onnxruntime

    proc = _export(ckpt, tmp_path / "onnx", "onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "onnx" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["label_names"]) == ["ham", "spam"] and meta["positive_label"] == "spam"
    session = onnxruntime.InferenceSession(str(path))
    clf = Classifier.load(ckpt, precision="fp32")
    for texts in (sms_texts, sms_texts[:3]):  # two batch sizes, two widths
        x, lengths = _padded(texts)
        got = session.run(None, {"input_ids": x.numpy(), "lengths": lengths.numpy()})[0]
        with torch.no_grad():
            want = (clf.logits(x, lengths) / clf.decision.temperature).numpy()
        assert np.abs(got - want).max() < 1e-4


def test_export_refuses_what_it_cannot_do_exactly(tmp_path):
    run(compose_cfg([*TINY, "test=false", "trainer.limit_train_batches=5"], tmp_path / "last"))
    proc = _export(tmp_path / "last" / "checkpoints" / "last.ckpt", tmp_path / "out", "hf")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "model.pooling=last_nonpad" in proc.stderr and not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = _export(tmp_path / "last" / "checkpoints" / "last.ckpt", tmp_path / "full", "onnx")
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temporary folders


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
