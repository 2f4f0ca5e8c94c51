"""What several test files share: composing the training config, the tiny run's overrides, running train.py,
small random GPT-2 checkpoints in the Hugging Face files' exact layouts (no network needed), servers, mail."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
QUIET = ["~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false"]
TINY = ["model=gpt2-tiny", "trainer.accelerator=cpu", *QUIET, "trainer.max_epochs=1"]


def compose_cfg(overrides, tmp_path):
    """train.py's config with `overrides`, its run folder and logs in `tmp_path`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}",
                                           "paths.root_dir=."])


def train_cli(args, tmp_path, timeout=300, env=None):
    """`python train.py ARGS` from the repository root, its runs under `tmp_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args, f"paths.log_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def hf_gpt2(seed: int = 0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 50257, **config})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so a mis-mapped key cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def save_prefixed(model, folder: Path) -> Path:
    """`save_pretrained`: keys carry the `transformer.` prefix."""
    model.save_pretrained(folder)
    return folder


def save_hub_layout(model, folder: Path) -> Path:
    """The layout of openai-community/gpt2's model.safetensors: no prefix, no lm_head (tied), and the
    per-layer causal-mask buffers `h.N.attn.bias` (older files: `h.N.attn.masked_bias`)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions, dtype=torch.uint8)).view(
        1, 1, cfg.n_positions, cfg.n_positions)
    for i in range(cfg.n_layer):
        state[f"h.{i}.attn.bias"] = mask.clone()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


def populate_hub_cache(cache_dir: Path, repo: str, files_from: Path, commit: str = "0" * 40) -> None:
    """Lay files out as huggingface_hub's cache does: blobs named by sha256, snapshot symlinks, refs/main."""
    root = cache_dir / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for file in ("model.safetensors", "config.json"):
        digest = hashlib.sha256((files_from / file).read_bytes()).hexdigest()
        shutil.copy(files_from / file, root / "blobs" / digest)
        (root / "snapshots" / commit / file).symlink_to(Path("../../blobs") / digest)


class DieAt:
    """A Lightning callback that kills the process mid-epoch, as a pre-emption or OOM kill would."""

    def __new__(cls, epoch: int, batch: int):
        import os

        import lightning as L

        class _DieAt(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch_data, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    os._exit(3)

        return _DieAt()


class SigtermAt:
    """A Lightning callback that sends this process SIGTERM mid-epoch, as SLURM does before preempting a job."""

    def __new__(cls, epoch: int, batch: int):
        import os
        import signal

        import lightning as L

        class _SigtermAt(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch_data, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    os.kill(os.getpid(), signal.SIGTERM)

        return _SigtermAt()


def classifier_of(module, tokenization: dict, precision: str = "fp32"):
    """The inference object for an in-memory SpamClassifier (what Classifier.load builds from its checkpoint)."""
    from spamclf.inference import Classifier
    from spamclf.precision import resolve

    return Classifier(module.model, module.readout, module.decision, tokenization, resolve(precision),
                      torch.device("cpu"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(url, body=None, raw=None, timeout=30, headers=None):
    """(status, JSON or text) of a GET (no body) or a JSON POST; HTTP errors answered, not raised."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
            return response.status, (json.loads(payload or b"null")
                                     if response.headers.get_content_type() == "application/json" else payload.decode())
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload)
        except ValueError:
            return e.code, payload.decode(errors="replace")


def start_server(args: list[str], log_path: Path, cwd: Path, wait_s: float = 180):
    """`python -m spamclf.serve ARGS --port P` in its own session; returns (base URL, process) once /health is 200."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "spamclf.serve", *args, "--port", str(port)], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if http_request(base + "/health", timeout=2)[0] == 200:
                return base, proc
        except OSError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"server not healthy within {wait_s:.0f} s")


def stop_server(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def message(subject: str | None, body: str | None = None, **headers) -> EmailMessage:
    """A mail message; `headers` with "_" for "-" (Reply_To)."""
    msg = EmailMessage()
    if subject is not None:
        msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    if body is not None:
        msg.set_content(body)
    return msg


def write_eml(path: Path, msg: EmailMessage | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msg if isinstance(msg, bytes) else msg.as_bytes())
    return path
