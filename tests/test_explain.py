"""Per-word explanations (spamclf.explain): a known answer on a network trained so that one keyword decides the
label, integrated gradients' completeness, words that join back to the text, occlusion against a plain forward."""

from __future__ import annotations

import math
import random

import pytest
import torch

from spamclf.decision import Decision
from spamclf.errors import InvalidOption
from spamclf.explain import explain, integrated_gradients, occlusion, word_contributions, word_groups
from spamclf.heads import Readout, classifier_network
from spamclf.inference import Classifier
from spamclf.precision import resolve
from spamclf.tokenizer import PAD_ID, encode_texts, gpt2_encoding

KEYWORD = " zorbex"
FILLER = [" the", " cat", " dog", " sun", " blue", " red", " run", " big", " small", " tree", " car", " house",
          " day", " night", " fish", " bird"]
PAD_LENGTH = 16  # fixed padding, pooling=last: the book's layout (the classifier reads a padding position)
READOUT = Readout("last", pooled_only=True, causal=True)


def synthetic_message(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
    if positive:
        words.insert(rng.randint(0, len(words)), KEYWORD)
    return "".join(words)


def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = [rng.random() < 0.5 for _ in range(size)]
    ids = encode_texts([synthetic_message(rng, positive) for positive in labels])
    rows = torch.full((size, PAD_LENGTH), PAD_ID, dtype=torch.long)
    for i, row in enumerate(ids):
        rows[i, : len(row)] = torch.tensor(row)
    return rows, torch.tensor([len(row) for row in ids]), torch.tensor(labels, dtype=torch.long)


@pytest.fixture(scope="module")
def keyword_network():
    """gpt2-tiny from random weights, every layer trained with plain AdamW until "zorbex" decides the label."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = classifier_network("gpt2-tiny", num_classes=2, weights="random", trainable_layers="all")
    # fused: one pass over the 3.2M embedding weights a step, not several (~7x faster a step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and lose a lot on a busy CPU
    try:
        model.train()
        for _ in range(300):
            input_ids, lengths, labels = batch(rng, 32)
            loss = torch.nn.functional.cross_entropy(READOUT.logits(model, input_ids, lengths), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    input_ids, lengths, labels = batch(rng, 256)
    with torch.no_grad():
        accuracy = (READOUT.logits(model, input_ids, lengths).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.98, f"the network did not learn the keyword rule ({accuracy:.3f})"
    return model


@pytest.fixture(scope="module")
def keyword_classifier(keyword_network):
    decision = Decision.configured(("ham", "spam"), "spam")
    cpu = torch.device("cpu")
    return Classifier(keyword_network, READOUT, decision, {"pad_length": PAD_LENGTH}, resolve("fp32", cpu), cpu)


POSITIVES = [" zorbex the cat run big tree", " the dog zorbex sun", " red fish day night bird car zorbex"]


@pytest.mark.parametrize("method", ["ig", "occlusion"])
def test_the_keyword_that_decides_the_label_comes_first(keyword_classifier, method):
    for explanation in explain(keyword_classifier, POSITIVES, method=method):
        assert explanation.margin > 0, "the message should be flagged"
        ranked = explanation.ranked()
        assert ranked[0][0] == KEYWORD, ranked
        assert ranked[0][1] > 0


@pytest.mark.parametrize("pad_length", [PAD_LENGTH, None])
@pytest.mark.parametrize("text", [*POSITIVES, " the cat run big tree", " night"])
def test_integrated_gradients_add_up_to_the_log_odds_difference(keyword_network, text, pad_length):
    """Completeness: the sum matches margin - baseline up to the quadrature's error; 64 Gauss-Legendre points
    keep it within 2% of the difference here (typically far less), and 1e-3 absolute for near-zero ones."""
    ids = encode_texts([text])[0]
    found = integrated_gradients(keyword_network, READOUT, ids, 1, pad_length, steps=64)
    difference = found.margin - found.baseline
    assert abs(float(found.values.sum()) - difference) <= 0.02 * abs(difference) + 1e-3, (found, difference)


TEXTS = ["Hello, world!", "  leading spaces and  double  spaces", "café naïve résumé", "日本語のテキスト",
         "emoji 😀👍🏽 mid-text", "tabs\tand\nnewlines\n\n", " zorbex", "don't stop", "a", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_words_join_back_to_the_text(text):
    groups = word_groups(encode_texts([text])[0])
    assert "".join(word for word, _ in groups) == text
    positions = [i for _, group in groups for i in group]
    assert positions == list(range(len(positions)))


def test_a_word_starts_at_a_space_or_punctuation():
    assert [word for word, _ in word_groups(encode_texts(["Hello, zorbex world!"])[0])] == ["Hello", ",", " zorbex",
                                                                                            " world", "!"]


def test_explanations_read_as_the_message_and_its_kept_part(keyword_classifier):
    texts = ["café 😀 zorbex\n the  cat", "", " zorbex " * 20 + "日本"]
    for explanation, text in zip(explain(keyword_classifier, texts, method="occlusion"), texts):
        kept = gpt2_encoding().decode(encode_texts([text])[0][:PAD_LENGTH]) if text else ""
        assert explanation.text == "".join(word for word, _ in explanation.words) == kept
        assert explanation.truncated == (len(encode_texts([text])[0]) > PAD_LENGTH)
        assert text.startswith(explanation.text)
        assert explanation.total == pytest.approx(sum(c for _, c in explanation.words), abs=1e-5)


def test_explanations_measure_what_the_classifier_predicts(keyword_classifier):
    """The explained log-odds are the classifier's own: its probability's logit (fp32, temperature 1)."""
    for method in ("ig", "occlusion"):
        [explanation] = explain(keyword_classifier, [POSITIVES[1]], method=method)
        [prediction] = keyword_classifier.predict([POSITIVES[1]])
        spam = prediction.probabilities["spam"]
        assert explanation.margin == pytest.approx(math.log(spam / (1 - spam)), abs=1e-3)


def forward_log_odds(model, ids: list[int], pad_length: int | None) -> float:
    """The positive log-odds from GPT2.forward's logits at the padded sequence's last position (pooling=last)."""
    row = torch.full((1, max(pad_length or 0, len(ids))), PAD_ID, dtype=torch.long)
    row[0, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        logits = model(row)[0, -1]
    return float(logits[1] - logits[0])


@pytest.mark.parametrize("pad_length", [PAD_LENGTH, None])
def test_occlusion_of_a_one_token_message_is_the_change_from_removing_it(keyword_network, pad_length):
    [ids] = encode_texts(["cat"])
    assert len(ids) == 1
    found = occlusion(keyword_network, READOUT, ids, 1, pad_length)
    removed = forward_log_odds(keyword_network, encode_texts([""])[0], pad_length)  # the empty message
    expected = forward_log_odds(keyword_network, ids, pad_length) - removed
    assert float(found.values[0]) == pytest.approx(expected, abs=1e-4)
    assert found.baseline == pytest.approx(removed, abs=1e-4)


def test_occlusion_is_each_tokens_exact_leave_one_out(keyword_network):
    ids = encode_texts([POSITIVES[0]])[0]
    found = occlusion(keyword_network, READOUT, ids, 1, PAD_LENGTH, batch_tokens=3 * PAD_LENGTH)  # several batches
    full = forward_log_odds(keyword_network, ids, PAD_LENGTH)
    for i in range(len(ids)):
        without = forward_log_odds(keyword_network, ids[:i] + [PAD_ID] + ids[i + 1:], PAD_LENGTH)
        assert float(found.values[i]) == pytest.approx(full - without, abs=1e-4)


def test_occlusion_takes_a_words_tokens_out_together(keyword_network):
    """A word's contribution is the change from occluding all its tokens at once: " zorbex" is three tokens that
    stand in for each other, so that one at a time can miss it."""
    ids = encode_texts([" the dog zorbex sun"])[0]
    found = word_contributions(keyword_network, READOUT, ids, 1, "occlusion", PAD_LENGTH)
    full = forward_log_odds(keyword_network, ids, PAD_LENGTH)
    for (_, contribution), (_, group) in zip(found.words, word_groups(ids)):
        occluded = [PAD_ID if i in group else t for i, t in enumerate(ids)]
        assert contribution == pytest.approx(full - forward_log_odds(keyword_network, occluded, PAD_LENGTH), abs=1e-4)
    assert [word for word, _ in found.words] == [" the", " dog", " zorbex", " sun"]


def test_an_unknown_method_names_the_choices(keyword_network):
    with pytest.raises(InvalidOption, match="method='shap' is not valid; choose one of ig, occlusion"):
        word_contributions(keyword_network, READOUT, [1, 2], 1, method="shap")
