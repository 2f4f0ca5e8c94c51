"""Why a message was flagged: each word's contribution to the positive class's log-odds (docs/explain.md).

Two methods, one question: how much of the message's log-odds (positive class against the rest, in logits
before temperature) does each word carry, measured against the same message with every token replaced by
<|endoftext|> (GPT-2's padding, and what an empty message is)?
- "ig": integrated gradients on the token embeddings (Captum's LayerIntegratedGradients over `model.tok_emb`);
  the contributions add up to the log-odds difference between the message and that baseline.
- "occlusion": each word's tokens replaced by <|endoftext|>, one forward per word, batched; a contribution is
  the exact drop in log-odds, and they need not add up to anything.
Explanations are per word (a word's tokens summed, or occluded together), so they read as the message's text.

Inference side: torch (and Captum for "ig") only. The core functions take the network and the token ids;
`explain(classifier, texts)` is the entry for a loaded `spamclf.inference.Classifier`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from spamclf.errors import InvalidOption, SpamclfError
from spamclf.gpt2 import GPT2
from spamclf.heads import Readout
from spamclf.tokenizer import PAD_ID, gpt2_encoding

log = logging.getLogger(__name__)

METHODS = ("ig", "occlusion")
DEFAULT_METHOD = "occlusion"  # faster at every length measured, and exact (docs/explain.md)
IG_STEPS = 64  # quadrature points to start with; doubled while the sum misses the log-odds difference
IG_MAX_STEPS = 1024
IG_TOLERANCE, IG_ABSOLUTE_TOLERANCE = 0.02, 1e-3  # of the log-odds difference; the absolute part for near-zero ones
BATCH_TOKENS = 4096  # positions per forward pass: bounds the activations IG keeps for its backward pass


@dataclass(frozen=True)
class Contributions:
    """One message's contributions (per token, or per group of tokens that are occluded together) and the two
    log-odds they are measured between."""

    values: torch.Tensor
    margin: float  # the message's positive log-odds
    baseline: float  # the same message with every token replaced by <|endoftext|>
    steps: int = 0  # integrated gradients' quadrature points (0: occlusion)


@dataclass(frozen=True)
class Explanation:
    """One message's words (their texts join back to `text`) with their contributions, largest effect first
    in `ranked()`. `total` is their sum; `margin - baseline` is the log-odds difference that "ig"'s total
    matches. Log-odds are in logits before temperature (the prediction's probability is the calibrated one)."""

    text: str
    words: list[tuple[str, float]]
    total: float
    margin: float
    baseline: float
    method: str
    positive_label: str
    truncated: bool

    def ranked(self) -> list[tuple[str, float]]:
        """The words by contribution, the strongest push towards the positive class first."""
        return sorted(self.words, key=lambda word: -word[1])

    def as_dict(self) -> dict:
        return {**asdict(self), "words": [[word, contribution] for word, contribution in self.words]}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InvalidOption("method", method, "one of " + ", ".join(METHODS))


def positive_log_odds(logits: torch.Tensor, positive_index: int) -> torch.Tensor:
    """[B, C] → [B]: the positive class's logit against the rest; for two classes, positive minus negative."""
    others = torch.cat([logits[:, :positive_index], logits[:, positive_index + 1:]], dim=1)
    return logits[:, positive_index] - others.logsumexp(dim=1)


def padded_row(ids: Sequence[int], pad_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One message as the classifier reads it: ids [1, W] right-padded to `pad_length` (or none), lengths [1]."""
    row = torch.full((1, max(pad_length or 0, len(ids))), PAD_ID, dtype=torch.long)
    row[0, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return row, torch.tensor([len(ids)])


def _log_odds(model: GPT2, readout: Readout, rows: torch.Tensor, length: int, positive_index: int,
              batch_tokens: int) -> torch.Tensor:
    """[B] log-odds of equally wide rows that share one length, in batches of about `batch_tokens` positions."""
    per_batch = max(1, batch_tokens // rows.shape[1])
    out = []
    for chunk in rows.split(per_batch):
        lengths = torch.full((chunk.shape[0],), length, device=chunk.device)
        out.append(positive_log_odds(readout.logits(model, chunk, lengths).float(), positive_index))
    return torch.cat(out)


def occlusion(model: GPT2, readout: Readout, ids: Sequence[int], positive_index: int, pad_length: int | None = None,
              groups: Sequence[Sequence[int]] | None = None, batch_tokens: int = BATCH_TOKENS) -> Contributions:
    """Exact leave-one-out: a group's contribution is the log-odds minus those with its tokens replaced by
    <|endoftext|> (the other tokens keep their positions). `groups`: token positions occluded together (a
    word's tokens), one forward each; None: each token alone."""
    device = next(model.parameters()).device
    row, _ = padded_row(ids, pad_length)
    n = len(ids)
    groups = [[i] for i in range(n)] if groups is None else groups
    rows = row.repeat(len(groups) + 2, 1)  # the message, each group occluded, and every token (the baseline)
    for j, group in enumerate(groups, start=1):
        rows[j, list(group)] = PAD_ID
    rows[-1, :n] = PAD_ID
    with torch.inference_mode():
        odds = _log_odds(model, readout, rows.to(device), n, positive_index, batch_tokens).cpu()
    return Contributions(odds[0] - odds[1:-1], float(odds[0]), float(odds[-1]))


def _captum_integrated_gradients():
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        raise SpamclfError("method='ig' needs Captum: pip install 'spamclf[explain]' (or use method='occlusion')"
                           ) from None
    return LayerIntegratedGradients


def integrated_gradients(model: GPT2, readout: Readout, ids: Sequence[int], positive_index: int,
                         pad_length: int | None = None, steps: int = IG_STEPS, max_steps: int = IG_MAX_STEPS,
                         batch_tokens: int = BATCH_TOKENS) -> Contributions:
    """Integrated gradients of the log-odds along the straight line from the baseline's token embeddings
    (<|endoftext|> at every real token) to the message's; positions and padding are the same in both, so they
    get nothing. Starts with `steps` quadrature points and doubles them, up to `max_steps`, until the
    contributions sum to margin - baseline within IG_TOLERANCE of it: a trained classifier's log-odds can jump
    within a few percent of the path, where few points miss the jump's size."""
    device = next(model.parameters()).device
    row, lengths = (t.to(device) for t in padded_row(ids, pad_length))
    baseline = row.clone()
    baseline[0, : len(ids)] = PAD_ID

    def forward(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return positive_log_odds(readout.logits(model, input_ids, lengths).float(), positive_index)

    attribute = _captum_integrated_gradients()(forward, model.tok_emb).attribute
    with torch.inference_mode():
        ends = _log_odds(model, readout, torch.cat([row, baseline]), len(ids), positive_index, batch_tokens)
    margin, base = ends.tolist()
    allowed = IG_TOLERANCE * abs(margin - base) + IG_ABSOLUTE_TOLERANCE
    while True:
        with torch.enable_grad():
            attributions = attribute(row, baselines=baseline, additional_forward_args=(lengths,), n_steps=steps,
                                     internal_batch_size=max(1, batch_tokens // row.shape[1]))
        per_token = attributions[0, : len(ids)].sum(-1).detach().float().cpu()
        gap = abs(float(per_token.sum()) - (margin - base))
        if gap <= allowed or steps * 2 > max_steps:
            break
        steps *= 2
    if gap > allowed:
        log.warning("integrated gradients with %d steps sum to %.4g, not %.4g; raise max_steps", steps,
                    float(per_token.sum()), margin - base)
    return Contributions(per_token, margin, base, steps)


def _starts_word(data: bytes, offset: int) -> bool:
    """A token whose first character is whitespace or punctuation starts a word; one that starts inside a
    character (a byte-level fragment of it) never does."""
    first = data[offset]
    if 0x80 <= first < 0xC0:
        return False
    size = 1 if first < 0x80 else 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    char = data[offset : offset + size].decode("utf-8", errors="replace")[:1]
    return char.isspace() or not char.isalnum()


def word_groups(ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The words of a message's ids: (text, token positions). The texts join back to the decoded ids exactly.
    The lone <|endoftext|> that stands for an empty message is no word."""
    encoding = gpt2_encoding()
    pieces = [b"" if t == PAD_ID else encoding.decode_single_token_bytes(t) for t in ids]
    data, offset, groups = b"".join(pieces), 0, []
    for i, piece in enumerate(pieces):
        if piece and (not groups or _starts_word(data, offset)):
            groups.append([i])
        elif piece:
            groups[-1].append(i)
        offset += len(piece)
    return [(b"".join(pieces[i] for i in group).decode("utf-8", errors="replace"), group) for group in groups]


@dataclass(frozen=True)
class WordContributions:
    words: list[tuple[str, float]]  # (text, contribution): the texts join back to the message
    margin: float
    baseline: float
    steps: int = 0


def word_contributions(model: GPT2, readout: Readout, ids: Sequence[int], positive_index: int,
                       method: str = DEFAULT_METHOD, pad_length: int | None = None, *, steps: int = IG_STEPS,
                       batch_tokens: int = BATCH_TOKENS) -> WordContributions:
    """Each word's contribution to the positive class's log-odds of one message's ids (already truncated), by
    `method`: "ig" sums its tokens' integrated gradients, "occlusion" occludes its tokens together (one token
    at a time misses a word whose pieces stand in for each other: docs/explain.md). `pad_length`: the fixed
    width the classifier pads to, or None."""
    groups = word_groups(ids)
    if method == "ig":
        found = integrated_gradients(model, readout, ids, positive_index, pad_length, steps=steps,
                                     max_steps=max(steps, IG_MAX_STEPS), batch_tokens=batch_tokens)
        values = [float(found.values[group].sum()) for _, group in groups]
    elif method == "occlusion":
        found = occlusion(model, readout, ids, positive_index, pad_length, [g for _, g in groups], batch_tokens)
        values = found.values.tolist()
    else:
        check_method(method)
    return WordContributions([(text, v) for (text, _), v in zip(groups, values)], found.margin, found.baseline,
                             found.steps)


def explain(classifier, texts: Sequence[str], method: str = DEFAULT_METHOD, steps: int = IG_STEPS,
            batch_tokens: int = BATCH_TOKENS) -> list[Explanation]:
    """One Explanation per text for a loaded classifier (its `model`, `readout`, `decision`, `pad_length` and
    `encode`), truncated as its predictions are. Runs in fp32 whatever the classifier's precision."""
    check_method(method)
    decision = classifier.decision
    ids, truncated = classifier.encode(texts)
    out = []
    for row, cut in zip(ids, truncated):
        found = word_contributions(classifier.model, classifier.readout, row, decision.positive, method,
                                   classifier.pad_length, steps=steps, batch_tokens=batch_tokens)
        out.append(Explanation(
            text="".join(w for w, _ in found.words), words=found.words, total=sum(c for _, c in found.words),
            margin=found.margin, baseline=found.baseline, method=method, positive_label=decision.positive_label,
            truncated=cut))
    return out
