"""The book's own code (the `llms-from-scratch` package, 1.0.19) as the reference: its ch. 6 split, its
SpamDataset's token ids and padding, its ch. 4 GPTModel's logits and its train_classifier_simple on our model."""

import logging

import pandas as pd
import pytest
import torch

pytest.importorskip("llms_from_scratch", reason="the book's code: pip install --no-deps -r requirements-book.txt")
from llms_from_scratch.ch04 import GPTModel  # noqa: E402
from llms_from_scratch.ch06 import (  # noqa: E402
    SpamDataset,
    create_balanced_dataset,
    random_split,
    train_classifier_simple,
)

from spamclf.datamodule import SpamDataModule  # noqa: E402
from spamclf.errors import InvalidOption  # noqa: E402
from spamclf.gpt2 import GPT2, GPTConfig  # noqa: E402
from spamclf.reading import SMS_FILE, read_labelled_file, read_sms_as_the_book  # noqa: E402
from spamclf.splits import NATURAL, SPLIT_FILES, spanned_lines  # noqa: E402
from spamclf.tokenizer import asset_path, gpt2_encoding  # noqa: E402

SMS = asset_path(SMS_FILE)
BOOK_FILES = {"train": "train.csv", "val": "validation.csv", "test": "test.csv"}
TINY = {"vocab_size": 50257, "context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": True}


def book_splits(folder):
    """The book's chapter 6 data preparation, as its script runs it, writing its three CSV files to `folder`."""
    df = pd.read_csv(SMS, sep="\t", header=None, names=["Label", "Text"])
    balanced_df = create_balanced_dataset(df)
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    train_df, validation_df, test_df = random_split(balanced_df, 0.7, 0.1)
    frames = {"train": train_df, "val": validation_df, "test": test_df}
    for split, frame in frames.items():
        frame.to_csv(folder / BOOK_FILES[split], index=None)
    return frames


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    folder = tmp_path_factory.mktemp("book")
    return folder, book_splits(folder)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ours")
    dm = SpamDataModule(output_dir=str(folder))  # the defaults: the book's recipe
    dm.setup()
    return folder, dm


# ------------------------------------------------------------------------------------------------- split
def test_split_files_equal_the_books_row_for_row(book, ours):
    _, reference = book
    folder, dm = ours
    assert dm.protocol == "book"
    for split, name in BOOK_FILES.items():
        written = pd.read_csv(folder / SPLIT_FILES[split], keep_default_na=False)
        assert len(written) == len(reference[split]) == {"train": 1045, "val": 149, "test": 300}[split]
        assert written["text"].tolist() == reference[split]["Text"].tolist(), name
        assert written["label"].map({"ham": 0, "spam": 1}).tolist() == reference[split]["Label"].tolist(), name


def test_the_exact_reader_is_one_key_away_and_gives_another_split(book):
    _, reference = book
    exact = SpamDataModule(reader="exact")
    exact.setup()
    assert exact.protocol == "exact" and len(read_labelled_file(SMS)) == 5574
    shared = {s: len(set(exact.frames[s]["text"]) & set(reference[s]["Text"])) for s in BOOK_FILES}
    assert all(n < len(reference[s]) for s, n in shared.items()), shared  # different ham drawn: not the book's split
    with pytest.raises(InvalidOption, match=r"reader='pandas' is not valid; choose one of book, exact"):
        SpamDataModule(reader="pandas")


def test_the_books_reading_merges_lines_5082_to_5084_and_strips_quotes():
    rows = read_sms_as_the_book(SMS)
    exact = read_labelled_file(SMS).set_index("line")
    assert len(rows) == 5572 and rows["label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    merged = rows[rows["span"] > 1]
    assert merged[["line", "span", "label"]].values.tolist() == [[5082, 3, "ham"]]
    parts = merged["text"].iloc[0].split("\n")
    assert parts[0] == exact.loc[5082, "text"].lstrip('"')  # the opening quote is the one that runs on
    assert parts[1] == "ham\t" + exact.loc[5083, "text"] and parts[2] == "ham\t" + exact.loc[5084, "text"].lstrip('"')
    assert spanned_lines(rows) == list(range(1, 5575))  # every line of the file, each in one row, in order
    single = rows[rows["span"] == 1].set_index("line")
    differs = single["text"] != exact.loc[single.index, "text"]
    assert differs.sum() > 0 and (exact.loc[differs[differs].index, "text"].str.count('"') >= 2).all()


def test_natural_set_holds_every_unseen_exact_message(ours):
    _, dm = ours
    exact = read_labelled_file(SMS)
    rows = read_sms_as_the_book(SMS)
    natural = dm.frames[NATURAL]
    by_line = exact.set_index("line")
    assert natural["text"].tolist() == by_line.loc[natural["line"], "text"].tolist()  # exact messages, as in the file
    train_val = pd.concat([dm.frames["train"], dm.frames["val"]])
    taken = set(spanned_lines(train_val))
    assert not set(natural["line"]) & taken
    book_text = dict(zip(rows.loc[rows["span"] == 1, "line"], rows.loc[rows["span"] == 1, "text"]))
    seen = set(train_val["text"]) | set(by_line.loc[sorted(taken), "text"])
    assert not any(t in seen or book_text.get(line) in seen for line, t in zip(natural["line"], natural["text"]))
    # complete: every message outside train/validation whose text (either reading) is unseen is in it
    expected = {line for line, t in zip(exact["line"], exact["text"])
                if line not in taken and t not in seen and book_text.get(line) not in seen}
    assert set(natural["line"]) == expected and len(natural) == len(expected)
    test_lines = spanned_lines(dm.frames["test"])
    assert natural["line"].tolist()[:10] == [x for x in test_lines if x in expected][:10]  # test split first
    assert natural["label"].value_counts()["ham"] > 4000


def test_own_files_and_dedupe_are_read_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    own = tmp_path / "own.tsv"
    own.write_text("".join(f'{"spam" if i % 3 else "ham"}\t"quoted {i}\n' for i in range(60)))
    dm = SpamDataModule(path=str(own), reader="book")
    dm.setup()
    assert dm.protocol == "exact" and sum(len(dm.frames[s]) for s in BOOK_FILES) == 40  # 20 ham + 20 spam
    assert dm.frames["train"]["text"].str.startswith('"').all()  # no quote processing: each line one message
    assert any("data.reader=book applies to the SMS Spam Collection" in r.getMessage() for r in caplog.records)
    deduped = SpamDataModule(dedupe=True)
    assert deduped.protocol == "exact"


# ------------------------------------------------------------------------------------- tokens, padding
def test_token_ids_and_padding_equal_the_books_spam_dataset(book, ours):
    folder, _ = book
    _, dm = ours
    tokenizer = gpt2_encoding()  # tiktoken.get_encoding("gpt2") would download the same two files
    train_dataset = SpamDataset(csv_file=folder / "train.csv", max_length=None, tokenizer=tokenizer)
    assert train_dataset.max_length == dm.pad_length == 120
    for split in BOOK_FILES:
        dataset = train_dataset if split == "train" else SpamDataset(
            csv_file=folder / BOOK_FILES[split], max_length=train_dataset.max_length, tokenizer=tokenizer)
        reference = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.stack([dataset[i][1] for i in range(len(dataset))])
        batch = dm.collator(split)([dm.datasets[split][i] for i in range(len(dm.datasets[split]))])
        assert torch.equal(batch["input_ids"], reference), split
        assert torch.equal(batch["labels"], labels), split


# ------------------------------------------------------------------------------------------------ model
def random_book_model(seed=0):
    torch.manual_seed(seed)
    model = GPTModel(TINY).eval()
    with torch.no_grad():  # LayerNorms off ones/zeros, so a mis-mapped norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith((".scale", ".shift")):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("scale") else 0.0)
    return model


def ours_from_book(book_model, swap_key_value=False):
    """Our GPT2 holding the book model's weights: W_query/W_key/W_value stacked into qkv, LayerNorm
    scale/shift as weight/bias, and the book's own (untied) out_head."""
    cfg = GPTConfig(vocab_size=TINY["vocab_size"], context_length=TINY["context_length"], emb_dim=TINY["emb_dim"],
                    n_layers=TINY["n_layers"], n_heads=TINY["n_heads"], drop_rate=TINY["drop_rate"],
                    qkv_bias=TINY["qkv_bias"])
    model = GPT2.random(cfg)
    model.out_head = torch.nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)  # the book's head is its own tensor
    src = book_model.state_dict()
    state = {k: src[k] for k in ("tok_emb.weight", "pos_emb.weight", "out_head.weight")}
    state |= {"final_norm.weight": src["final_norm.scale"], "final_norm.bias": src["final_norm.shift"]}
    for i in range(cfg.n_layers):
        b = f"trf_blocks.{i}."
        order = ("W_query", "W_value", "W_key") if swap_key_value else ("W_query", "W_key", "W_value")
        for kind in ("weight", "bias"):
            state[f"{b}att.qkv.{kind}"] = torch.cat([src[f"{b}att.{w}.{kind}"] for w in order])
            state[f"{b}att.out_proj.{kind}"] = src[f"{b}att.out_proj.{kind}"]
            state[f"{b}ff.layers.0.{kind}"] = src[f"{b}ff.layers.0.{kind}"]
            state[f"{b}ff.layers.2.{kind}"] = src[f"{b}ff.layers.2.{kind}"]
        for n in ("norm1", "norm2"):
            state[f"{b}{n}.weight"], state[f"{b}{n}.bias"] = src[f"{b}{n}.scale"], src[f"{b}{n}.shift"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def padded_messages(dm, split="test", n=6):
    return dm.collator(split)([dm.datasets[split][i] for i in range(n)])["input_ids"]


def test_our_gpt2_gives_the_book_models_logits(ours):
    _, dm = ours
    book_model = random_book_model()
    ids = padded_messages(dm)  # 6 SMS messages padded to 120 with <|endoftext|>, as the book feeds them
    with torch.no_grad():
        reference = book_model(ids)
        torch.testing.assert_close(ours_from_book(book_model)(ids), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_from_book(book_model)(ids)[:, -1, :], reference[:, -1, :], atol=1e-5, rtol=1e-5)
        swapped = ours_from_book(book_model, swap_key_value=True)(ids)
    assert not torch.allclose(swapped, reference, atol=1e-3)  # the comparison sees a mis-mapped attention


def test_the_books_training_loop_runs_unchanged_on_our_model(book):
    folder, _ = book
    tokenizer = gpt2_encoding()
    pd.read_csv(folder / "train.csv")[:16].to_csv(folder / "train16.csv", index=None)
    pd.read_csv(folder / "validation.csv")[:8].to_csv(folder / "val8.csv", index=None)
    train_dataset = SpamDataset(csv_file=folder / "train16.csv", max_length=None, tokenizer=tokenizer)
    val_dataset = SpamDataset(csv_file=folder / "val8.csv", max_length=train_dataset.max_length, tokenizer=tokenizer)

    def finetune(model):
        """The book's ch. 6 snippets, verbatim but for the tiny size: head swap, freezing, AdamW, the loop."""
        loader = torch.utils.data.DataLoader
        train_loader = loader(train_dataset, batch_size=8, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(123))
        val_loader = loader(val_dataset, batch_size=8, shuffle=False, drop_last=False)
        for param in model.parameters():
            param.requires_grad = False
        torch.manual_seed(123)
        num_classes = 2
        model.out_head = torch.nn.Linear(in_features=TINY["emb_dim"], out_features=num_classes)
        for param in model.trf_blocks[-1].parameters():
            param.requires_grad = True
        for param in model.final_norm.parameters():
            param.requires_grad = True
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
        result = train_classifier_simple(model, train_loader, val_loader, optimizer, torch.device("cpu"),
                                         num_epochs=2, eval_freq=1, eval_iter=1)
        return result, model

    book_model = random_book_model(seed=1)
    our_model = ours_from_book(book_model)
    before = our_model.trf_blocks[-1].att.qkv.weight.detach().clone()
    (book_losses, book_val, book_tacc, book_vacc, book_seen), book_model = finetune(book_model)
    (our_losses, our_val, our_tacc, our_vacc, our_seen), our_model = finetune(our_model)
    assert len(our_losses) == 4 and our_seen == book_seen == 32  # 2 batches of 8, 2 epochs
    assert our_losses == pytest.approx(book_losses, rel=1e-5, abs=1e-6)
    assert our_val == pytest.approx(book_val, rel=1e-5, abs=1e-6)
    assert (our_tacc, our_vacc) == (book_tacc, book_vacc)
    trained = our_model.trf_blocks[-1].att.qkv.weight.detach()
    assert not torch.equal(trained, before)  # the loop trained our last block
    book_qkv = torch.cat([getattr(book_model.trf_blocks[-1].att, w).weight.detach()
                          for w in ("W_query", "W_key", "W_value")])
    torch.testing.assert_close(trained, book_qkv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(our_model.out_head.weight, book_model.out_head.weight, atol=1e-6, rtol=1e-5)
    assert not our_model.trf_blocks[0].att.qkv.weight.requires_grad  # frozen as the book freezes
