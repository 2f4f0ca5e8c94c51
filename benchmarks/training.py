"""The training cases: the real pipeline (ch06, fast, all_layers, the ablations) and the peer, a plain
transformers loop of the book's recipe."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks import STARTED
from benchmarks.cases import TRAIN_CASES
from benchmarks.profiler import STEP_FILE, read_profile

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str], out: Path):
    from hydra import compose, initialize_config_dir

    from spamclf.errors import SpamclfError

    conf = ROOT / "conf"
    if not conf.is_dir():
        raise SpamclfError(f"{conf} not found; run the benchmark from a source checkout")
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={out}", f"paths.log_dir={out}",
                                           "paths.root_dir=."])


def _token_counts(cfg) -> dict:
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, output_dir=None)
    dm.setup()
    train = dm.datasets["train"].lengths
    used = len(train) // cfg.data.batch_size * cfg.data.batch_size  # drop_last
    real = {s: sum(dm.datasets[s].lengths) for s in ("train", "val", "test")}
    return {"train_examples": used, "batch_size": cfg.data.batch_size, "real": real, "pad_length": dm.pad_length,
            "sizes": {s: len(dm.datasets[s]) for s in real}}


def gpt_sizes(model_name: str) -> dict:
    from spamclf.gpt2 import preset

    cfg = preset(model_name)
    block = 12 * cfg.emb_dim**2 + 13 * cfg.emb_dim  # the linear weights and biases of one block (+ norms)
    return {"block": block, "layers": cfg.n_layers, "emb_dim": cfg.emb_dim}


def _profilers(folder: str) -> list[str]:
    """Overrides that profile a run's steps into `folder`: by part (StepProfile, StepMarks) and by op (OpProfile)."""
    return ["+trainer.profiler._target_=benchmarks.profiler.StepMarks",
            "+callbacks.steps._target_=benchmarks.profiler.StepProfile", f"+callbacks.steps.dirpath={folder}",
            "+callbacks.ops._target_=benchmarks.profiler.OpProfile", f"+callbacks.ops.dirpath={folder}",
            "+callbacks.ops.start=60"]


def _read_if_there(path: Path) -> dict | None:
    return read_profile(path) if path.is_file() else None


def run_overrides(args) -> list[str]:
    """What every training case sets: the model with random weights, nothing written but metrics.json, the book's
    splits only (train, validation and test), the device and the epochs."""
    return [f"model={args.model}", "model.weights=random", "callbacks=none", "logger=none", "data.natural=false",
            "trainer.enable_progress_bar=false", f"trainer.accelerator={args.accelerator}", "trainer.devices=1",
            f"trainer.max_epochs={args.epochs}"]


def case_facts(cfg, args) -> dict:
    """What the report needs to count a case's work: its tokens, the model's sizes and what runs and trains."""
    trainable, cache = cfg.model.trainable_layers, cfg.model.prefix_cache
    cached = bool(cache if isinstance(cache, bool) else cache.enabled) and trainable != "all"
    return {"tokens": _token_counts(cfg), "epochs": args.epochs, "model": args.model, "pooling": cfg.model.pooling,
            "trainable": trainable, "cached": cached, "sizes": gpt_sizes(args.model),
            "pooled_only": bool(cfg.model.pooled_only)}


def case_train(name: str, args) -> dict:
    """ch06, fast, all_layers or an ablation through the real pipeline (pipeline.run), random weights."""
    from spamclf.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*TRAIN_CASES[name], *run_overrides(args), *(_profilers(tmp) if args.profile else [])],
                      Path(tmp))
        summary = run(cfg)
        profile, ops = _read_if_there(Path(tmp) / STEP_FILE), _read_if_there(Path(tmp) / "ops-profile.json")
    wall = time.perf_counter() - STARTED
    facts = case_facts(cfg, args)  # the benchmark's own work: not part of the case's wall time
    return {"wall_s": wall, "bench_s": time.perf_counter() - STARTED - wall, "summary": summary,
            "profile": profile, "ops": ops, **facts, **device_facts(args)}


def device_facts(args) -> dict:
    """The card's name and this process's peak GPU memory, on GPU runs."""
    if args.accelerator != "gpu":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024**3}


def _peer_model(model_name: str, device):
    """transformers' GPT-2 (its default attention: SDPA) and a head; last block + ln_f + head trainable."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from spamclf.gpt2 import preset

    g = preset(model_name)
    config = GPT2Config(n_embd=g.emb_dim, n_layer=g.n_layers, n_head=g.n_heads, n_positions=g.context_length,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    body, head = GPT2Model(config).to(device), torch.nn.Linear(g.emb_dim, 2).to(device)
    body.requires_grad_(False)
    body.h[-1].requires_grad_(True)
    body.ln_f.requires_grad_(True)
    return body, head


def case_peer(args) -> dict:
    """A plain transformers GPT-2 loop, the book's recipe: last block + ln_f + head, last position, fp32,
    AdamW 5e-5 / 0.1, the same padded batches in the same order."""
    import torch

    from spamclf.datamodule import SpamDataModule

    torch.manual_seed(123)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    body, head = _peer_model(args.model, device)
    params = [p for p in (*body.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    dm = SpamDataModule()
    dm.setup()

    def logits(batch):
        return head(body(input_ids=batch["input_ids"].to(device)).last_hidden_state[:, -1])

    def accuracy(loader):
        body.eval()
        right = total = 0
        with torch.inference_mode():
            for batch in loader:
                right += int((logits(batch).argmax(-1).cpu() == batch["labels"]).sum())
                total += len(batch["labels"])
        body.train()
        return right / total

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(logits(batch), batch["labels"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy(dm.val_dataloader())
    fit = time.perf_counter() - t0
    test_acc = accuracy(dm.test_dataloader())
    return {"wall_s": time.perf_counter() - STARTED, "fit_s": fit, "test_acc": test_acc, "epochs": args.epochs,
            **device_facts(args)}
