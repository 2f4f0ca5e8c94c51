"""GPT-2 in plain PyTorch, with the book's attribute names.

    model = load_pretrained("gpt2-small")            # open weights: from spamclf.weights import load_pretrained
    model.out_head = torch.nn.Linear(768, 2)         # the book's snippets run unchanged
    logits = model(input_ids)[:, -1, :]

This file imports torch and nothing else: no Lightning, Hydra, data or file formats. Copy it into a
notebook and `GPT2.random(preset("gpt2-small"))` works; loading weights is `spamclf.weights`.
Hardware-specific kernels are not here either: `spamclf.kernels` swaps them in around inference, by the
names `TransformerBlock.linears` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    causal: bool = True  # False: every token attends to every other (the book's "no causal mask" row)
    layer_norm_eps: float = 1e-5


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "gpt2-tiny": GPTConfig(emb_dim=64, n_layers=2, n_heads=4),  # random init only: tests and offline smoke runs
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named configuration, with `overrides` (drop_rate, causal, …) applied."""
    if name not in PRESETS:
        raise ValueError(f"model_name={name!r} is not valid; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------- layers
class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.emb_dim % cfg.n_heads:
            raise ValueError(f"n_heads={cfg.n_heads} is not valid; choose a divisor of emb_dim={cfg.emb_dim}")
        self.n_heads, self.causal, self.drop_rate = cfg.n_heads, cfg.causal, cfg.drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # fused W_query, W_key, W_value
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, at: torch.Tensor | None = None,
                packed: Packed | None = None) -> torch.Tensor:
        """[B, T, D] → [B, T, D]. With `at` ([B] positions): only those positions' outputs, [B, 1, D]; the
        queries of the other positions are never computed, their keys and values are. With `packed`: x holds
        only the positions `packed` names, [N, D], and so does the result (attention runs on the padded grid)."""
        if packed is not None:
            qkv = self.qkv(x)
            grid = qkv.new_zeros(packed.batch * packed.width, qkv.shape[1])
            grid.index_copy_(0, packed.index, qkv[: packed.index.numel()])
            q, k, v = self._heads(grid.view(packed.batch, packed.width, -1), 3)
            y = self._attend(q, k, v, attn_mask).reshape(-1, x.shape[1]).index_select(0, packed.index)
            return self.out_proj(F.pad(y, (0, 0, 0, x.shape[0] - packed.index.numel())))
        b, t, d = x.shape
        if at is None:
            return self.out_proj(self._attend(*self._heads(self.qkv(x), 3), attn_mask))
        rows = torch.arange(b, device=x.device)
        if isinstance(self.qkv, nn.Linear):  # not an adapter wrapper (LoRA): compute only the queries asked for
            # split, not two slices: backward then joins the two gradients into one tensor instead of zero-filling
            # and adding two full-size ones
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([d, 2 * d])
            (q,) = self._heads(F.linear(at_positions(x, at)[:, None], w_q, b_q), 1)
            k, v = self._heads(F.linear(x, w_kv, b_kv), 2)
        else:  # adapter-wrapped (LoRA): its own forward, then one query per row
            q, k, v = self._heads(self.qkv(x), 3)
            q = q[rows, :, at][:, :, None]
        if attn_mask is not None:
            attn_mask = attn_mask[rows, :, at][:, :, None, :]
        elif self.causal:
            attn_mask = (torch.arange(t, device=x.device)[None, :] <= at[:, None])[:, None, None, :]
        return self.out_proj(self._attend(q, k, v, attn_mask, causal=False))

    def _heads(self, fused: torch.Tensor, parts: int) -> torch.Tensor:
        """[B, T, parts·D] → [parts, B, heads, T, D/heads]."""
        b, t, width = fused.shape
        return fused.view(b, t, parts, self.n_heads, width // parts // self.n_heads).permute(2, 0, 3, 1, 4)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                causal: bool | None = None) -> torch.Tensor:
        """Scaled dot-product attention, heads merged back: [B, T_q, D]."""
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.drop_rate if self.training else 0.0,
            is_causal=self.causal and attn_mask is None if causal is None else causal,
        )
        b, h, t, hd = y.shape
        return y.transpose(1, 2).reshape(b, t, h * hd)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def linears(self) -> list[tuple[nn.Module, str, str | None]]:
        """Every linear layer as (parent module, attribute, the attribute of the activation that follows it in the
        same parent, or None): what a kernel library needs to swap layers or fuse an activation, by name."""
        return [(self.att, "qkv", None), (self.att, "out_proj", None),
                (self.ff.layers, "0", "1"), (self.ff.layers, "2", None)]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, at: torch.Tensor | None = None,
                packed: Packed | None = None) -> torch.Tensor:
        """`at` ([B] positions): compute only those positions' outputs [B, 1, D] (what a classifier reading one
        position per row needs from the last block; the values equal forward()'s there). `packed`: x is [N, D],
        only the positions it names (see MultiHeadAttention)."""
        shortcut = x if at is None else at_positions(x, at)[:, None]
        x = shortcut + self.drop_shortcut(self.att(self.norm1(x), attn_mask, at, packed))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


@dataclass
class Packed:
    """Where the rows of a packed [N, D] activation sit in a right-padded [batch, width] grid: row i at flat
    position index[i] (b·width + t). Rows past len(index) are filler, so that many batches share one matmul
    shape (oneDNN generates kernels per shape); nothing reads them."""

    index: torch.Tensor
    batch: int
    width: int

    @classmethod
    def of(cls, keep: torch.Tensor) -> Packed:
        """From a [B, T] boolean mask of the positions to compute."""
        return cls(keep.flatten().nonzero().squeeze(1), keep.shape[0], keep.shape[1])


def at_positions(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] → [B, ...]: row b at position at[b]."""
    return x[torch.arange(x.shape[0], device=x.device), at]


def real_tokens(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] boolean mask of each right-padded row's first `lengths[b]` (real) positions."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA boolean mask [B, 1, T, T] from a [B, T] mask of real tokens: no query attends to padding.
    Every query keeps at least the first token, so no row is fully masked."""
    t = valid.shape[1]
    allowed = valid.bool()[:, None, None, :].expand(-1, 1, t, -1)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    return allowed


# ------------------------------------------------------------------------------------------------ model
class GPT2(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # tied, as in GPT-2
        self.source: dict | None = None  # where pretrained weights came from: {"source", "file", "sha256"}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @classmethod
    def empty(cls, cfg: GPTConfig) -> GPT2:
        """A model whose tensors are not allocated (meta) and not initialised: for loading every tensor next.
        The layers' own initialisers are skipped while it is built: on meta tensors `normal_` runs through a
        Python reference implementation whose first call imports torch's compiler (~1 s)."""
        layers = (nn.Linear, nn.Embedding, nn.LayerNorm)
        saved = [layer.reset_parameters for layer in layers]
        try:
            for layer in layers:
                layer.reset_parameters = lambda self: None
            with torch.device("meta"):
                return cls(cfg)
        finally:
            for layer, reset in zip(layers, saved):
                layer.reset_parameters = reset

    @classmethod
    def random(cls, cfg: GPTConfig) -> GPT2:
        """A randomly initialised model, initialised once (not first by PyTorch's defaults, then by GPT-2's)."""
        model = cls.empty(cfg)
        model.to_empty(device="cpu")
        model.out_head.weight = model.tok_emb.weight
        model.reset_parameters()
        return model

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 n_layers)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(f"input has {t} tokens, more than the context length {self.cfg.context_length}; "
                             "truncate it")
        pos = torch.arange(t, device=input_ids.device)
        return self.drop_emb(self.tok_emb(input_ids) + self.pos_emb(pos))

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
                   valid: torch.Tensor | None = None, at: torch.Tensor | None = None,
                   packed: Packed | None = None) -> torch.Tensor:
        """Blocks [start, stop) on hidden states x; `valid` [B, T] marks real tokens (None: attend to all).
        `at` ([B] positions): return only those positions, [B, 1, D], computing only them in the last block.
        `packed`: x is [N, D], only the positions of a padded [B, T] batch that `packed` names."""
        mask = None if valid is None else attention_mask(valid, self.cfg.causal)
        blocks = self.trf_blocks[start:stop]
        for i, block in enumerate(blocks):
            x = block(x, mask, at if i == len(blocks) - 1 else None, packed)
        if at is not None and not len(blocks):
            x = at_positions(x, at)[:, None]
        return x

    def features(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, emb_dim], before the output head."""
        return self.final_norm(self.run_blocks(self.embed(input_ids), valid=valid))

    def forward(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_head(self.features(input_ids, valid))
