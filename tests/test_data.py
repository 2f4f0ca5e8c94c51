import hashlib
import http.server
import json
import logging
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from spamclf.datamodule import SpamDataModule
from spamclf.errors import DataError, InvalidOption, SpamclfError
from spamclf.loaders import LengthBucketBatchSampler
from spamclf.reading import SMS_FILE, download_sms, read_labelled_file
from spamclf.splits import SPLIT_FILES, SPLITS
from spamclf.tokenizer import (
    ENCODER_JSON_SHA256,
    PAD_ID,
    VOCAB_BPE_SHA256,
    asset_path,
    encode_texts,
    gpt2_encoding,
)

SMS = asset_path(SMS_FILE)


def test_embedded_collection_is_the_official_file_with_every_message():
    assert (hashlib.sha256(Path(SMS).read_bytes()).hexdigest()
            == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d")
    frame = read_labelled_file(SMS)
    assert len(frame) == 5574  # pandas' default quoting merges lines into 5,572
    assert frame["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert frame["text"].str.contains('"').any()


def test_default_split_is_the_books(sms_module):
    sizes = {s: len(sms_module.frames[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1045, "val": 149, "test": 300}
    balanced = sum((sms_module.frames[s]["label"] == "spam").sum() for s in ("train", "val", "test"))
    assert balanced == 747 and sum(sizes.values()) == 2 * 747
    rows = [set(sms_module.frames[s]["line"]) for s in ("train", "val", "test")]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert sms_module.label_names == ["ham", "spam"] and sms_module.num_classes == 2
    assert sms_module.pad_length == 120  # the longest training message, as the book reports


def test_overlap_is_counted_and_dedupe_removes_it(sms_module):
    train = set(sms_module.frames["train"]["text"])
    expected = {s: int(sms_module.frames[s]["text"].isin(train).sum()) for s in ("val", "test")}
    assert sms_module.overlap == expected and expected["test"] > 0
    deduped = SpamDataModule(dedupe=True)
    deduped.setup()
    assert deduped.overlap == {"val": 0, "test": 0}
    texts = [t for s in ("train", "val", "test") for t in deduped.frames[s]["text"]]
    assert len(texts) == len(set(texts))


def test_same_seed_same_split_other_seed_other_split(sms_module):
    again = SpamDataModule(seed=123)
    again.setup()
    other = SpamDataModule(seed=7)
    other.setup()
    assert list(again.frames["test"]["line"]) == list(sms_module.frames["test"]["line"])
    assert list(other.frames["test"]["line"]) != list(sms_module.frames["test"]["line"])
    assert len(other.frames["train"]) == 1045


def test_ids_equal_tiktoken_gpt2(tmp_path, monkeypatch):
    import tiktoken
    from tiktoken.load import read_file_cached  # noqa: F401 - the cache layout below is tiktoken's

    # Put the packaged files where tiktoken's own loader caches its downloads, so get_encoding("gpt2")
    # runs offline through tiktoken's code and hash checks.
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(asset_path(name), tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("gpt2")
    texts = read_labelled_file(SMS)["text"].tolist()[:500] + ["Hello, world!", "  spaces\tand\nnewlines ",
                                                              "£1000 émoji 🎉"]
    assert encode_texts(texts) == [reference.encode(t) for t in texts]
    assert gpt2_encoding().encode("<|endoftext|>", allowed_special="all") == [PAD_ID]
    assert hashlib.sha256(Path(asset_path("vocab.bpe")).read_bytes()).hexdigest() == VOCAB_BPE_SHA256
    assert hashlib.sha256(Path(asset_path("encoder.json")).read_bytes()).hexdigest() == ENCODER_JSON_SHA256


def test_user_text_cannot_inject_the_special_token():
    ids = encode_texts(["<|endoftext|>", ""])
    assert PAD_ID not in ids[0] and ids[1] == [PAD_ID]


def _first(loader):
    return next(iter(loader))


def test_longest_train_pads_every_split_to_the_train_maximum(sms_module):
    for loader in (sms_module.train_dataloader(), sms_module.val_dataloader(), sms_module.test_dataloader()):
        batch = _first(loader)
        assert batch["input_ids"].shape == (8, 120) and batch["input_ids"].dtype == torch.long
        assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
        lengths = batch["lengths"]
        for row, n in zip(batch["input_ids"], lengths):
            assert (row[n:] == PAD_ID).all() and n >= 1
    test_lengths = [len(x) for x in sms_module.datasets["test"].ids]
    assert max(test_lengths) <= 120  # truncated to the training width


@pytest.mark.parametrize(
    "kwargs, width",
    [({"padding": "fixed", "max_length": 50}, 50), ({"padding": "model"}, 1024),
     ({"padding": "model", "context_length": 256}, 256)],
)
def test_fixed_width_padding(kwargs, width):
    dm = SpamDataModule(**kwargs)
    dm.setup()
    assert _first(dm.train_dataloader())["input_ids"].shape == (8, width)
    assert max(dm.datasets["train"].lengths) <= width


def test_batch_padding_pads_to_the_batch_longest():
    dm = SpamDataModule(padding="batch")
    dm.setup()
    for i, batch in enumerate(dm.train_dataloader()):
        assert batch["input_ids"].shape[1] == int(batch["lengths"].max())
        if i == 5:
            break


def test_no_padding_needs_batch_size_one():
    dm = SpamDataModule(padding="none", batch_size=1)
    dm.setup()
    batch = _first(dm.train_dataloader())
    assert batch["input_ids"].shape == (1, int(batch["lengths"][0]))
    with pytest.raises(InvalidOption, match="batch_size=1"):
        SpamDataModule(padding="none", batch_size=8)


def test_bad_padding_names_the_choices():
    with pytest.raises(InvalidOption, match="padding='wide'.*longest_train, batch, fixed, model, none"):
        SpamDataModule(padding="wide")
    with pytest.raises(InvalidOption, match="max_length"):
        SpamDataModule(padding="fixed")


def test_bucketed_batches_cover_every_row_once_and_cut_padding(sms_module):
    lengths = sms_module.datasets["train"].lengths
    sampler = LengthBucketBatchSampler(lengths, 8, drop_last=False, seed=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(lengths)))
    assert epoch0 != epoch1
    padded = sum(max(lengths[i] for i in b) * len(b) for b in epoch0)
    unsorted = [list(range(len(lengths)))[i : i + 8] for i in range(0, len(lengths), 8)]
    assert padded < 0.8 * sum(max(lengths[i] for i in b) * len(b) for b in unsorted)
    assert len(LengthBucketBatchSampler(lengths, 8, drop_last=True, seed=1)) == len(lengths) // 8


def test_context_truncation_warns_once_with_the_count(caplog):
    caplog.set_level(logging.WARNING)
    dm = SpamDataModule(context_length=16, padding="batch")
    dm.setup()
    warnings = [r.getMessage() for r in caplog.records if "longer than the context" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].split()[0].isdigit() and int(warnings[0].split()[0]) > 100
    assert max(max(ds.lengths) for ds in dm.datasets.values()) == 16


def test_splits_are_written_for_audit(tmp_path, sms_module):
    sms_module.write_splits(tmp_path)
    import pandas as pd

    for split, name in SPLIT_FILES.items():
        frame = pd.read_csv(tmp_path / name, keep_default_na=False)
        assert list(frame.columns) == ["text", "label"]
        assert frame["text"].tolist() == sms_module.frames[split]["text"].tolist()


# ------------------------------------------------------------------------------------------ other data
def _write(path: Path, text: str, encoding="utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_multiclass_csv_with_quotes_and_custom_columns(tmp_path):
    rows = ["review,stars"] + [f'"text {i}, with ""quotes""",{["bad", "good", "meh"][i % 3]}' for i in range(90)]
    path = _write(tmp_path / "reviews.csv", "\n".join(rows))
    dm = SpamDataModule(path=path, text_column="review", label_column="stars", balance=False)
    dm.setup()
    assert dm.label_names == ["bad", "good", "meh"] and dm.num_classes == 3
    assert sum(len(dm.frames[s]) for s in SPLITS) == 90
    assert dm.frames["train"]["text"].iloc[0].startswith("text ") and '"quotes"' in dm.frames["train"]["text"].iloc[0]
    ordered = SpamDataModule(path=path, text_column="review", label_column="stars", labels=["meh", "good", "bad"])
    ordered.setup()
    assert ordered.label_names == ["meh", "good", "bad"]
    assert set(_first(ordered.train_dataloader())["labels"].tolist()) <= {0, 1, 2}


def test_jsonl_and_headerless_tsv(tmp_path):
    lines = [json.dumps({"text": f"message {i}", "label": "a" if i % 2 else "b"}) for i in range(40)]
    dm = SpamDataModule(path=_write(tmp_path / "d.jsonl", "\n".join(lines)))
    dm.setup()
    assert dm.label_names == ["a", "b"] and len(dm.frames["train"]) == 28
    tsv = SpamDataModule(path=_write(tmp_path / "d.tsv",
                                     "\n".join(f"{'x' if i % 2 else 'y'}\tsms {i}" for i in range(40))))
    tsv.setup()
    assert tsv.label_names == ["x", "y"]


def test_balance_undersamples_every_class_to_the_smallest(tmp_path):
    rows = ["text,label"] + [f"t{i},{'a' if i < 60 else 'b' if i < 90 else 'c'}" for i in range(100)]
    dm = SpamDataModule(path=_write(tmp_path / "d.csv", "\n".join(rows)))
    dm.setup()
    counts = {k: 0 for k in "abc"}
    for split in SPLITS:
        for label, n in dm.frames[split]["label"].value_counts().items():
            counts[label] += n
    assert counts == {"a": 10, "b": 10, "c": 10}


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.tsv", None, r"missing\.tsv: file not found"),
        ("empty.tsv", "", r"empty\.tsv: file is empty"),
        ("notab.tsv", "ham\thello\nspam no tab here\n", r"notab\.tsv:2: no tab between label and text"),
        ("nolabel.tsv", "ham\thello\n\tnobody\n", r"nolabel\.tsv:2: empty label"),
        ("cols.csv", "body,kind\nhi,ham\n", r"cols\.csv: missing column\(s\) 'text', 'label'.*data\.text_column"),
        ("bad.jsonl", '{"text": "a", "label": "b"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        ("one.tsv", "ham\ta\nham\tb\n", r"only the label\(s\) \['ham'\]"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        SpamDataModule(path=str(path), output_dir=str(tmp_path / "out")).setup()
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_non_utf8_names_the_line_and_the_option(tmp_path):
    path = _write(tmp_path / "latin.tsv", "ham\tfine\nspam\tcaf\xe9 prize\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"latin\.tsv:2: .*data\.encoding"):
        SpamDataModule(path=path).setup()
    dm = SpamDataModule(path=path, encoding="latin-1", balance=False, splits=(0.5, 0.0, 0.5))
    with pytest.raises(DataError, match="val split would be empty"):
        dm.setup()


def test_unknown_and_absent_labels(tmp_path):
    path = _write(tmp_path / "d.tsv", "ham\ta\nspam\tb\neggs\tc\n")
    with pytest.raises(DataError, match=r"d\.tsv:3: label 'eggs' is not in data\.labels"):
        SpamDataModule(path=path, labels=["ham", "spam"]).setup()
    with pytest.raises(DataError, match=r"\['ham2'\] listed in data\.labels have no examples"):
        SpamDataModule(path=path, labels=["ham", "spam", "eggs", "ham2"]).setup()


def test_empty_split_and_empty_texts(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    path = _write(tmp_path / "d.tsv", "ham\ta\nspam\tb\nham\t   \nspam\t\n")
    with pytest.raises(DataError, match="split would be empty"):
        SpamDataModule(path=path).setup()
    assert any("dropped 2 row(s) with empty text" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------- download
def _uci_zip(tmp_path: Path, content: bytes | None = None) -> Path:
    archive = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(SMS_FILE, content if content is not None else Path(SMS).read_bytes())
        zf.writestr("readme", "SMS Spam Collection v.1")
    return archive


def test_download_from_a_file_url_verifies_and_caches(tmp_path):
    archive = _uci_zip(tmp_path)
    cache = tmp_path / "cache"
    dm = SpamDataModule(download=True, download_url=archive.as_uri(), cache_dir=str(cache))
    dm.setup()
    assert (cache / SMS_FILE).read_bytes() == Path(SMS).read_bytes()
    assert len(dm.frames["train"]) == 1045
    archive.unlink()  # cached now: no second download
    assert download_sms(archive.as_uri(), cache) == cache / SMS_FILE


def test_download_over_loopback_http_and_a_tampered_file(tmp_path):
    _uci_zip(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    _uci_zip(bad_dir, b"ham\ttampered\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        got = download_sms(f"{base}/sms+spam+collection.zip", tmp_path / "c1")
        assert got.read_bytes() == Path(SMS).read_bytes()
        with pytest.raises(DataError, match="sha256"):
            download_sms(f"{base}/bad/sms+spam+collection.zip", tmp_path / "c2")
        assert not (tmp_path / "c2" / SMS_FILE).exists()
        with pytest.raises(DataError, match="cannot download"):
            download_sms(f"{base}/missing.zip", tmp_path / "c3")
    finally:
        server.shutdown()


def test_errors_are_value_errors():
    assert issubclass(DataError, SpamclfError) and issubclass(SpamclfError, ValueError)


def test_pad_to_multiple_of_rounds_batch_widths_within_the_context():
    dm = SpamDataModule(padding="batch", pad_to_multiple_of=8)
    dm.setup()
    for i, batch in enumerate(dm.train_dataloader()):
        width, longest = batch["input_ids"].shape[1], int(batch["lengths"].max())
        assert width % 8 == 0 and longest <= width < longest + 8
        if i == 10:
            break
    capped = SpamDataModule(padding="batch", pad_to_multiple_of=64, context_length=100)
    capped.setup()
    assert max(b["input_ids"].shape[1] for b in capped.val_dataloader()) <= 100
    with pytest.raises(InvalidOption, match="pad_to_multiple_of"):
        SpamDataModule(pad_to_multiple_of=0)


# -------------------------------------------------------------------------------------------- natural-set cap
def test_natural_max_samples_the_natural_set_down_with_the_seed(sms_module, caplog):
    caplog.set_level(logging.INFO)
    full = sms_module.frames["natural"]
    capped = SpamDataModule(natural_max=100)
    capped.setup()
    natural = capped.frames["natural"]
    assert len(natural) == 100 and len(full) > 4000
    assert f"natural set: 100 of {len(full)} messages (data.natural_max)" in caplog.text
    # a sample of the same set, in its order; the training splits do not change
    positions = [full.index[full["line"] == line][0] for line in natural["line"]]
    assert positions == sorted(positions) and natural["text"].tolist() == full["text"].iloc[positions].tolist()
    assert capped.frames["train"].equals(sms_module.frames["train"])
    again = SpamDataModule(natural_max=100)
    again.setup()
    assert again.frames["natural"].equals(natural)
    other = SpamDataModule(natural_max=100, seed=7)
    other.setup()
    assert set(other.frames["natural"]["line"]) != set(natural["line"])


def test_natural_max_above_the_set_keeps_it_whole_and_must_be_positive(sms_module):
    whole = SpamDataModule(natural_max=10**6)
    whole.setup()
    assert whole.frames["natural"].equals(sms_module.frames["natural"])
    for bad in (0, -5, 2.5):
        with pytest.raises(InvalidOption, match=r"^natural_max=.* is not valid; choose a positive number"):
            SpamDataModule(natural_max=bad)


# ------------------------------------------------------------------------------------- natural set = test split
def _loaded_splits(dm) -> list[str]:
    loaders = dm.test_dataloader()
    return [loader.collate_fn.split for loader in (loaders if isinstance(loaders, list) else [loaders])]


def test_a_natural_set_equal_to_the_test_split_is_scored_once(tmp_path, caplog_info):
    rows = ["text,label"] + [f"message {i},{'spam' if i % 3 == 0 else 'ham'}" for i in range(90)]
    dm = SpamDataModule(path=_write(tmp_path / "d.csv", "\n".join(rows)), balance=False)
    dm.setup()
    assert dm.frames["natural"][["text", "label"]].equals(dm.frames["test"][["text", "label"]].reset_index(drop=True))
    assert dm.natural_is_test and dm.scored_with() == {}  # by default only the test split is evaluated
    dm.evaluate_on((*SPLITS, "natural"))
    assert dm.scored_with() == {"natural": "test"} and dm.prepared().scored_with == {"natural": "test"}
    assert _loaded_splits(dm) == ["train", "val", "test"]
    assert caplog_info.text.count("natural set = test split: scored once") == 1
    dm.evaluate_on(("natural",))  # asked for alone, it has a loader of its own
    assert dm.scored_with() == {} and _loaded_splits(dm) == ["natural"]


def test_a_natural_set_other_than_the_test_split_keeps_its_own_pass(sms_module, tmp_path):
    sms_module.evaluate_on((*SPLITS, "natural"))
    try:  # balanced: the natural set holds the ham balancing left out
        assert not sms_module.natural_is_test and sms_module.prepared().scored_with == {}
        assert _loaded_splits(sms_module) == ["train", "val", "test", "natural"]
    finally:
        sms_module.evaluate_on(("test",))
    rows = ["text,label"] + [f"message {i},{'spam' if i % 3 == 0 else 'ham'}" for i in range(90)]
    capped = SpamDataModule(path=_write(tmp_path / "d.csv", "\n".join(rows)), balance=False, natural_max=5)
    capped.setup()  # natural_max cuts it below the test split
    assert len(capped.frames["natural"]) == 5 and not capped.natural_is_test
    repeated = SpamDataModule(path=_write(tmp_path / "r.csv", "\n".join(rows + rows[1:])), balance=False)
    repeated.setup()  # test texts also in train are not in the natural set
    assert len(repeated.frames["natural"]) < len(repeated.frames["test"]) and not repeated.natural_is_test


def test_padding_slack_bounds_what_a_batch_computes_over_its_real_positions():
    from spamclf.batching import length_batches

    widths = [5, 60, 7, 30, 6, 31, 8, 29, 120, 9, 6, 33, 5, 7, 28, 61]  # a server's batch: arbitrary lengths
    plain = length_batches(widths, tokens=2048)
    bounded = length_batches(widths, tokens=2048, padding_slack=1.3)
    assert len(plain) == 1 and sorted(r for b in bounded for r in b) == list(range(len(widths)))
    for batch in bounded:
        real = sum(widths[r] for r in batch)
        assert len(batch) * max(widths[r] for r in batch) <= 1.3 * real or len(batch) == 1
    assert sum(len(b) * max(widths[r] for r in b) for b in bounded) < 0.5 * len(widths) * max(widths)
    assert length_batches([10] * 16, tokens=2048, padding_slack=1.3) == [list(range(16))]  # equal widths: one batch
