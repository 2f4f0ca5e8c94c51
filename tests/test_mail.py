"""Mail as stored (.eml, mbox, Maildir) into texts: every fixture is built here with the standard library."""

from __future__ import annotations

import base64
import logging
import mailbox
import tracemalloc
from email.message import EmailMessage
from pathlib import Path

import pandas as pd
import pytest

from spamclf.errors import SpamclfError
from spamclf.mail import html_to_text, is_mail_source, iter_mail, read_mail_folder
from tests.helpers import message, write_eml

PRIZE_HTML = """<html><head><title>Prize</title><style>p {color: red}</style>
<script>track("x"); document.write("hidden")</script></head>
<body><h1>Congratulations, Jos&eacute;!</h1><p>You&#39;ve won &pound;1,000 &amp; a free&nbsp;cruise.</p>
<p>Click <a href="http://x.test/?a=1&amp;b=2">here</a> &mdash; today only.</p>
<table><tr><td>No fees</td><td>No catch</td></tr></table><ul><li>Fast</li><li>Free</li></ul></body></html>"""
PRIZE_TEXT = ("Congratulations, José!\nYou've won £1,000 & a free cruise.\nClick here — today only.\nNo fees No catch\n"
              "Fast\nFree")


def write_mbox(path: Path, messages: list[EmailMessage]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.mbox(path)
    for msg in messages:
        box.add(msg)
    box.close()
    return path


def texts(path, headers=()) -> list[str]:
    return [text for _, text in iter_mail(path, headers)]


def test_plain_text_message_is_subject_blank_line_body(tmp_path):
    eml = write_eml(tmp_path / "a.eml", message("Lunch?", "Meet at 12:30.\r\nBring the notes.  \n"))
    assert list(iter_mail(eml)) == [("a.eml", "Lunch?\n\nMeet at 12:30.\nBring the notes.")]


def test_crlf_file_and_subject_only_message(tmp_path):
    write_eml(tmp_path / "a.eml", b"Subject: Line\r\n endings\r\n\r\nline one\r\n\r\nline three\r\n")
    write_eml(tmp_path / "b.eml", b"Subject: Only a subject\r\n\r\n\r\n")
    assert texts(tmp_path) == ["Line endings\n\nline one\n\nline three", "Only a subject"]


def test_html_only_message_becomes_visible_text(tmp_path):
    msg = message("You won!")
    msg.set_content(PRIZE_HTML, subtype="html")
    assert texts(write_eml(tmp_path / "a.eml", msg)) == ["You won!\n\n" + PRIZE_TEXT]


def test_html_text_drops_script_and_style_and_decodes_entities():
    text = html_to_text(PRIZE_HTML)
    assert text == PRIZE_TEXT
    assert "track" not in text and "color" not in text and "Prize" not in text and "&" + "amp;" not in text


def test_multipart_alternative_prefers_plain_text(tmp_path):
    msg = message("Offer", "Plain version of the offer.")
    msg.add_alternative("<p>HTML <b>version</b></p>", subtype="html")
    assert texts(write_eml(tmp_path / "a.eml", msg)) == ["Offer\n\nPlain version of the offer."]


def test_empty_plain_part_falls_back_to_html(tmp_path):
    msg = message("Offer", "   \n")
    msg.add_alternative("<p>Only the HTML has text</p>", subtype="html")
    assert texts(write_eml(tmp_path / "a.eml", msg)) == ["Offer\n\nOnly the HTML has text"]


def test_iso_8859_1_subject_and_body(tmp_path):
    raw = (b"Subject: =?iso-8859-1?q?Caf=E9_cr=E8me?=\nContent-Type: text/plain; charset=iso-8859-1\n"
           b"Content-Transfer-Encoding: 8bit\n\nD\xe9j\xe0 vu \xe0 c\xf4t\xe9 du gar\xe7on.\n")
    assert texts(write_eml(tmp_path / "a.eml", raw)) == ["Café crème\n\nDéjà vu à côté du garçon."]


def test_windows_1252_quotes_and_euro(tmp_path):
    raw = (b"Subject: Price\nContent-Type: text/plain; charset=windows-1252\n\n"
           b"\x93Only\x94 \x8010 \x96 na\xefve\n")
    assert texts(write_eml(tmp_path / "a.eml", raw)) == ["Price\n\n\u201cOnly\u201d \u20ac10 \u2013 naïve"]


def test_quoted_printable_body(tmp_path):
    raw = (b"Subject: QP\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
           b"A long line that is wrapped with a soft=\n break, caf=C3=A9 and 1+1=3D2.\n")
    assert texts(write_eml(tmp_path / "a.eml", raw)) == [
        "QP\n\nA long line that is wrapped with a soft break, café and 1+1=2."]


def test_base64_body(tmp_path):
    msg = message("B64")
    msg.set_content("Encoded body: ñandú\nsecond line\n", cte="base64")
    raw = msg.as_bytes()
    assert b"second line" not in raw and base64.b64encode(b"Encoded").decode()[:8].encode() in raw
    assert texts(write_eml(tmp_path / "a.eml", raw)) == ["B64\n\nEncoded body: ñandú\nsecond line"]


def test_unknown_charset_falls_back_to_utf8_then_windows_1252(tmp_path):
    utf8 = (b"Subject: =?x-no-such-charset?q?A_caf=C3=A9?=\n"
            b"Content-Type: text/plain; charset=x-no-such-charset\n\ncaf\xc3\xa9\n")
    cp1252 = b"Subject: B\nContent-Type: text/plain; charset=x-no-such-charset\n\ncaf\xe9 \x80\n"
    write_eml(tmp_path / "a.eml", utf8)
    write_eml(tmp_path / "b.eml", cp1252)
    assert texts(tmp_path) == ["A café\n\ncafé", "B\n\ncafé €"]


def test_attachments_are_skipped(tmp_path):
    msg = message("Invoice", "See the attached file.")
    msg.add_attachment("SECRET ATTACHED TEXT", filename="notes.txt")
    msg.add_attachment(b"%PDF-1.4 binary", maintype="application", subtype="pdf", filename="invoice.pdf")
    assert texts(write_eml(tmp_path / "a.eml", msg)) == ["Invoice\n\nSee the attached file."]


def test_headers_option_prepends_header_lines(tmp_path):
    msg = message("Hi", "Body.", From="Ana <ana@example.com>", To="bo@example.com")
    eml = write_eml(tmp_path / "a.eml", msg)
    assert texts(eml, headers=("From", "Reply-To", "to")) == [
        "From: Ana <ana@example.com>\nto: bo@example.com\nHi\n\nBody."]
    assert texts(eml, headers="From") == ["From: Ana <ana@example.com>\nHi\n\nBody."]
    assert texts(eml) == ["Hi\n\nBody."]


def test_broken_and_empty_messages_are_named_in_one_warning(tmp_path, caplog):
    write_eml(tmp_path / "a.eml", b"\x00\xff\xfe\x89PNG\r\n\x1a\n random bytes")
    write_eml(tmp_path / "b.eml", message("Good", "Readable."))
    write_eml(tmp_path / "c.eml", b"")
    only_attachment = message(None)
    only_attachment.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream", filename="x.bin")
    write_mbox(tmp_path / "box", [message("Fine", "Also readable."), only_attachment])
    with caplog.at_level(logging.WARNING, logger="spamclf.mail"):
        pairs = list(iter_mail(tmp_path))
    assert pairs == [("b.eml", "Good\n\nReadable."), ("box#1", "Fine\n\nAlso readable.")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 3 messages skipped (unreadable or empty): a.eml, box#2, c.eml"]


def test_warning_names_only_the_first_few(tmp_path, caplog):
    for i in range(7):
        write_eml(tmp_path / f"{i}.eml", b"")
    write_eml(tmp_path / "ok.eml", message("Ok", "Fine."))
    with caplog.at_level(logging.WARNING, logger="spamclf.mail"):
        assert texts(tmp_path) == ["Ok\n\nFine."]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 7 messages skipped (unreadable or empty): 0.eml, 1.eml, 2.eml, 3.eml, 4.eml, ..."]


def test_mbox_with_several_messages_detected_by_content(tmp_path):
    box = write_mbox(tmp_path / "archive.txt", [
        message("One", "First."),
        message("Two", "From here on, the body starts with From.\nSecond line."),
        message("Three", "Third."),
    ])
    assert b"\n>From here on" in box.read_bytes()  # mailbox escapes it; the reader takes the ">" off
    assert list(iter_mail(box)) == [
        ("archive.txt#1", "One\n\nFirst."),
        ("archive.txt#2", "Two\n\nFrom here on, the body starts with From.\nSecond line."),
        ("archive.txt#3", "Three\n\nThird."),
    ]


def test_maildir_messages_in_cur_and_new(tmp_path):
    box = mailbox.Maildir(tmp_path / "inbox")
    box.add(message("Seen", "Already read."))
    key = box.add(message("Unseen", "Not read yet."))
    seen = mailbox.MaildirMessage(box[key])
    seen.set_subdir("cur")
    box[key] = seen
    names = dict((text, name) for name, text in iter_mail(tmp_path / "inbox"))
    assert sorted(names) == ["Seen\n\nAlready read.", "Unseen\n\nNot read yet."]
    assert names["Unseen\n\nNot read yet."].startswith("cur/") and names["Seen\n\nAlready read."].startswith("new/")
    assert [name.split("/")[0] for name, _ in iter_mail(tmp_path)] == ["inbox", "inbox"]


def test_maildir_subfolders_and_tmp_are_not_read(tmp_path):
    box = mailbox.Maildir(tmp_path / "inbox")
    box.add(message("Inbox", "Kept."))
    box.add_folder("Junk").add(message("Junk", "Other folder."))
    write_eml(tmp_path / "inbox" / "tmp" / "partial", message("Partial", "Being delivered."))
    assert texts(tmp_path / "inbox") == ["Inbox\n\nKept."]


def test_labels_come_from_subfolder_names_in_any_mix(tmp_path):
    write_eml(tmp_path / "spam" / "a.eml", message("Win", "Claim your prize."))
    write_mbox(tmp_path / "spam" / "box", [message("Cash", "Fast cash."), message("Loan", "Cheap loan.")])
    (tmp_path / "ham").mkdir()
    mailbox.Maildir(tmp_path / "ham" / "inbox").add(message("Hi", "See you."))
    write_eml(tmp_path / "newsletter" / "2024" / "june.EML", message("News", "June issue."))
    (tmp_path / "README.md").write_text("not a class")
    frame = read_mail_folder(tmp_path)
    assert list(frame.columns) == ["text", "label"]
    assert frame.values.tolist() == [
        ["Hi\n\nSee you.", "ham"],
        ["News\n\nJune issue.", "newsletter"],
        ["Win\n\nClaim your prize.", "spam"],
        ["Cash\n\nFast cash.", "spam"],
        ["Loan\n\nCheap loan.", "spam"],
    ]


def test_read_mail_folder_passes_headers_and_warns_with_class_path(tmp_path, caplog):
    write_eml(tmp_path / "spam" / "a.eml", message("Win", "Prize.", From="x@spam.test"))
    write_eml(tmp_path / "spam" / "broken.eml", b"")
    write_eml(tmp_path / "ham" / "b.eml", message("Hi", "Lunch.", From="ana@example.com"))
    with caplog.at_level(logging.WARNING, logger="spamclf.mail"):
        frame = read_mail_folder(tmp_path, headers=("From",))
    assert frame["text"].tolist() == ["From: ana@example.com\nHi\n\nLunch.", "From: x@spam.test\nWin\n\nPrize."]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 1 message skipped (unreadable or empty): spam/broken.eml"]


def test_is_mail_source(tmp_path):
    eml = write_eml(tmp_path / "classes" / "spam" / "a.eml", message("S", "Spam."))
    box = write_mbox(tmp_path / "box", [message("M", "Mbox.")])
    mailbox.Maildir(tmp_path / "md").add(message("D", "Maildir."))
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "data.csv").write_text("text,label\nhi,ham\n")
    sms = tmp_path / "messages.txt"
    sms.write_text("From your bank: verify now\nFree entry in a weekly draw\n")
    assert [is_mail_source(p) for p in (eml, box, tmp_path / "md", tmp_path / "classes")] == [True] * 4
    assert [is_mail_source(p) for p in (tmp_path / "csvs", tmp_path / "csvs" / "data.csv", sms, tmp_path / "no")] == [
        False] * 4


def one_line_error(call, *args) -> str:
    with pytest.raises(SpamclfError) as caught:
        call(*args)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_read_mail_folder_errors(tmp_path):
    assert one_line_error(read_mail_folder, tmp_path / "no") == (
        f"{tmp_path / 'no'}: not found; give a folder with one subfolder per class (e.g. spam/ and ham/) holding "
        f".eml files, mbox files or Maildirs")
    eml = write_eml(tmp_path / "a.eml", message("A", "B"))
    assert one_line_error(read_mail_folder, eml).startswith(f"{eml}: is a file, not a folder; give a folder with")
    assert one_line_error(read_mail_folder, tmp_path).startswith(f"{tmp_path}: no class subfolders; give it one ")
    (tmp_path / "ham").mkdir()
    (tmp_path / "ham" / "notes.txt").write_text("not mail")
    assert one_line_error(read_mail_folder, tmp_path).startswith(f"{tmp_path}: no readable messages in its subfolders")
    write_eml(tmp_path / "spam" / "a.eml", message("A", "B"))
    assert one_line_error(read_mail_folder, tmp_path) == (
        f"{tmp_path}: only the class 'spam' holds mail; add a subfolder of mail for each other class")
    mailbox.Maildir(tmp_path / "md").add(message("A", "B"))
    assert one_line_error(read_mail_folder, tmp_path / "md").startswith(f"{tmp_path / 'md'}: is a Maildir, not a ")


def test_iter_mail_errors(tmp_path):
    assert one_line_error(iter_mail, tmp_path / "no").startswith(f"{tmp_path / 'no'}: not found; give an .eml file")
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    assert one_line_error(iter_mail, csv).startswith(f"{csv}: neither an .eml file nor an mbox file")
    empty = tmp_path / "empty"
    empty.mkdir()
    pairs = iter_mail(empty)
    assert one_line_error(list, pairs).startswith(f"{empty}: no readable messages")


def peak_memory_reading(box: Path) -> tuple[int, int]:
    """(messages, peak bytes allocated) while iterating `box` without keeping its texts."""
    next(iter_mail(box))  # the email package's lazy imports and caches, outside the measure
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_mail(box))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_large_mbox_is_streamed_one_message_at_a_time(tmp_path):
    body = (b"spam " * 200 + b"\n") * 60
    box = tmp_path / "box"
    box.write_bytes(b"".join(b"From sender@example.com Sat Jan  1 00:00:00 2000\nSubject: M%d\n\n%s\n" % (i, body)
                             for i in range(200)))
    size = box.stat().st_size
    count, peak = peak_memory_reading(box)
    assert count == 200 and size > 12_000_000
    # About 1 MB at the peak: one message in its forms (bytes, text, lines) and parsed headers awaiting collection.
    assert peak < size / 8, f"{peak} bytes allocated at the peak reading a {size}-byte mbox"


# -------------------------------------------------------------------------------------------- training on mail
def mail_classes(root: Path) -> Path:
    """spam/ with .eml files and an mbox, ham/ with .eml files and one unreadable file: 6 spam, 6 ham."""
    for i in range(4):
        write_eml(root / "spam" / f"s{i}.eml", message(f"WIN prize {i}", "Claim your cash now!", From=f"s{i}@x.test"))
        write_eml(root / "ham" / f"h{i}.eml", message(f"Notes {i}", "See you at the meeting.", From=f"h{i}@y.test"))
    write_mbox(root / "spam" / "archive", [message("Free cruise", "Reply YES", From="z@x.test"),
                                           message("Cheap pills", "Order today", From="p@x.test")])
    write_eml(root / "ham" / "old" / "a.eml", message("Lunch?", "At noon", From="a@y.test"))
    write_eml(root / "ham" / "old" / "b.eml", message("Re: Lunch?", "Sure", From="b@y.test"))
    write_eml(root / "ham" / "broken.eml", b"\x00\x01 not mail at all")
    return root


def test_a_mail_folder_trains_with_the_chosen_headers_first(tmp_path):
    from hydra.utils import instantiate

    from tests.helpers import compose_cfg

    root = mail_classes(tmp_path / "mail")
    cfg = compose_cfg(["data=mail", f"data.path={root}", "data.mail_headers=[From]", "data.splits=[0.5,0.25,0.25]"],
                      tmp_path / "run")
    assert cfg.data.balance is False and cfg.data.truncation == "head"
    dm = instantiate(cfg.data)
    dm.setup()
    rows = pd.concat([dm.frames[split] for split in ("train", "val", "test")])
    assert dm.label_names == ["ham", "spam"] and sorted(rows["label"]) == ["ham"] * 6 + ["spam"] * 6
    assert sorted(rows["text"]) == sorted(text for _, text in iter_mail(root, ("From",)))
    assert "From: z@x.test\nFree cruise\n\nReply YES" in set(rows["text"])
    described = dm.describe()
    assert described["mail_headers"] == ["From"] and described["truncation"] == "head"
    assert (tmp_path / "run" / "train.csv").is_file()


def test_skipped_messages_are_reported_by_rank_zero_only(tmp_path, caplog, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from spamclf.reading import read_mail_data

    root = mail_classes(tmp_path / "mail")
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert len(read_mail_data(root)) == 12
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    read_mail_data(root)
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"{root}: 1 message skipped (unreadable or empty): ham/broken.eml"]


def test_mail_data_mistakes_are_one_line_errors(tmp_path):
    from spamclf.datamodule import SpamDataModule

    root = mail_classes(tmp_path / "mail")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no mail here")
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,ham\nb,spam\n")
    cases = [
        (SpamDataModule(path=str(tmp_path / "plain")), "a folder without mail; point data.path at a CSV"),
        (SpamDataModule(path=str(root / "spam" / "s0.eml")), "is a file, not a folder; give a folder with one"),
        (SpamDataModule(path=str(root / "spam")), "no class subfolders"),
        (SpamDataModule(path=str(csv), mail_headers=["From"]), "data.mail_headers applies to a folder of mail"),
        (SpamDataModule(path=str(root), labels=["spam", "other"]),
         f"{root / 'ham'}: label 'ham' is not in data.labels"),
    ]
    for module, expected in cases:
        error = one_line_error(module.setup)
        assert expected in error, error
    with pytest.raises(SpamclfError, match="mail_headers="):
        SpamDataModule(path=str(root), mail_headers="From")
