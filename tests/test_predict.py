"""The prediction CLI's explanations and mail input, on the session's trained gpt2-tiny run."""

import json
import mailbox
from email.message import EmailMessage

import pytest

from spamclf.predict import main


def _run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_explain_adds_each_words_contribution(tiny_run, capsys):
    text = "Claim your free prize now"
    code, [row], _ = _run(capsys, "--ckpt", tiny_run / "checkpoints" / "last.ckpt", "--text", text, "--explain")
    assert code == 0
    explanation = row["explanation"]
    assert "".join(word for word, _ in explanation["words"]) == text
    assert explanation["method"] == "occlusion" and explanation["positive_label"] == "spam"
    assert len(explanation["words"]) == len(text.split())


@pytest.mark.parametrize(("argv", "message"), [
    (["--onnx", "model.onnx", "--text", "hi", "--explain"], "--explain needs the torch network"),
    (["--ckpt", "x.ckpt", "--text", "hi", "--explain-method", "ig"], "--explain-method needs --explain"),
])
def test_explain_mistakes_are_one_line(capsys, argv, message):
    code, rows, err = _run(capsys, *argv)
    assert code == 2 and not rows
    assert err.strip().count("\n") == 0 and message in err


def test_an_mbox_is_classified_message_by_message(tiny_run, tmp_path, capsys):
    box = mailbox.mbox(tmp_path / "inbox")
    for subject, body in (("Prize", "You WON a free cruise, call now"), ("Lunch", "see you at noon")):
        message = EmailMessage()
        message["Subject"], message["From"] = subject, "a@example.com"
        message.set_content(body)
        box.add(message)
    box.flush()
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    code, rows, _ = _run(capsys, "--ckpt", ckpt, "--input", tmp_path / "inbox")
    assert code == 0 and [row["source"] for row in rows] == ["inbox#1", "inbox#2"]
    # a message is its Subject, a blank line and its body: the same text classified directly
    code, [direct], _ = _run(capsys, "--ckpt", ckpt, "--text", "Prize\n\nYou WON a free cruise, call now")
    assert rows[0]["text"] == direct["text"] and rows[0]["probability"] == direct["probability"]


# ------------------------------------------------------------------------------ --input checked before the load
@pytest.fixture
def load_spy(monkeypatch):
    """Records every model load; a load in these tests would be a failure of the check that precedes it."""
    import spamclf

    loads = []
    monkeypatch.setattr(spamclf, "load", lambda path, **options: loads.append(path) or pytest.fail("model loaded"))
    return loads


def _folder_without_mail(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("buy milk\n")
    return tmp_path / "notes"


def _csv_without_text(tmp_path):
    (tmp_path / "m.csv").write_text("body\nhello\n")
    return tmp_path / "m.csv"


def _mail_without_messages(tmp_path):
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "a.eml").write_bytes(b"\x00\x01 not a header\n")
    return tmp_path / "box"


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing.txt", "missing.txt: input file not found; fix --input"),
    (_folder_without_mail, "notes: a folder without mail (.eml files, mbox files or Maildirs); give mail"),
    (_csv_without_text, "m.csv:1: no column 'text' in the header ['body']; set --text-column"),
    (_mail_without_messages, "box: no readable messages (.eml files, mbox files or Maildirs)"),
])
def test_a_bad_input_fails_in_one_line_before_the_model_loads(tmp_path, capsys, load_spy, make, message):
    code, rows, err = _run(capsys, "--ckpt", tmp_path / "never-read.ckpt", "--input", make(tmp_path),
                           "--output", tmp_path / "out.jsonl")
    assert code == 2 and not rows and load_spy == []
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unreadable_input_or_unknown_encoding_is_one_line(tmp_path, capsys, load_spy, monkeypatch):
    import spamclf.predict

    path = tmp_path / "m.txt"
    path.write_text("hello\n")
    code, _, err = _run(capsys, "--ckpt", "x.ckpt", "--input", path, "--encoding", "klingon")
    assert code == 2 and err.strip() == "error: --encoding klingon: no such text encoding; use e.g. utf-8 or latin-1"

    def denied(*args, **kwargs):  # what open() raises on a file without read permission (root reads any file)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(spamclf.predict, "open", denied, raising=False)
    code, _, err = _run(capsys, "--ckpt", "x.ckpt", "--input", path)
    assert code == 2
    assert err.strip() == f"error: {path}: cannot be read (Permission denied); fix its permissions or --input"
    assert load_spy == []
