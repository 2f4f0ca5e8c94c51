"""Long messages cut the same way in training and in prediction, for every truncation mode: a gpt2-tiny run on a
mail folder with long messages and a 16-token width, its checkpoint, and its ONNX export."""

from __future__ import annotations

import pytest

from spamclf.tokenizer import TRUNCATION
from tests.helpers import TINY, compose_cfg, message, write_eml

WIDTH = 16
SPLITS = ("train", "val", "test")


def _long(words: str, n: int) -> str:
    return " ".join(f"{words} {i}" for i in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 spam and 12 ham messages, every third one far longer than WIDTH tokens, each with a sender."""
    root = tmp_path_factory.mktemp("mail")
    for i in range(12):
        length = 40 if i % 3 == 0 else 2
        write_eml(root / "spam" / f"{i}.eml", message(f"Prize {i}", _long("claim cash now", length),
                                                      From=f"s{i}@x.test"))
        write_eml(root / "ham" / f"{i}.eml", message(f"Notes {i}", _long("see you at the meeting", length),
                                                     From=f"h{i}@y.test"))
    return root


@pytest.fixture(scope="module", params=TRUNCATION)
def trained(request, corpus, tmp_path_factory):
    """(mode, checkpoint, the run's datamodule set up again from its config)."""
    from hydra.utils import instantiate

    from spamclf.pipeline import run

    out = tmp_path_factory.mktemp(f"run-{request.param}")
    cfg = compose_cfg([*TINY, "data=mail", f"data.path={corpus}", "data.mail_headers=[From]",
                       f"data.truncation={request.param}", "data.padding=fixed", f"data.max_length={WIDTH}",
                       "data.batch_size=4", "test=false"], out)
    run(cfg)
    data = instantiate(cfg.data)
    data.setup()
    return request.param, out / "checkpoints" / "last.ckpt", data


def test_the_checkpoint_cuts_texts_as_training_did(trained, corpus):
    from spamclf.inference import Classifier
    from spamclf.mail import iter_mail

    mode, ckpt, data = trained
    clf = Classifier.load(ckpt, precision="fp32")
    assert clf.tokenization["truncation"] == clf.truncation == mode and clf.width == WIDTH
    assert clf.tokenization["mail_headers"] == ["From"] and clf.info()["truncation"] == mode
    for split in SPLITS:
        ids, cut = clf.encode(data.frames[split]["text"].tolist())
        assert ids == data.datasets[split].ids, split
        assert sum(cut) == data.truncated[split]
    assert sum(data.truncated.values()) >= 8
    # prediction reads mail with the headers training put first, so it sees the very texts training saw
    trained_texts = {text for split in SPLITS for text in data.frames[split]["text"]}
    headers = clf.tokenization["mail_headers"]
    assert {text for _, text in iter_mail(corpus, headers)} == trained_texts


def test_onnx_cuts_and_answers_as_the_checkpoint(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from spamclf.export import export_onnx
    from spamclf.inference import Classifier
    from spamclf.onnx_classifier import OnnxClassifier

    mode, ckpt, data = trained
    torch_side = Classifier.load(ckpt, precision="fp32")
    graph = OnnxClassifier.load(export_onnx(torch_side, tmp_path / "onnx"), threads=1)
    assert graph.truncation == mode and graph.tokenization["mail_headers"] == ["From"]
    texts = [text for split in SPLITS for text in data.frames[split]["text"]]
    ours, theirs = torch_side.predict(texts), graph.predict(texts)
    assert any(p.truncated for p in ours)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.label, a.truncated) == (b.label, b.truncated)
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
