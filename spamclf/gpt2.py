"""GPT-2 in plain PyTorch, with the book's attribute names and `from_pretrained` for the open weights.

    model = GPT2.from_pretrained("gpt2-small")       # or a hub id, a .safetensors file, a folder
    model.out_head = torch.nn.Linear(768, 2)         # the book's snippets run unchanged
    logits = model(input_ids)[:, -1, :]

Nothing here knows Lightning, Hydra or the data: copy this file into a notebook and it works.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from spamclf.errors import CheckpointError, InvalidOption, SpamclfError, WeightsUnavailable


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
HUB_IDS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise InvalidOption("model_name", name, "one of " + ", ".join(PRESETS))
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------- layers
class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.emb_dim % cfg.n_heads:
            raise InvalidOption("n_heads", cfg.n_heads, f"a divisor of emb_dim={cfg.emb_dim}")
        self.n_heads, self.causal, self.drop_rate = cfg.n_heads, cfg.causal, cfg.drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # fused W_query, W_key, W_value
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, at: torch.Tensor | None = None,
                packed: Packed | None = None) -> torch.Tensor:
        """[B, T, D] → [B, T, D]. With `at` ([B] positions): only those positions' outputs, [B, 1, D]; the
        queries of the other positions are never computed, their keys and values are. With `packed`: x holds
        only the positions `packed` names, [N, D], and so does the result (attention runs on the padded grid)."""
        if packed is not None:
            qkv = _linear(self.qkv, x)
            grid = qkv.new_zeros(packed.batch * packed.width, qkv.shape[1])
            grid.index_copy_(0, packed.index, qkv[: packed.index.numel()])
            q, k, v = self._heads(grid.view(packed.batch, packed.width, -1), 3)
            y = self._attend(q, k, v, attn_mask).reshape(-1, x.shape[1]).index_select(0, packed.index)
            return _linear(self.out_proj, F.pad(y, (0, 0, 0, x.shape[0] - packed.index.numel())))
        b, t, d = x.shape
        if at is None:
            return _linear(self.out_proj, self._attend(*self._heads(_linear(self.qkv, x), 3), attn_mask))
        rows = torch.arange(b, device=x.device)
        if type(self.qkv) is nn.Linear:
            weight, bias = self.qkv.weight, self.qkv.bias
            (q,) = self._heads(F.linear(at_positions(x, at)[:, None], weight[:d], None if bias is None else bias[:d]), 1)
            k, v = self._heads(F.linear(x, weight[d:], None if bias is None else bias[d:]), 2)
        else:  # adapter-wrapped (LoRA): its own forward, then one query per row
            q, k, v = self._heads(self.qkv(x), 3)
            q = q[rows, :, at][:, :, None]
        if attn_mask is not None:
            attn_mask = attn_mask[rows, :, at][:, :, None, :]
        elif self.causal:
            attn_mask = (torch.arange(t, device=x.device)[None, :] <= at[:, None])[:, None, None, :]
        return _linear(self.out_proj, self._attend(q, k, v, attn_mask, causal=False))

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
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), nn.GELU(approximate="tanh"), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, act, proj = self.layers
        if isinstance(act, nn.GELU) and act.approximate == "tanh":
            return _linear(proj, _linear(fc, x, gelu=True))
        return self.layers(x)


# ------------------------------------------------------------------- oneDNN for bf16 inference on CPU
# Under bf16 autocast a frozen linear layer casts its fp32 weight to bf16 at every call, and GELU is a
# second pass over the output. Where nothing needs gradients, `_linear` calls oneDNN directly: GELU as a
# post-op on the fp32 accumulator (closer to fp32 than rounding in between), and with `packed_bf16_weights`
# weights cast and laid out for the CPU's matrix units once (the same numbers, ~20% faster per layer).
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _onednn_inference(x: torch.Tensor, fc: nn.Module) -> bool:
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and type(fc) is nn.Linear
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in fc.parameters())))
    )


def _linear(fc: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """fc(x), then tanh-GELU if `gelu`; one oneDNN call where `_onednn_inference` allows."""
    packed = getattr(fc, "onednn_bf16", None)
    if (gelu or packed is not None) and _onednn_inference(x, fc):
        weight, bias = packed or (fc.weight.to(torch.bfloat16), None if fc.bias is None else fc.bias.to(torch.bfloat16))
        post, algorithm = ("gelu", "tanh") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, post, [], algorithm)
    y = fc(x)
    return F.gelu(y, approximate="tanh") if gelu else y


@contextmanager
def packed_bf16_weights(model: GPT2, stop: int | None = None):
    """Inside: the frozen linear layers of blocks [0, stop) keep bf16 copies of their weights in oneDNN's
    layout (2 bytes a weight while inside), used under CPU bf16 autocast where nothing needs gradients."""
    layers = [] if not _ONEDNN else [
        fc for block in model.trf_blocks[:stop]
        for fc in (block.att.qkv, block.att.out_proj, block.ff.layers[0], block.ff.layers[2])
        if type(fc) is nn.Linear and fc.weight.device.type == "cpu" and not any(p.requires_grad for p in fc.parameters())
    ]
    for fc in layers:
        bias = None if fc.bias is None else fc.bias.detach().to(torch.bfloat16)
        fc.onednn_bf16 = (torch.ops.mkldnn._reorder_linear_weight(fc.weight.detach().to(torch.bfloat16), 2048), bias)
    try:
        yield
    finally:
        for fc in layers:
            del fc.onednn_bf16


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

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
    def random(cls, cfg: GPTConfig) -> GPT2:
        """A randomly initialised model, initialised once (not first by PyTorch's defaults, then by GPT-2's)."""
        with torch.device("meta"):
            model = cls(cfg)
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
            raise SpamclfError(f"input has {t} tokens, more than the context length {self.cfg.context_length}; truncate it")
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

    # ------------------------------------------------------------------------------- pretrained weights
    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "gpt2-small", config: GPTConfig | None = None,
                        cache_dir: str | None = None, **overrides) -> GPT2:
        """Load open GPT-2 weights. `source`: a preset name (gpt2-small … gpt2-xl), a hub id
        (openai-community/gpt2…), a local .safetensors file, or a folder holding model.safetensors.
        `overrides` change non-weight settings (drop_rate, causal). Returns the LM model with its tied head."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights, config_json = resolve_weights(source, cache_dir)
        try:
            state = load_file(weights, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
        config = replace(config or _config_for(source, config_json, state), **overrides)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(convert_hf_state_dict(state, model, str(weights)), strict=True, assign=True)
        if "lm_head.weight" not in {k.removeprefix("transformer.") for k in state}:
            model.out_head.weight = model.tok_emb.weight
        model.source = {"source": str(source), "file": str(weights), "sha256": file_sha256(weights)}
        return model


# ----------------------------------------------------------------------------- checkpoint key mapping
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_KEY_MAP = [  # hub GPT-2 name → ours; the one place the two layouts meet
    (r"wte\.weight", "tok_emb.weight"),
    (r"wpe\.weight", "pos_emb.weight"),
    (r"ln_f\.(weight|bias)", r"final_norm.\1"),
    (r"lm_head\.weight", "out_head.weight"),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"trf_blocks.\1.norm1.\2"),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"trf_blocks.\1.norm2.\2"),
    (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"trf_blocks.\1.att.qkv.\2"),
    (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"trf_blocks.\1.att.out_proj.\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"trf_blocks.\1.ff.layers.0.\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"trf_blocks.\1.ff.layers.2.\2"),
]
_NOT_WEIGHTS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers in hub files


def convert_hf_state_dict(state: dict[str, torch.Tensor], model: GPT2, origin: str = "checkpoint") -> dict:
    """Map a Hugging Face GPT-2 state dict (hub layout, or `save_pretrained`'s `transformer.` prefix) to
    ours: transpose Conv1D weights, skip the attention-mask buffers, and name any key that is
    unexpected, missing or mis-shaped."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if _NOT_WEIGHTS.fullmatch(name):
            continue
        ours = next((re.sub(pat, rep, name) for pat, rep in _KEY_MAP if re.fullmatch(pat, name)), None)
        if ours is None or ours not in expected:
            raise CheckpointError(f"{origin}: unexpected key {key!r}; this is not a GPT-2 checkpoint of this size")
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise CheckpointError(
                f"{origin}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[ours])}; "
                f"check the model size"
            )
        out[ours] = tensor.contiguous()
    out.setdefault("out_head.weight", out.get("tok_emb.weight"))
    missing = [k for k in expected if out.get(k) is None]
    if missing:
        raise CheckpointError(f"{origin}: missing key(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return out


def _config_for(source, config_json: Path | None, tensors: dict[str, torch.Tensor]) -> GPTConfig:
    """The checkpoint's shape: from config.json beside it, else a preset, else its tensors' shapes."""
    if config_json is not None:
        try:
            hf = json.loads(Path(config_json).read_text())
            return GPTConfig(
                vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                n_layers=hf["n_layer"], n_heads=hf["n_head"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{config_json}: not a GPT-2 config.json ({e!r} missing or wrong)") from None
    if str(source) in PRESETS:
        return PRESETS[str(source)]
    names = {k.removeprefix("transformer.") for k in tensors}
    if "wte.weight" not in names:
        raise CheckpointError(f"{source}: no 'wte.weight'; this is not a GPT-2 checkpoint")
    wte = tensors.get("wte.weight", tensors.get("transformer.wte.weight"))
    wpe = tensors.get("wpe.weight", tensors.get("transformer.wpe.weight"))
    n_layers = len({m.group(1) for n in names if (m := re.match(r"h\.(\d+)\.", n))})
    shape = (wte.shape[1], n_layers)
    match = next((c for c in PRESETS.values() if (c.emb_dim, c.n_layers) == shape), None)
    if match is None:
        raise CheckpointError(f"{source}: cannot tell the number of attention heads; put the model's config.json beside it")
    return replace(match, vocab_size=wte.shape[0], context_length=wpe.shape[0])


def resolve_weights(source: str | os.PathLike, cache_dir: str | None = None) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a preset name, hub id, file or folder; downloads through
    huggingface_hub (its cache, resume, progress bar and HF_HUB_OFFLINE)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: folder has no {WEIGHTS_FILE}; point at the .safetensors file or the right folder")
        return weights, (path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"{path}: weights file not found; fix the path (model.weights_path)")
        beside = path.parent / CONFIG_FILE
        return path, beside if beside.is_file() else None
    if text == "gpt2-tiny":
        raise InvalidOption("weights", "pretrained", "'random' for gpt2-tiny (no pretrained tiny GPT-2 exists)")
    repo = HUB_IDS.get(text, text)
    if "/" not in repo:
        raise InvalidOption("model_name", text, "a preset (" + ", ".join(HUB_IDS) + "), a hub id, a .safetensors file or a folder")
    return _hub_download(repo, WEIGHTS_FILE, cache_dir), _hub_download(repo, CONFIG_FILE, cache_dir)


def _hub_download(repo: str, filename: str, cache_dir: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if isinstance(cached, str):
        return Path(cached)
    unavailable = WeightsUnavailable(
        f"pretrained weights {repo}/{filename} are not in the Hugging Face cache and cannot be downloaded (offline); "
        f"fix: run once with network access, or set model.weights_path=/path/to/model.safetensors, "
        f"or model.weights=random (or model=gpt2-tiny)"
    )
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):  # fail in a second, not after 5 retries
        raise unavailable
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise unavailable from None
    except RepositoryNotFoundError:
        raise SpamclfError(f"hub repository {repo!r} not found; use a preset (gpt2-small …) or a GPT-2 hub id") from None
    except EntryNotFoundError:
        raise SpamclfError(f"hub repository {repo!r} has no {filename}; it needs safetensors GPT-2 weights") from None
    except OSError as e:  # HTTP and connection errors
        raise WeightsUnavailable(f"{unavailable} [{type(e).__name__}: {e}]".replace("\n", " ")) from None


def _reachable(endpoint: str) -> bool:
    try:
        socket.getaddrinfo(urlparse(endpoint).hostname, 443)
        return True
    except OSError:
        return False


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file; free for hub downloads, whose cache names blobs by it."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
