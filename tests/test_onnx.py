"""ONNX Runtime inference without torch: an int8 (and fp32) export of a trained tiny checkpoint, classified by
`OnnxClassifier`, `predict --onnx` and `serve --onnx`, against the torch `Classifier`."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spamclf.inference import Classifier
from spamclf.serve import ONNX_REFUSAL
from tests.helpers import http_request, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
LONG = "win a free prize now " * 200  # past the 120 tokens the run padded to: truncated


def _export(ckpt, out, *extra):
    return subprocess.run([sys.executable, "-m", "spamclf.export", "--ckpt", str(ckpt), "--out", str(out),
                           "--format", "onnx", *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def texts(tiny_run):
    import pandas as pd

    return pd.read_csv(tiny_run / "test.csv")["text"].tolist()[:60] + ["", "ok", LONG]


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """{"fp32": model.onnx, "int8": model.onnx, "int8_stderr": the export's messages}."""
    out = tmp_path_factory.mktemp("onnx")
    graphs = {}
    for name, extra in (("fp32", ()), ("int8", ("--quantize", "int8"))):
        proc = _export(ckpt, out / name, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        graphs[name], graphs[f"{name}_stderr"] = out / name / "model.onnx", proc.stderr
    return graphs


@pytest.fixture(scope="module")
def reference(ckpt, texts):
    return Classifier.load(ckpt, precision="fp32").predict(texts)


def test_int8_export_runs_int8_matmuls_carries_the_decision_and_checks_agreement(exported, ckpt):
    import onnx

    from spamclf.onnx_classifier import OnnxClassifier

    ops = {node.op_type for node in onnx.load(str(exported["int8"])).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops  # the linear layers run on int8 weights
    assert "of the 149 validation messages" in exported["int8_stderr"]
    graph, torch_side = OnnxClassifier.load(exported["int8"]), Classifier.load(ckpt, precision="fp32")
    assert graph.decision == torch_side.decision and graph.quantization == "int8" and graph.pad_length == 120
    info = graph.info()
    assert info["precision"]["used"] == "int8" and info["format"] == "onnx"
    assert info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["decision"]["measured"]["split"] == "validation"


def test_onnx_classifier_answers_as_the_torch_classifier(exported, texts, reference):
    from spamclf.onnx_classifier import OnnxClassifier

    for name, tolerance in (("fp32", 1e-4), ("int8", 0.05)):
        answers = OnnxClassifier.load(exported[name]).predict(texts, batch_tokens=512)  # several batches
        assert [a.text for a in answers] == texts
        assert [a.truncated for a in answers] == [r.truncated for r in reference] and answers[-1].truncated
        for got, want in zip(answers, reference):
            assert got.probabilities["spam"] == pytest.approx(want.probabilities["spam"], abs=tolerance), name
            if name == "fp32" or abs(want.probabilities["spam"] - 0.5) > tolerance:  # int8 may flip a coin toss
                assert got.label == want.label, (name, got.text)


def test_predict_onnx_writes_the_classifiers_answers_without_importing_torch(exported, texts, reference, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(t.replace("\n", " ") for t in texts if "\n" not in t) + "\n")
    probe = ("import sys, spamclf.predict as p; code = p.main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, "--onnx", str(exported["fp32"]),
                           "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision onnx -> fp32" in proc.stderr
    want = {r.text: r for r in reference}
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == len([t for t in texts if "\n" not in t])
    for got in lines:
        assert got["label"] == want[got["text"]].label
        assert got["probability"] == pytest.approx(want[got["text"]].probability, abs=1e-4)


def test_serve_onnx_answers_predict_and_info_without_torch(exported, texts, reference):
    import psutil

    base, proc = start_server(["--onnx", str(exported["int8"]), "--max-texts", "8"],
                              exported["int8"].parent / "server.log", ROOT)
    try:
        status, answer = http_request(base + "/predict", {"texts": texts[:8]})
        assert status == 200 and [a["text"] for a in answer["predictions"]] == texts[:8]
        for got, want in zip(answer["predictions"], reference[:8]):
            assert got["probabilities"]["spam"] == pytest.approx(want.probabilities["spam"], abs=0.05)
        status, info = http_request(base + "/info")
        assert (status == 200 and info["model"]["precision"]["used"] == "int8"
                and info["model"]["label_names"] == ["ham", "spam"])
        assert info["model"]["limits"]["max_texts"] == 8
        assert http_request(base + "/predict", {"text": "hi", "explain": True}) == (400, {"detail": ONNX_REFUSAL})
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(processes) >= 2  # the API server and its inference worker
        for p in processes:
            assert not [m.path for m in p.memory_maps() if "libtorch" in m.path], "a server process loaded torch"
    finally:
        stop_server(proc)


@pytest.mark.parametrize("module", ["spamclf.predict", "spamclf.serve"])
def test_a_bad_onnx_path_or_flag_is_one_line(module, tmp_path, exported):
    def run(*args):
        extra = ["--text", "hi"] if module == "spamclf.predict" else []
        return subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    proc = run("--onnx", str(tmp_path / "none.onnx"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.onnx'}: ONNX model not found; pass the model.onnx that "
        f"`python -m spamclf.export --format onnx` wrote (fix --onnx)"]
    (tmp_path / "bad.onnx").write_text("not a graph")
    proc = run("--onnx", str(tmp_path / "bad.onnx"))
    assert (proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
            and "not a readable ONNX model" in proc.stderr)
    proc = run("--onnx", str(exported["fp32"]), "--precision", "bf16")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --precision applies to --ckpt only; an ONNX graph runs on the CPU at the precision it was exported at: "
        "drop --precision"]


def test_export_says_when_agreement_was_not_checked_and_refuses_quantizing_hf(ckpt, tmp_path):
    lone = tmp_path / "elsewhere" / "model.ckpt"  # no run folder around it: no validation.csv
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    proc = _export(lone, tmp_path / "int8", "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "was not checked" in warnings[0]
    proc = subprocess.run([sys.executable, "-m", "spamclf.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"),
                           "--format", "hf", "--quantize", "int8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --quantize int8 applies to --format onnx only; drop --quantize or use --format onnx"]
    assert not (tmp_path / "hf").exists()


def _public_methods(obj) -> set[str]:
    """The methods its class defines or inherits (attributes such as the torch side's `model` aside)."""
    return {name for name in dir(type(obj)) if not name.startswith("_") and callable(getattr(type(obj), name))}


def test_spamclf_load_gives_both_backends_one_interface(ckpt, exported, texts):
    import spamclf
    from spamclf.onnx_classifier import OnnxClassifier

    torch_side, graph = spamclf.load(ckpt, precision="fp32"), spamclf.load(exported["fp32"], threads=1)
    assert type(torch_side) is Classifier and type(graph) is OnnxClassifier
    assert _public_methods(torch_side) == _public_methods(graph) >= {"load", "predict", "info", "forward", "logits"}
    for name in ("label_names", "width", "one_width", "pad_length", "decision"):
        assert getattr(torch_side, name) == getattr(graph, name), name
    ours, theirs = torch_side.info(), graph.info()
    for name in ("pooling", "label_names", "padding", "decision"):
        assert ours[name] == theirs[name], name
    for a, b in zip(torch_side.predict(texts), graph.predict(texts), strict=True):
        assert ((a.text, a.label, a.truncated, list(a.probabilities))
                == (b.text, b.label, b.truncated, list(b.probabilities)))
        assert a.probability == pytest.approx(b.probability, abs=1e-4)


def test_spamclf_load_refuses_what_the_backend_does_not_take_in_one_line(ckpt, exported, tmp_path):
    import spamclf
    from spamclf.errors import SpamclfError

    with pytest.raises(SpamclfError, match=r"model\.pt: not a model file spamclf reads; pass a \.ckpt"):
        spamclf.load(tmp_path / "model.pt")
    with pytest.raises(SpamclfError, match=r"^precision= is not an option for an ONNX graph \(.*\); it takes threads: "
                                           r"drop precision$"):
        spamclf.load(exported["fp32"], precision="bf16")
    with pytest.raises(SpamclfError, match=r"^device= is not an option for an ONNX graph \(.*\); it takes threads: "
                                           r"drop device$"):
        spamclf.load(exported["fp32"], device="cpu")
    with pytest.raises(SpamclfError, match=r"^batch_tokens= is not an option for a checkpoint \(.*\); it takes "
                                           r"device, precision, threads: drop batch_tokens$"):
        spamclf.load(ckpt, batch_tokens=2)
    probe = "import sys; sys.modules['onnxruntime'] = None; import spamclf.predict as p; sys.exit(p.main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", probe, "--onnx", str(exported["fp32"]), "--text", "hi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: onnxruntime is not installed; pip install 'spamclf[onnx]'"]


@pytest.mark.parametrize("entry", ["decision", "context_length"])
def test_a_graph_without_a_metadata_entry_is_one_line(exported, tmp_path, entry):
    import onnx

    from spamclf.export import write_metadata

    graph = tmp_path / "old.onnx"
    shutil.copy(exported["fp32"], graph)
    write_metadata(graph, {p.key: p.value for p in onnx.load(str(graph)).metadata_props if p.key != entry})
    proc = subprocess.run([sys.executable, "-m", "spamclf.predict", "--onnx", str(graph), "--text", "hi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {graph}: the graph's metadata has no {entry} entry (an older spamclf exported it); export it again "
        f"with `python -m spamclf.export --format onnx`"]
