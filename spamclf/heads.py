"""What turns the language model into a classifier: the head swap, which layers train, and how the logits are
read (pooling). Training (`spamclf.module`) and inference (`spamclf.inference`) build and run the network here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spamclf.errors import InvalidOption
from spamclf.gpt2 import GPT2, PRESETS, at_positions, preset, real_tokens
from spamclf.weights import load_pretrained

POOLING_CHOICES = ("last", "first", "last_nonpad", "mean")
TRAINABLE_NAMES = ("head", "last_block", "last_two_blocks", "all", "lora")
TRAINABLE_HELP = "one of " + ", ".join(TRAINABLE_NAMES) + ", or an integer k (the last k blocks + final norm + head)"
LORA_TARGETS = ["qkv", "out_proj", "layers.0", "layers.2"]  # attention and feed-forward linears, not the head


WEIGHTS_CHOICES = ("pretrained", "random")


def classifier_network(model_name: str, num_classes: int, weights: str = "pretrained", weights_path: str | None = None,
                       trainable_layers: str | int = "last_block", lora_rank: int = 16, lora_alpha: float = 16,
                       drop_rate: float = 0.0, causal: bool = True, init: bool = True) -> GPT2:
    """GPT-2 with a `num_classes` head, frozen as `trainable_layers` says. `init=False` with random weights leaves
    the body's tensors unallocated (meta), for a caller that loads every tensor from a checkpoint next."""
    if weights not in WEIGHTS_CHOICES:
        raise InvalidOption("weights", weights, "one of " + ", ".join(WEIGHTS_CHOICES))
    overrides = {"drop_rate": drop_rate, "causal": causal}
    if weights == "pretrained":
        model = load_pretrained(weights_path or model_name, **overrides)
    elif model_name not in PRESETS:
        raise InvalidOption("model_name", model_name, "one of " + ", ".join(PRESETS))
    elif init:
        model = GPT2.random(preset(model_name, **overrides))
    else:
        model = GPT2.empty(preset(model_name, **overrides))
    replace_head(model, num_classes)
    apply_trainable_layers(model, trainable_layers, lora_rank, lora_alpha)
    return model


def replace_head(model: GPT2, num_classes: int) -> None:
    """The book's `model.out_head = Linear(emb_dim, num_classes)`: no 50,257-way projection any more."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)


def trainable_blocks(policy: str | int, n_layers: int) -> int | None:
    """How many trailing blocks a policy trains; None for `all` and `lora` (no plain block count)."""
    if isinstance(policy, bool):
        raise InvalidOption("trainable_layers", policy, TRAINABLE_HELP)
    if isinstance(policy, int) or (isinstance(policy, str) and policy.isdigit()):
        k = int(policy)
        if not 0 <= k <= n_layers:
            raise InvalidOption("trainable_layers", policy, f"an integer between 0 and {n_layers} for this model")
        return k
    counts = {"head": 0, "last_block": 1, "last_two_blocks": 2, "all": None, "lora": None}
    if policy not in counts:
        raise InvalidOption("trainable_layers", policy, TRAINABLE_HELP)
    return counts[policy]


def apply_trainable_layers(model: GPT2, policy: str | int, lora_rank: int = 16, lora_alpha: float = 16) -> None:
    """Freeze everything, then unfreeze what `policy` trains (the head always trains).

    head: output layer only; last_block (the book): last block + final norm + head; last_two_blocks;
    k: last k blocks + final norm + head; all: every parameter; lora: LoRA adapters (through peft) on
    every attention and feed-forward linear, plus the head.
    """
    k = trainable_blocks(policy, model.cfg.n_layers)
    if policy == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if policy == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        if lora_rank < 1:
            raise InvalidOption("lora_rank", lora_rank, "a positive integer")
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    elif k:
        model.trf_blocks[-k:].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)


def frozen_linears_to(model: GPT2, dtype: torch.dtype) -> int:
    """Store the frozen linear layers of the blocks in `dtype`; returns the bytes this frees. For a run under `dtype`
    autocast (bf16-mixed) the result is the same: autocast rounds these weights and biases to `dtype` at every call,
    so the stored copy is what every call computed with already. Embeddings and layer norms, which autocast leaves in
    fp32, stay as they are, and so do adapter-wrapped (LoRA) layers."""
    before = _parameter_bytes(model)
    for block in model.trf_blocks:
        for parent, name, _ in block.linears():
            fc = getattr(parent, name)
            if type(fc) is nn.Linear and not any(p.requires_grad for p in fc.parameters()):
                fc.to(dtype)
    return before - _parameter_bytes(model)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def frozen_prefix_depth(model: GPT2) -> int:
    """Number of leading blocks (after the frozen embeddings) whose parameters are all frozen."""
    if any(p.requires_grad for p in (*model.tok_emb.parameters(), *model.pos_emb.parameters())):
        return 0
    depth = 0
    for block in model.trf_blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied tensors once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def check_pooling(pooling: str) -> None:
    if pooling not in POOLING_CHOICES:
        raise InvalidOption("pooling", pooling, "one of " + ", ".join(POOLING_CHOICES))


def pooled_position(lengths: torch.Tensor, width: int, pooling: str) -> torch.Tensor | None:
    """[B] the one position each row's pooling reads, or None when it reads several (mean)."""
    check_pooling(pooling)
    if pooling == "last":
        return torch.full_like(lengths, width - 1)
    if pooling == "first":
        return torch.zeros_like(lengths)
    if pooling == "last_nonpad":
        return lengths - 1
    return None


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] → [B, D]. last: position T-1 of the padded sequence (the book); first: position 0;
    last_nonpad: each message's last real token; mean: the average over real tokens."""
    lengths = lengths.to(hidden.device)
    at = pooled_position(lengths, hidden.shape[1], pooling)
    if at is not None:
        return at_positions(hidden, at)
    real = real_tokens(lengths, hidden.shape[1])
    return (hidden * real[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


@dataclass(frozen=True)
class Readout:
    """How the class logits are read from GPT-2: `pooling` picks the position(s); `pooled_only` lets the last block
    compute only the position the pooling reads (the same logits, ~6x less work there; not for mean pooling);
    without the causal mask, real tokens are masked in wherever padding could otherwise reach them."""

    pooling: str = "last"
    pooled_only: bool = True
    causal: bool = True

    def __post_init__(self):
        check_pooling(self.pooling)

    @property
    def use_mask(self) -> bool:
        # With the causal mask, right padding never reaches a real token, and pooling=last reads padding by design.
        return not self.causal and self.pooling != "last"

    def prefix_depth(self, n_layers: int) -> int:
        """How many blocks can run before the logits are read: all but the last when only one position is read."""
        return n_layers - 1 if self.pooled_only and self.pooling != "mean" else n_layers

    def logits(self, model: GPT2, input_ids: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor | None = None,
               start_block: int = 0) -> torch.Tensor:
        """Class logits [B, C] of right-padded `input_ids` [B, T] with `lengths` [B] real tokens; `hidden`
        [B, T, D] resumes from states after `start_block` blocks (a prefix cache, or a packed prefix)."""
        lengths = lengths.to(input_ids.device)
        valid = real_tokens(lengths, input_ids.shape[1]) if self.use_mask else None
        x = model.embed(input_ids) if hidden is None else hidden
        at = pooled_position(lengths.to(x.device), x.shape[1], self.pooling) if self.pooled_only else None
        if at is None:
            x = model.final_norm(model.run_blocks(x, start_block, valid=valid))
            return model.out_head(pool(x, lengths, self.pooling))
        x = model.run_blocks(x, start_block, valid=valid, at=at)[:, 0]
        return model.out_head(model.final_norm(x))
