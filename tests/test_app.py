import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from spamclf.datamodule import SpamDataModule
from spamclf.gpt2 import PRESETS
from spamclf.pipeline import main, run
from tests.helpers import CONF, QUIET, ROOT, TINY, compose_cfg, train_cli  # noqa: F401 (QUIET: other tests' import)

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))


def test_every_model_size_and_trainer_preset_composes(tmp_path):
    assert {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny"} <= set(MODELS)
    assert {"default", "cpu", "gpu", "mps", "ddp", "ddp_sim"} <= set(TRAINERS)
    for model in MODELS:
        for trainer in TRAINERS:
            cfg = compose_cfg([f"model={model}", f"trainer={trainer}"], tmp_path)
            assert cfg.model._target_ == "spamclf.module.SpamClassifier" and cfg.model.model_name in PRESETS
            assert cfg.model.weights == ("random" if model == "gpt2-tiny" else "pretrained")
            assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
            assert cfg.data._target_ == "spamclf.datamodule.SpamDataModule"
            assert cfg.model.label_names == cfg.data.labels  # interpolated from the data config
    cfg = compose_cfg(["trainer=ddp_sim"], tmp_path)
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.process_group_backend == "gloo"


def test_users_overrides_compose(tmp_path):
    cfg = compose_cfg(["model=gpt2-medium", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                       "model.trainable_layers=all", "data.padding=batch", "data.path=my.csv", "seed=7"], tmp_path)
    assert (cfg.model.model_name, cfg.trainer.accelerator, cfg.model.trainable_layers) == ("gpt2-medium", "gpu", "all")
    assert cfg.data.seed == 7 and cfg.data.path == "my.csv"
    csv_cfg = compose_cfg(["data=csv", "data.path=x.csv", "data.labels=[a,b,c]"], tmp_path)
    assert csv_cfg.model.label_names == ["a", "b", "c"]
    assert csv_cfg.data.balance is False and csv_cfg.data.reader == "exact"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_data_config_is_valid(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", "data.output_dir=null"], tmp_path)
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)  # validates padding/batch-size combinations without reading data
    assert isinstance(dm, SpamDataModule)
    assert cfg.trainer.max_epochs == 5 and cfg.seed == 123


def test_table_rows_say_what_the_book_did(tmp_path):
    rows = {e.split("/")[1]: compose_cfg([f"experiment={e}"], tmp_path) for e in EXPERIMENTS if e.startswith("table/")}
    assert len(rows) == 19
    assert rows["row01"].model.trainable_layers == "last_block" and rows["row01"].data.padding == "longest_train"
    assert rows["row02"].model.pooling == "first" and rows["row03"].model.trainable_layers == "head"
    assert [rows[f"row0{i}"].model.model_name for i in (6, 7, 8)] == ["gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert rows["row10"].model.weights == "random" and rows["row10"].model.trainable_layers == "all"
    assert rows["row12"].model.trainable_layers == "lora" and rows["row12"].model.model_name == "gpt2-xl"
    assert rows["row13"].data.padding == "model" and rows["row14"].data.batch_size == 1
    assert rows["row15"].trainer.accumulate_grad_batches == 8 and rows["row16"].model.causal is False
    assert rows["row18"].model.pooling == "mean" and rows["row19"].model.pooling == "last_nonpad"
    fast = compose_cfg(["experiment=fast"], tmp_path)
    settings = (fast.data.padding, fast.data.bucket, fast.model.pooling, fast.trainer.precision)
    assert settings == ("batch", True, "last_nonpad", "auto")


def test_early_stopping_is_one_switch_away(tmp_path):
    assert "early_stopping" not in compose_cfg([], tmp_path).callbacks
    cfg = compose_cfg(["callbacks=with_early_stopping"], tmp_path)
    assert cfg.callbacks.early_stopping.monitor == "val/acc" and "model_checkpoint" in cfg.callbacks


@pytest.mark.hardware
def test_smoke_run_writes_a_complete_run_folder(tmp_path):
    cfg = compose_cfg([*TINY[:-1], "trainer.max_epochs=2"], tmp_path)
    summary = run(cfg)
    for name in ("train.csv", "validation.csv", "test.csv", "metrics.json", "plots/loss.png", "plots/accuracy.png",
                 "plots/confusion_matrix.png", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"train", "val", "test", "best_checkpoint", "timings", "objective"}
    assert Path(metrics["best_checkpoint"]).is_file()
    assert metrics["best_checkpoint"] != str(tmp_path / "checkpoints/last.ckpt")
    assert metrics["objective"]["value"] == pytest.approx(metrics["val"]["acc"], abs=1e-6)  # best checkpoint re-scored
    assert metrics["val"]["acc"] > 0.85 and metrics["test"]["acc"] > 0.85
    assert metrics["timings"]["fit_s"] > 0 and summary["overlap_with_train"]["test"] > 0
    assert metrics["precision"] == {"requested": "32-true", "used": "32-true", "reason": "set explicitly"}
    assert metrics["data_protocol"] == "book"  # the default: the SMS file read as the book reads it

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    expected = {"train/loss_step", "val/acc", "val/f1_macro", "test/acc", "test/fpr", "test/f1", "lr-AdamW"}
    assert expected <= set(tags["scalars"])
    assert "test/confusion_matrix" in tags["images"]
    assert any(t.startswith("test/pr_curve/spam") for t in tags["tensors"])


@pytest.mark.hardware
def test_fast_experiment_chooses_its_precision_and_says_so(tmp_path, caplog_info):
    from spamclf.precision import resolve

    expected = resolve("auto", "cpu")
    summary = run(compose_cfg(["experiment=fast", *TINY, "trainer.limit_train_batches=20"], tmp_path))
    assert summary["precision"] == {"requested": "auto", "used": expected.lightning, "reason": expected.reason}
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"]["used"] == expected.lightning
    assert any(f"precision auto -> {expected.lightning}" in r.getMessage() for r in caplog_info.records)
    assert summary["val"]["acc"] > 0.5


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.trainable_layers=most", "model.trainable_layers='most' is not valid; choose one of head, last_block"),
        ("data.padding=wide", "data.padding='wide' is not valid; choose one of longest_train, batch"),
        ("data.reader=pandas", "data.reader='pandas' is not valid; choose one of book, exact"),
        ("model.pooling=max", "model.pooling='max' is not valid"),
        ("data.path=/no/such/file.csv", "/no/such/file.csv: file not found"),
        ("ckpt_path=/no/such.ckpt", "/no/such.ckpt: checkpoint not found"),
        ("+model.colour=red", "model: "),
        ("model.scheduler.schedule=linear", "model.scheduler.schedule='linear' is not valid; choose one of constant"),
    ],
)
def test_user_mistakes_end_in_one_line_and_leave_no_run_folder(override, match, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = compose_cfg([*TINY, override], out)
    with pytest.raises(SystemExit) as info:
        main(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("override, new_key", [("model.lr=1e-4", "model.optimizer.lr=1e-4"),
                                               ("model.weight_decay=0", "model.optimizer.weight_decay=0"),
                                               ("model.warmup_steps=10", "model.scheduler.warmup_steps=10"),
                                               ("model.scheduler=cosine", "model.scheduler.schedule=cosine"),
                                               ("model.cache_dtype=bf16", "model.prefix_cache.dtype=bf16"),
                                               ("model.cache_max_memory_mb=0", "model.prefix_cache.max_memory_mb=0")])
def test_moved_keys_end_in_one_line_naming_the_new_key_which_works(override, new_key, tmp_path):
    proc = train_cli(["-m", *TINY, override, "seed=1,2"], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {override.split('=')[0]} ") and new_key in proc.stderr, proc.stderr
    from hydra.utils import instantiate

    model = instantiate(compose_cfg([*TINY, new_key], tmp_path).model, label_names=["ham", "spam"])
    key, value = new_key.split("=")
    if key.startswith("model.optimizer."):
        assert model.optimizer_factory.keywords[key.split(".")[-1]] == float(value)
    elif key.startswith("model.scheduler."):
        assert model.scheduler_factory.keywords[key.split(".")[-1]] == (int(value) if value.isdigit() else value)
    else:
        assert model.hparams.prefix_cache[key.split(".")[-1]] == (float(value) if value.isdigit() else value)


def test_any_torch_optimizer_and_no_scheduler_from_config(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg([*TINY, "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.01",
                       "+model.optimizer.momentum=0.9", "model.scheduler=null", "model.prefix_cache=false"], tmp_path)
    model = instantiate(cfg.model, label_names=["ham", "spam"])
    optimizer = model.configure_optimizers()  # without a scheduler: no trainer needed, the optimizer alone
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert model.hparams.prefix_cache["enabled"] is False


def test_the_pipeline_writes_no_other_objects_attributes():
    """pipeline.py builds and calls; it sets no attribute of another object (x.y = ..., setattr), except inside the
    one shim that makes Lightning's DDP restart join a multirun job. Nothing in spamclf reads trainer.datamodule."""
    import ast

    tree = ast.parse((ROOT / "spamclf" / "pipeline.py").read_text())
    shim = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_ddp_ranks_join_this_job")
    allowed = {id(n) for n in ast.walk(shim)}
    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                   if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store) and id(part) not in allowed:
                    found.append(f"line {part.lineno}: {ast.unparse(part)} = ...")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and id(node) not in allowed:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not found, found
    assert "sys.argv = " in ast.unparse(shim)  # the shim is where the assignment this test exempts lives
    readers = [p.name for p in (ROOT / "spamclf").glob("*.py") if "trainer.datamodule" in p.read_text()]
    assert not readers, readers


def test_cli_default_pretrained_offline_stops_with_one_clear_line(tmp_path):
    proc = train_cli(["trainer.accelerator=cpu"], tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pretrained weights openai-community/gpt2") and "model.weights_path" in last
    assert not list(tmp_path.rglob("metrics.json")) and not list((tmp_path / "train" / "runs").glob("*"))


def test_cli_unknown_model_lists_the_choices(tmp_path):
    proc = train_cli(["model=gpt2-huge"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "gpt2-huge" in proc.stderr and "gpt2-medium" in proc.stderr


@pytest.mark.hardware
def test_cli_multirun_prints_and_writes_a_sorted_summary(tmp_path):
    proc = train_cli(["-m", *TINY, "model.trainable_layers=all,head", "test=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = next((tmp_path / "train" / "multiruns").glob("*/summary.csv"))
    lines = summary.read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("job,overrides,val/acc")
    scores = [float(line.split(",")[2]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)
    assert "runs by val/acc" in proc.stdout


def test_cli_ddp_sim_runs_two_processes_into_one_run_folder(tmp_path):
    proc = train_cli([*TINY, "trainer=ddp_sim", "trainer.enable_progress_bar=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["test"]["acc"] > 0.8
    assert "world_size: 2" in proc.stderr or "distributed_backend=gloo" in proc.stderr + proc.stdout


def test_cli_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    common = [*TINY[:-1], "trainer.max_epochs=2"]
    whole = train_cli([*common, f"hydra.run.dir={tmp_path}/whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = train_cli([*common, f"hydra.run.dir={tmp_path}/killed", "+callbacks.die._target_=tests.helpers.DieAt",
                   "+callbacks.die.epoch=1", "+callbacks.die.batch=40"], tmp_path)
    assert killed.returncode == 3 and (tmp_path / "killed/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "killed/metrics.json").exists()
    resumed = train_cli([*common, f"hydra.run.dir={tmp_path}/killed", "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "whole/metrics.json").read_text())
    b = json.loads((tmp_path / "killed/metrics.json").read_text())
    for split in ("train", "val", "test"):
        for name in ("acc", "loss"):
            assert b[split][name] == pytest.approx(a[split][name], abs=1e-6), (split, name)


def test_cli_optuna_search_scores_trials_on_validation(tmp_path):
    proc = train_cli([*TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.sampler.n_startup_trials=2", "trainer.limit_train_batches=20"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "train" / "multiruns").iterdir())
    assert (sweep / "optimization_results.yaml").is_file()
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0.0 < best.best_value <= 1.0
    assert all("test" not in json.loads(p.read_text()) for p in sweep.glob("*/metrics.json"))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run(compose_cfg([*TINY, "test=false"], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.hardware
def test_predict_cli_round_trip(trained_ckpt, tmp_path):
    messages = ["WINNER!! Claim your £1000 prize now, call 09061701461", "are we still on for lunch?", "", "x " * 3000]
    source = tmp_path / "in.csv"
    import csv

    with open(source, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([[i, m] for i, m in enumerate(messages)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "spamclf.predict", "--ckpt", str(trained_ckpt), "--input", str(source),
                           "--output", str(out), "--chunk-size", "3", "--precision", "fp32"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "precision fp32 -> fp32" in proc.stderr and "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == messages
    for r in rows:
        assert r["label"] in ("ham", "spam") and r["probability"] == max(r["probabilities"].values())
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    proc = subprocess.run([sys.executable, "-m", "spamclf.predict", "--ckpt", str(trained_ckpt), "--text", messages[0],
                           "--precision", "fp32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout)["probability"] == pytest.approx(rows[0]["probability"], abs=1e-6)
    from spamclf.precision import resolve

    auto = resolve("auto", "cpu").name
    proc = subprocess.run([sys.executable, "-m", "spamclf.predict", "--ckpt", str(trained_ckpt), "--text", messages[0]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"precision auto -> {auto}" in proc.stderr
    assert json.loads(proc.stdout)["probability"] == pytest.approx(rows[0]["probability"], abs=0.02)
    bad = subprocess.run([sys.executable, "-m", "spamclf.predict", "--ckpt", str(tmp_path / "missing.ckpt"),
                          "--text", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.ckpt'}: checkpoint not found; pass the .ckpt a training run wrote "
        f"(its checkpoints/ folder)"]


@pytest.mark.hardware
def test_a_message_gets_the_same_probability_alone_or_with_long_ones(trained_ckpt):
    from spamclf.inference import Classifier

    model = Classifier.load(trained_ckpt, precision="fp32")
    text = "Free entry in 2 a wkly comp to win FA Cup final tkts"
    alone = model.predict([text])[0].probability
    crowd = model.predict(["a much longer message " * 20, text, "hi"])[1].probability
    assert crowd == pytest.approx(alone, abs=1e-6)


def test_train_false_evaluates_a_checkpoint(trained_ckpt, tmp_path):
    summary = run(compose_cfg([*TINY, "train=false", f"ckpt_path={trained_ckpt}"], tmp_path / "eval"))
    assert summary["best_checkpoint"] == str(trained_ckpt)
    assert set(summary) >= {"train", "val", "test"} and summary["test"]["acc"] > 0.85
    assert (tmp_path / "eval" / "metrics.json").is_file() and not (tmp_path / "eval" / "checkpoints").exists()
