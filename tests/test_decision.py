"""Issue: a spam filter people can deploy. The operating point (threshold rules, temperature), the metrics at
it, the natural-rate set, header-less CSV files, and a run that carries the chosen threshold into prediction."""

import json

import pytest
import torch

from spamclf.datamodule import SpamDataModule
from spamclf.decision import Decision, load_decision, positive_index, threshold_rule
from spamclf.errors import DataError, InvalidOption, SpamclfError
from spamclf.evaluation import choose_threshold, decide, fit_temperature, operating_point
from spamclf.inference import Classifier, read_checkpoint
from spamclf.module import SpamClassifier
from spamclf.pipeline import run
from spamclf.reading import read_labelled_file
from spamclf.splits import NATURAL
from tests.helpers import TINY, compose_cfg


def test_threshold_spellings():
    assert threshold_rule(0.5) == ("fixed", 0.5)
    assert threshold_rule({"fixed": 0.7, "max_fpr": None, "min_precision": None, "max_f1": False}) == ("fixed", 0.7)
    assert threshold_rule({"fixed": 0.5, "max_fpr": 0.001}) == ("max_fpr", 0.001)
    assert threshold_rule({"min_precision": 0.99}) == ("min_precision", 0.99)
    assert threshold_rule({"max_f1": True}) == ("max_f1", 1.0)
    for bad, match in (({"max_fpr": 0.1, "max_f1": True}, "only one of"), ({"max_fpr": 2}, "between 0 and 1"),
                       ({"fpr": 0.1}, "threshold.fpr"), (True, "threshold=True"), ("high", "threshold='high'")):
        with pytest.raises(InvalidOption, match=match):
            threshold_rule(bad)


def test_positive_class():
    assert positive_index(["ham", "spam"]) == 1 and positive_index(["spam", "ham"]) == 0
    assert positive_index(["neg", "pos"]) == 1 and positive_index(["a", "b", "c"], "a") == 0
    with pytest.raises(InvalidOption, match="one of the labels ham, spam"):
        positive_index(["ham", "spam"], "junk")


def _rates(scores, positive, t):
    flagged = scores >= t
    tp, fp = int((flagged & positive).sum()), int((flagged & ~positive).sum())
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    return tp / n_pos, fp / n_neg, precision, 2 * tp / (2 * tp + fp + n_pos - tp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chosen_thresholds_are_the_best_that_meet_their_target(seed):
    g = torch.Generator().manual_seed(seed)
    positive = torch.rand(400, generator=g) < 0.4
    scores = torch.where(positive, torch.rand(400, generator=g) * 0.7 + 0.3,
                         torch.rand(400, generator=g) * 0.8).double()
    grid = [*torch.unique(scores).tolist(), 1.01]
    for rule, target, ok, merit in (
        ("max_fpr", 0.01, lambda r: r[1] <= 0.01, lambda r: r[0]),
        ("min_precision", 0.95, lambda r: r[2] >= 0.95, lambda r: r[0]),
        ("max_f1", 1.0, lambda r: True, lambda r: r[3]),
    ):
        t = choose_threshold(scores, positive, rule, target)
        chosen = _rates(scores, positive, t)
        assert ok(chosen), (rule, chosen)
        best = max(merit(_rates(scores, positive, c)) for c in grid if ok(_rates(scores, positive, c)))
        assert merit(chosen) == pytest.approx(best)
    # Unreachable targets flag nothing rather than break the promise.
    assert _rates(scores, positive, choose_threshold(scores, positive, "min_precision", 1.0))[2] == 1.0
    with pytest.raises(SpamclfError, match="both classes"):
        choose_threshold(scores, torch.ones(400, dtype=torch.bool), "max_fpr", 0.01)


def test_operating_point_counts():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.35, 0.65]])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])  # ham, ham, spam, spam, spam, ham
    spam = Decision(("ham", "spam"), positive=1)
    at_half = operating_point(probs, labels, spam, prevalence=0.1)
    assert at_half["false_positives"] == "2 of 3 ham" and at_half["fpr"] == pytest.approx(2 / 3)
    assert at_half["recall"] == pytest.approx(2 / 3) and at_half["precision"] == pytest.approx(0.5)
    hits, alarms = (2 / 3) * 0.1, (2 / 3) * 0.9
    assert at_half["precision_at_prevalence"] == pytest.approx(hits / (hits + alarms))
    assert at_half["confusion"] == [[1, 2], [1, 2]]
    strict = operating_point(probs, labels, spam.chosen(0.7, 1.0))
    assert strict["false_positives"] == "0 of 3 ham" and strict["recall"] == pytest.approx(2 / 3)
    assert decide(probs, spam.chosen(0.7, 1.0)).tolist() == [0, 0, 1, 0, 1, 0]
    # one message at a time, alike
    assert [spam.chosen(0.7, 1.0).label(p) for p in probs.tolist()] == [0, 0, 1, 0, 1, 0]
    three = operating_point(torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 2, 1]),
                            Decision(("a", "b", "c"), positive=2))
    assert three["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_temperature_scaling_undoes_overconfidence():
    g = torch.Generator().manual_seed(0)
    calibrated = torch.randn(2000, 2, generator=g)
    labels = torch.multinomial(calibrated.softmax(-1), 1, generator=g).squeeze(1)
    t = fit_temperature(calibrated * 4, labels)
    assert t == pytest.approx(4, rel=0.15)
    nll = torch.nn.functional.cross_entropy
    assert nll(calibrated * 4 / t, labels) < nll(calibrated * 4, labels)


def test_threshold_rules_need_two_classes():
    with pytest.raises(InvalidOption, match="rules need two classes"):
        SpamClassifier("gpt2-tiny", weights="random", label_names=["a", "b", "c"], threshold={"max_fpr": 0.1})
    SpamClassifier("gpt2-tiny", weights="random", label_names=["a", "b", "c"], threshold=0.5)


def test_natural_set_is_unseen_and_holds_what_balancing_left_out(sms_module):
    frames = sms_module.frames
    seen = set(frames["train"]["text"]) | set(frames["val"]["text"])
    natural = frames[NATURAL]
    assert not set(natural["text"]) & seen
    test_unseen = frames["test"][~frames["test"]["text"].isin(seen)]
    assert len(natural) > 10 * len(frames["test"])
    # by line: the natural set holds the file's exact messages, the test split the book's reading of them
    assert set(test_unseen["line"]) <= set(natural["line"])
    everything = read_labelled_file(sms_module.source_path())
    unused = len(everything) - sum(len(frames[s]) for s in ("train", "val", "test"))
    assert len(natural) <= len(frames["test"]) + unused
    counts = natural["label"].value_counts()
    assert counts["ham"] > 4000 and 0 < counts["spam"] <= 150  # every spam message went into the balanced splits
    assert sms_module.class_shares["spam"] == pytest.approx(747 / 5574)
    assert len(sms_module.datasets[NATURAL]) == len(natural)
    without = SpamDataModule(natural=False)
    without.setup()
    assert NATURAL not in without.frames and NATURAL not in without.datasets and len(without.datasets) == 3


def test_headerless_csv_by_position(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text('spam,"WIN a prize, now"\nham,"see you\nat five"\nham,ok\nspam,"FREE ""entry"""\n')
    frame = read_labelled_file(path, header=False)
    assert frame["label"].tolist() == ["spam", "ham", "ham", "spam"]
    assert frame["text"].tolist() == ["WIN a prize, now", "see you\nat five", "ok", 'FREE "entry"']
    swapped = tmp_path / "swapped.csv"
    swapped.write_text('"WIN a prize",spam\nhello,ham\n')
    assert read_labelled_file(swapped, header=False, text_column=0, label_column=1)["label"].tolist() == ["spam", "ham"]
    with pytest.raises(InvalidOption, match="text_column='body'.*column position"):
        read_labelled_file(path, header=False, text_column="body")
    with pytest.raises(DataError, match="no column 5"):
        read_labelled_file(path, header=False, text_column=5)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"ham,fine\nspam,caf\xe9 prize\n")
    with pytest.raises(DataError, match=r"latin.csv:2: bytes that are not valid utf-8"):
        read_labelled_file(latin, header=False)
    assert read_labelled_file(latin, header=False, encoding="latin-1")["text"].tolist()[1] == "café prize"


def test_bad_positive_label_is_one_line(tmp_path):
    dm = SpamDataModule(positive_label="junk")
    with pytest.raises(DataError, match=r"data\.positive_label='junk' is not valid; choose one of the labels "
                                        r"ham, spam"):
        dm.setup()


def test_a_run_chooses_its_threshold_on_validation_and_prediction_uses_it(tmp_path):
    cfg = compose_cfg([*TINY[:-1], "trainer.max_epochs=2", "model.threshold.max_fpr=0.01", "model.calibrate=true"],
                      tmp_path)
    summary = run(cfg)
    point = json.loads((tmp_path / "metrics.json").read_text())["operating_point"]
    assert point["rule"] == "max_fpr" and point["positive_label"] == "spam" and point["temperature"] > 0
    assert point["val"]["fpr"] <= 0.01  # the promise, kept on the split it was chosen on
    for split in ("val", "test", NATURAL):
        assert {"fpr", "recall", "precision", "false_positives", "auroc", "ece"} <= set(point[split])
        assert point[split]["threshold"] == point["threshold"]
    assert point[NATURAL]["count"] > 4000 and 0 < point[NATURAL]["precision_at_prevalence"] <= 1
    assert summary[NATURAL]["fpr"] == pytest.approx(point[NATURAL]["fpr"])
    for png in ("reliability.png", "roc_curve.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / png).is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"test/reliability_diagram", "test/roc_curve"} <= set(events.Tags()["images"])
    assert {"test/fpr", "natural/fpr", "test/ece"} <= set(events.Tags()["scalars"])

    model = Classifier.load(summary["best_checkpoint"], precision="fp32")
    assert model.decision.threshold == pytest.approx(point["threshold"])
    assert model.decision.temperature == pytest.approx(point["temperature"])
    assert model.decision.measured["split"] == "validation" and model.decision.measured["fpr"] <= 0.01
    last = load_decision(read_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))  # its own epoch's choice, same rule
    assert last.rule == "max_fpr" and last.measured["fpr"] <= 0.01 and last.temperature > 0
    texts = ["WINNER!! Claim your prize now, call 09061701461", "are we still on for lunch?",
             "Free entry in 2 a wkly comp", "Txt STOP to end", "Ok lar... Joking wif u oni..."]
    for r in model.predict(texts):
        assert (r.label == "spam") == (r.probabilities["spam"] >= model.decision.threshold)


def test_a_checkpoint_without_its_decision_entry_is_one_line(tiny_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    checkpoint = read_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    assert load_decision(checkpoint).positive_label == "spam"
    del checkpoint["decision"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    message = (f"{tmp_path / 'old.ckpt'}: no decision entry (the threshold and temperature to predict with); an older "
               f"spamclf wrote it: train it again with this one")
    with pytest.raises(SpamclfError) as caught:
        Classifier.load(tmp_path / "old.ckpt")
    assert str(caught.value) == message
    proc = subprocess.run([sys.executable, "-m", "spamclf.predict", "--ckpt", str(tmp_path / "old.ckpt"),
                           "--text", "hi"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"]
