"""A server people run for others: its API key and its Prometheus metrics, on real server processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spamclf.api_key import KEY_ENV, LITSERVE_KEY_ENV, REFUSAL, KeyCheck, exposure_warning, presented_key, read_api_key
from spamclf.errors import SpamclfError
from spamclf.metrics import FOLDER_PREFIX, remove_abandoned_folders
from tests.helpers import http_request, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key_9f2c41d07be3"
WRONG = {"X-API-Key": KEY[:-1] + "4"}
GUARDED = [("/predict", {"text": "hi"}), ("/info", None), ("/metrics", None)]


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(f"  {KEY}\n")
    log = tiny_run / "keyed-server.log"
    base, proc = start_server(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--precision", "fp32",
                               "--api-key-file", str(key_file), "--batch-timeout", "0.01"], log, ROOT, wait_s=120)
    yield base, log
    stop_server(proc)


@pytest.mark.parametrize("headers", [{}, WRONG, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer "}], ids=["missing", "wrong", "wrong-bearer",
                                                                         "basic", "empty-bearer"])
@pytest.mark.parametrize("path, body", GUARDED, ids=[p for p, _ in GUARDED])
def test_without_the_right_key_every_route_but_health_is_401(keyed, path, body, headers):
    status, answer = http_request(keyed[0] + path, body, headers=headers)
    assert status == 401 and answer == {"detail": REFUSAL}  # the same answer for a wrong key and a missing one
    assert http_request(keyed[0] + "/health") == (200, "ok")


@pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                                     {"Authorization": f"bearer {KEY}"}], ids=["x-api-key", "bearer", "lower-case"])
@pytest.mark.parametrize("path, body", GUARDED, ids=[p for p, _ in GUARDED])
def test_either_header_form_opens_every_route(keyed, path, body, headers):
    assert http_request(keyed[0] + path, body, headers=headers)[0] == 200


def test_the_page_loads_without_the_key_so_that_it_can_ask_for_it(keyed):
    status, html = http_request(keyed[0] + "/")
    assert status == 200 and 'id="key-form"' in html and "sessionStorage" in html


def test_docs_are_off_with_a_key(keyed):
    """FastAPI's /docs and /openapi.json cannot ask for a key, so a server with one does not serve them."""
    assert http_request(keyed[0] + "/docs")[0] == 404 and http_request(keyed[0] + "/openapi.json")[0] == 404


def test_the_key_is_never_shown(keyed):
    headers = {"X-API-Key": KEY}
    http_request(keyed[0] + "/predict", {"text": KEY}, headers=WRONG)
    info = http_request(keyed[0] + "/info", headers=headers)[1]
    metrics = http_request(keyed[0] + "/metrics", headers=headers)[1]
    assert info["model"]["label_names"] == ["ham", "spam"] and "spamclf_requests_total" in metrics
    for shown in (str(info), metrics, keyed[1].read_text()):
        assert KEY not in shown


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(base: str) -> dict[tuple[str, frozenset], float]:
    status, text = http_request(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    return _samples(text)


def test_metrics_count_requests_by_status_texts_and_batches_and_name_the_model(keyed):
    base, headers = keyed[0], {"X-API-Key": KEY}
    before = _scrape(base)
    for text in ("WINNER!! Claim your prize", "lunch?", ""):  # one at a time: each is a batch of its own
        assert http_request(base + "/predict", {"text": text}, headers=headers)[0] == 200
    assert http_request(base + "/predict", {"texts": ["a", "b", "c", "d"]}, headers=headers)[0] == 200
    assert http_request(base + "/predict", {"text": "no key"})[0] == 401
    assert http_request(base + "/predict", {"message": "bad"}, headers=headers)[0] == 422
    after = _scrape(base)

    def grew(name: str, **labels) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("spamclf_requests_total", route="/predict", status="200") == 4
    assert grew("spamclf_requests_total", route="/predict", status="401") == 1
    assert grew("spamclf_requests_total", route="/predict", status="422") == 1
    assert grew("spamclf_request_seconds_count", route="/predict") == 6
    assert grew("spamclf_texts_classified_total") == 7
    assert grew("spamclf_batch_texts_count") == 4 and grew("spamclf_batch_texts_sum") == 7
    assert grew("spamclf_batch_texts_bucket", le="1.0") == 3 and grew("spamclf_batch_texts_bucket", le="4.0") == 4
    model = http_request(base + "/info", headers=headers)[1]["model"]
    assert after[("spamclf_model_info", frozenset({"sha256": model["sha256"], "format": "ckpt"}.items()))] == 1


def test_every_interface_without_a_key_warns_in_one_line(tiny_run):
    log = tiny_run / "open-server.log"
    base, proc = start_server(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--precision", "fp32",
                               "--host", "0.0.0.0"], log, ROOT, wait_s=120)
    try:
        assert http_request(base + "/predict", {"text": "hi"})[0] == 200  # it serves, open to all
        assert http_request(base + "/metrics")[0] == 200
    finally:
        stop_server(proc)
    warnings = [line for line in log.read_text().splitlines() if "warning" in line.lower()]
    assert warnings == [exposure_warning("0.0.0.0", has_key=False)]
    assert "0.0.0.0" in warnings[0] and "--api-key-file" in warnings[0]


@pytest.mark.parametrize("host, has_key, warns", [("0.0.0.0", False, True), ("::", False, True),
                                                  ("0.0.0.0", True, False), ("127.0.0.1", False, False),
                                                  ("::1", False, False), ("localhost", False, False)])
def test_exposure_warning(host, has_key, warns):
    assert (exposure_warning(host, has_key) is not None) == warns


def test_the_key_comes_from_the_file_then_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("\n  from-the-file \n\n")
    assert read_api_key(str(key_file), {KEY_ENV: "from-env"}) == "from-the-file"
    assert read_api_key(None, {KEY_ENV: " from-env\n", LITSERVE_KEY_ENV: "litserve"}) == "from-env"
    assert read_api_key(None, {LITSERVE_KEY_ENV: "litserve"}) == "litserve"  # LitServe's own variable still counts
    assert read_api_key(None, {}) is None


@pytest.mark.parametrize("content, environ, needle", [
    ("\n \n", {}, "--api-key-file"),
    ("one\ntwo\n", {}, "more than one line"),
    ("with space", {}, "without spaces"),
    ("clé", {}, "printable ASCII"),
    (None, {KEY_ENV: "  "}, KEY_ENV),
])
def test_a_bad_key_is_one_line_naming_where_it_came_from(tmp_path, content, environ, needle):
    path = None
    if content is not None:
        path = tmp_path / "key"
        path.write_text(content)
    with pytest.raises(SpamclfError, match=needle) as error:
        read_api_key(None if path is None else str(path), environ)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("make", [lambda tmp: tmp / "absent", lambda tmp: tmp, lambda tmp: _empty(tmp)],
                         ids=["missing", "a-folder", "empty"])
def test_an_unusable_key_file_stops_the_server_in_one_line(tmp_path, make):
    key_file = make(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "spamclf.serve", "--ckpt", str(tmp_path / "none.ckpt"),
                           "--api-key-file", str(key_file)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: --api-key-file {key_file}") and "Traceback" not in proc.stderr


def _empty(folder: Path) -> Path:
    (folder / "empty-key").write_text("")
    return folder / "empty-key"


def test_key_check_reads_both_headers_and_leaves_health_open():
    check = KeyCheck("s3cret")
    assert check.allows("/predict", {"x-api-key": "s3cret"})
    assert check.allows("/info", {"authorization": "Bearer s3cret"})
    assert not check.allows("/predict", {}) and not check.allows("/predict", {"x-api-key": "S3CRET"})
    assert not check.allows("/predict", {"authorization": "s3cret"})  # no scheme is no key
    assert check.allows("/health", {}) and KeyCheck(None).allows("/predict", {})
    assert presented_key({"x-api-key": "a", "authorization": "Bearer b"}) == "a" and presented_key({}) == ""
    assert "s3cret" not in repr(vars(check))  # only the digest travels to LitServe's processes


def test_a_killed_servers_metrics_folder_is_removed_by_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"{FOLDER_PREFIX}{dead.stdout.strip()}-x1"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-x2"
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"0")
    other = tmp_path / "spamclf-metrics-notapid-x3"
    other.mkdir()
    remove_abandoned_folders(tmp_path)
    assert not abandoned.exists() and live.is_dir() and other.is_dir()


def test_no_explain_serves_without_the_explaining_worker_and_says_so(tiny_run):
    import psutil

    from spamclf.serve import OFF_REFUSAL

    base, proc = start_server(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--precision", "fp32",
                               "--no-explain", "--workers", "3"], tiny_run / "no-explain-server.log", ROOT,
                              wait_s=120)
    try:
        status, answer = http_request(base + "/predict", {"text": "hi"})
        assert status == 200 and answer["label"] in ("ham", "spam")
        assert http_request(base + "/predict", {"text": "hi", "explain": True}) == (400, {"detail": OFF_REFUSAL})
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 3  # the classifying workers only: no copy of the model for explanations
    finally:
        stop_server(proc)


@pytest.mark.parametrize("device, workers, cores, plan", [("cpu", None, 2, (2, 1)), ("cpu", None, 16, (2, 8)),
                                                          ("cpu", None, 1, (1, 1)), ("cpu", 3, 16, (3, 5)),
                                                          ("cuda", None, 16, (1, 0)), ("cuda:1", 2, 16, (2, 0))])
def test_the_worker_plan_shares_a_cpus_cores_between_the_workers(monkeypatch, device, workers, cores, plan):
    from spamclf.serve import worker_plan

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert worker_plan(device, workers) == plan
