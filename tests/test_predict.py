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
