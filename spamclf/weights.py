"""Open GPT-2 weights into `spamclf.gpt2.GPT2`: the hub (cache, resume, offline), local safetensors files
and folders, and the one table that maps Hugging Face's key names to ours.

    from spamclf.weights import load_pretrained
    model = load_pretrained("gpt2-small")     # or a hub id, a .safetensors file, a folder

Everything that touches files or the network lives here,
so `gpt2.py` stays plain PyTorch.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import torch

from spamclf.errors import CheckpointError, InvalidOption, SpamclfError, WeightsUnavailable
from spamclf.gpt2 import GPT2, PRESETS, GPTConfig
from spamclf.io import file_sha256

HUB_IDS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def load_pretrained(source: str | os.PathLike = "gpt2-small", config: GPTConfig | None = None,
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
    model = GPT2.empty(config)
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


def hf_body_names(n_layers: int) -> list[str]:
    """Every weight name of a Hugging Face GPT-2 body (no `transformer.` prefix, no head)."""
    per_block = [f"{part}.{p}" for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                 for p in ("weight", "bias")]
    return ["wte.weight", "wpe.weight", *(f"h.{i}.{n}" for i in range(n_layers) for n in per_block),
            "ln_f.weight", "ln_f.bias"]


def to_hf_state_dict(model: GPT2, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Our GPT-2 body in Hugging Face's layout (the inverse of `convert_hf_state_dict`, through the same table):
    Conv1D weights transposed back, keys prefixed (`transformer.` as in GPT2ForSequenceClassification)."""
    ours = model.state_dict()
    out = {}
    for name in hf_body_names(model.cfg.n_layers):
        key = next(re.sub(pat, rep, name) for pat, rep in _KEY_MAP if re.fullmatch(pat, name))
        tensor = ours[key].detach()
        out[prefix + name] = (tensor.t() if name.endswith(_CONV1D) else tensor).contiguous().clone()
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
        raise CheckpointError(f"{source}: cannot tell the number of attention heads; "
                              "put the model's config.json beside it")
    return replace(match, vocab_size=wte.shape[0], context_length=wpe.shape[0])


def resolve_weights(source: str | os.PathLike, cache_dir: str | None = None) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a preset name, hub id, file or folder; downloads through
    huggingface_hub (its cache, resume, progress bar and HF_HUB_OFFLINE)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: folder has no {WEIGHTS_FILE}; "
                                  "point at the .safetensors file or the right folder")
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
        raise InvalidOption("model_name", text,
                            "a preset (" + ", ".join(HUB_IDS) + "), a hub id, a .safetensors file or a folder")
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
        raise SpamclfError(f"hub repository {repo!r} not found; "
                           "use a preset (gpt2-small …) or a GPT-2 hub id") from None
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
