"""The HTTP server: a real server process on a free loopback port, real HTTP requests, a clean stop."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from spamclf.inference import Classifier
from spamclf.pipeline import run
from tests.test_app import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = ["WINNER!! Claim your £1000 prize now, call 09061701461", "are we still on for lunch?", "",
            "Free entry in 2 a wkly comp to win FA Cup final tkts", "ok"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, raw=None, timeout=30):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null") if response.headers.get_content_type() == "application/json" else response.read().decode()
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload)
        except ValueError:
            return e.code, payload.decode(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    run(compose_cfg([*TINY, "test=false"], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    port = _free_port()
    log = open(out / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "spamclf.serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--precision", "fp32", "--max-texts", "4", "--max-body-bytes", "20000", "--batch-timeout", "0.05"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(out / 'server.log').read_text()[-2000:]}")
        try:
            if _request(base + "/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("server not healthy within 120 s")
    yield base, ckpt, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


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
        status, answer = _request(base + "/predict", {"text": text})
        assert status == 200 and answer["text"] == text
        _same(answer, reference[text])
    status, answer = _request(base + "/predict", {"texts": MESSAGES[:4]})
    assert status == 200 and [a["text"] for a in answer["predictions"]] == MESSAGES[:4]
    for a in answer["predictions"]:
        _same(a, reference[a["text"]])
    status, answer = _request(base + "/predict", {"text": "x " * 3000})
    assert status == 200 and answer["truncated"] is True


def test_concurrent_requests_are_batched_and_all_answered(server, reference):
    base = server[0]
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda t: _request(base + "/predict", {"text": t}), texts))
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
    code, answer = _request(base + "/predict", raw=raw)
    assert code == status
    assert needle in json.dumps(answer)
    assert "Traceback" not in json.dumps(answer)
    assert _request(base + "/predict", {"text": "still there?"})[0] == 200


def test_health_and_info(server):
    base, ckpt, _ = server
    assert _request(base + "/health") == (200, "ok")
    status, info = _request(base + "/info")
    model = info["model"]
    assert status == 200 and model["label_names"] == ["ham", "spam"] and model["model_name"] == "gpt2-tiny"
    assert model["padding"]["padding"] == "longest_train" and model["padding"]["pad_length"] == 120
    assert model["precision"]["requested"] == "fp32" and model["precision"]["used"] == "fp32"
    decision = model["decision"]  # the numbers prediction uses, not the configured rule
    assert decision["threshold"] == 0.5 and decision["rule"] == "fixed" and decision["positive_label"] == "spam"
    assert decision["temperature"] == 1.0 and decision["measured"]["split"] == "validation"
    assert model["sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()


def test_zz_sigterm_stops_every_process(server):
    _, _, proc = server
    session = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
    assert len(session) >= 2  # the server and its inference worker
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_sid(p.pid) == proc.pid for p in psutil.process_iter(["pid"])):
        time.sleep(0.5)
    assert not [p.pid for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spamclf.serve", "--ckpt", str(tmp_path / "none.ckpt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.ckpt'}: checkpoint not found; pass the .ckpt a training run wrote (its checkpoints/ folder)"]
