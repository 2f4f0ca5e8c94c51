"""The HTTP server: a real server process on a free loopback port, real HTTP requests, a clean stop."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from spamclf.explain import METHODS, explain
from spamclf.inference import Classifier
from spamclf.serve import MAX_EXPLAIN_TEXTS, PredictRequest
from tests.helpers import http_request, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = ["WINNER!! Claim your £1000 prize now, call 09061701461", "are we still on for lunch?", "",
            "Free entry in 2 a wkly comp to win FA Cup final tkts", "ok"]


@pytest.fixture(scope="module")
def server(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    base, proc = start_server(["--ckpt", str(ckpt), "--precision", "fp32", "--max-texts", "4",
                               "--max-body-bytes", "20000", "--batch-timeout", "0.05"],
                              tiny_run / "server.log", ROOT, wait_s=120)
    yield base, ckpt, proc
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(server):
    model = Classifier.load(server[1], precision="fp32")
    return {r.text: r.as_dict() for r in model.predict(MESSAGES + ["x " * 3000])}


def _same(answer, expected):
    assert answer["label"] == expected["label"] and answer["truncated"] == expected["truncated"]
    assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-5)


def test_single_and_batch_requests_answer_as_the_classifier(server, reference):
    base = server[0]
    for text in MESSAGES:
        status, answer = http_request(base + "/predict", {"text": text})
        assert status == 200 and answer["text"] == text
        _same(answer, reference[text])
    status, answer = http_request(base + "/predict", {"texts": MESSAGES[:4]})
    assert status == 200 and [a["text"] for a in answer["predictions"]] == MESSAGES[:4]
    for a in answer["predictions"]:
        _same(a, reference[a["text"]])
    status, answer = http_request(base + "/predict", {"text": "x " * 3000})
    assert status == 200 and answer["truncated"] is True


def test_concurrent_requests_are_batched_and_all_answered(server, reference):
    base = server[0]
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda t: http_request(base + "/predict", {"text": t}), texts))
    for text, (status, answer) in zip(texts, answers):
        assert status == 200 and answer["text"] == text
        _same(answer, reference[text])


@pytest.mark.parametrize("raw, status, needle", [
    (b"not json", 422, "JSON"),
    (b'{"message": "hi"}', 422, "message"),
    (b"{}", 422, "exactly one of"),
    (b'{"text": 5}', 422, "string"),
    (b'{"texts": ["a", 7]}', 422, "string"),
    (b'{"texts": []}', 422, "at least 1"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 422, "more than the server takes"),
    (b'{"text": "a", "texts": ["b"]}', 422, "exactly one of"),
    (json.dumps({"text": "y" * 30000}).encode(), 413, ""),
])
def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_goes_on(server, raw, status, needle):
    base = server[0]
    code, answer = http_request(base + "/predict", raw=raw)
    assert code == status
    assert needle in json.dumps(answer)
    assert "Traceback" not in json.dumps(answer)
    assert http_request(base + "/predict", {"text": "still there?"})[0] == 200


def test_explain_adds_each_texts_words_and_their_contributions(server, reference):
    base, ckpt, _ = server
    model = Classifier.load(ckpt, precision="fp32")
    status, answer = http_request(base + "/predict", {"text": MESSAGES[0], "explain": True})
    assert status == 200
    _same(answer, reference[MESSAGES[0]])
    [expected] = explain(model, [MESSAGES[0]])
    explanation = answer["explanation"]
    assert explanation["method"] == "occlusion" and explanation["positive_label"] == "spam"
    assert "".join(word for word, _ in explanation["words"]) == MESSAGES[0]
    assert [word for word, _ in explanation["words"]] == [word for word, _ in expected.words]
    assert [c for _, c in explanation["words"]] == pytest.approx([c for _, c in expected.words], abs=1e-4)
    texts = MESSAGES[:4]
    status, answer = http_request(base + "/predict", {"texts": texts, "explain": True, "method": "ig"})
    assert status == 200 and [a["text"] for a in answer["predictions"]] == texts
    for a in answer["predictions"]:
        _same(a, reference[a["text"]])
        assert a["explanation"]["method"] == "ig" and a["explanation"]["text"] == a["text"]
        assert "".join(word for word, _ in a["explanation"]["words"]) == a["text"]
        gap = a["explanation"]["margin"] - a["explanation"]["baseline"]
        assert a["explanation"]["total"] == pytest.approx(gap, rel=0.02, abs=1e-3)  # ig adds up


@pytest.mark.parametrize("extra", [{}, {"explain": False}])
def test_without_explain_no_explanation(server, extra):
    status, answer = http_request(server[0] + "/predict", {"texts": MESSAGES[:2], **extra})
    assert status == 200 and all("explanation" not in a for a in answer["predictions"])


@pytest.mark.parametrize("body, needle", [
    ({"texts": ["a"] * (MAX_EXPLAIN_TEXTS + 1), "explain": True}, f"at most {MAX_EXPLAIN_TEXTS} texts"),
    ({"texts": ["a"] * 5, "explain": True}, "more than the server takes"),  # --max-texts 4 holds too
    ({"text": "a", "method": "ig"}, 'add \\"explain\\": true'),
    ({"text": "a", "explain": True, "method": "shap"}, "occlusion"),
    ({"text": "a", "explain": "yes"}, "boolean"),
])
def test_bad_explain_requests_are_a_422_naming_the_problem(server, body, needle):
    status, answer = http_request(server[0] + "/predict", body)
    assert status == 422 and needle in json.dumps(answer)


def test_the_servers_methods_are_those_explain_has():
    assert set(PredictRequest.model_fields["method"].annotation.__args__[0].__args__) == set(METHODS)


def test_health_and_info(server):
    base, ckpt, _ = server
    assert http_request(base + "/health") == (200, "ok")
    status, info = http_request(base + "/info")
    model = info["model"]
    assert status == 200 and model["label_names"] == ["ham", "spam"] and model["model_name"] == "gpt2-tiny"
    assert model["padding"]["padding"] == "longest_train" and model["padding"]["pad_length"] == 120
    assert model["precision"]["requested"] == "fp32" and model["precision"]["used"] == "fp32"
    decision = model["decision"]  # the numbers prediction uses, not the configured rule
    assert decision["threshold"] == 0.5 and decision["rule"] == "fixed" and decision["positive_label"] == "spam"
    assert decision["temperature"] == 1.0 and decision["measured"]["split"] == "validation"
    assert model["sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()


def test_the_page_is_served_at_root_and_fetches_nothing_from_elsewhere(server):
    status, html = http_request(server[0] + "/")
    assert status == 200 and "<title>spamclf" in html and 'id="one-form"' in html
    assert "http://" not in html and "https://" not in html and "<link" not in html and " src=" not in html


def test_sigterm_stops_every_process(tiny_run):
    """On a server of its own: the one the other tests share goes on serving whatever order they run in."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    _, proc = start_server(["--ckpt", str(ckpt), "--precision", "fp32"], tiny_run / "sigterm-server.log", ROOT,
                           wait_s=120)
    try:
        session = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
        assert len(session) >= 2  # the server and its inference worker
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_sid(p.pid) == proc.pid for p in psutil.process_iter(["pid"])):
            time.sleep(0.5)
        assert not [p.pid for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
    finally:
        stop_server(proc)
        with contextlib.suppress(ProcessLookupError):  # whatever outlived the SIGTERM (the test has failed then)
            os.killpg(proc.pid, signal.SIGKILL)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spamclf.serve", "--ckpt", str(tmp_path / "none.ckpt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.ckpt'}: checkpoint not found; pass the .ckpt a training run wrote "
        f"(its checkpoints/ folder)"]
