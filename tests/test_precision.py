"""The hardware switch (spamclf.precision, spamclf.kernels): precision auto, native-bf16 detection and its override,
the oneDNN kernels and their plain fallback, progress bars. `.ci/run` runs this file again with SPAMCLF_NATIVE_BF16=0,
so a CPU with native bf16 also exercises the path of CPUs without it."""

import io
import logging

import pytest
import torch
from rich.console import Console

from spamclf import precision
from spamclf.errors import InvalidOption, SpamclfError
from spamclf.gpt2 import GPT2, TransformerBlock, preset
from spamclf.kernels import OneDNNLinear, _onednn_ops, onednn_bf16_inference, onednn_kernels
from spamclf.module import SpamClassifier
from spamclf.precision import NATIVE_BF16_ENV, _onednn_bf16_supported, cpu_native_bf16, resolve
from spamclf.progress import progress_bar
from tests.helpers import classifier_of

pytestmark = pytest.mark.hardware
needs_onednn = pytest.mark.skipif(not onednn_kernels(), reason="no native bf16 here (or SPAMCLF_NATIVE_BF16=0): "
                                  "oneDNN's bf16 kernels are not used")


def test_the_switch_overrides_detection(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert not cpu_native_bf16() and not onednn_kernels()
    choice = resolve("auto", "cpu")
    assert choice.lightning == "32-true" and f"{NATIVE_BF16_ENV}=0" in choice.reason
    assert resolve("auto", torch.device("cpu")).dtype is None and choice.name == "fp32"
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert cpu_native_bf16() and resolve("auto", "cpu").lightning == "bf16-mixed"
    assert resolve("auto", torch.device("cpu")).dtype == torch.bfloat16
    # forcing never enables kernels oneDNN lacks
    assert onednn_kernels() == (precision.cpu().onednn_bf16 and _onednn_ops() is not None)
    monkeypatch.setenv(NATIVE_BF16_ENV, "maybe")
    with pytest.raises(SpamclfError, match=f"{NATIVE_BF16_ENV}='maybe' is not valid"):
        cpu_native_bf16()


def test_auto_without_the_switch_follows_the_cpu(monkeypatch):
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)
    info = precision.cpu()
    native = info.bf16_flag is not None and info.onednn_bf16
    choice = resolve("auto", "cpu")
    assert choice.lightning == ("bf16-mixed" if native else "32-true")
    assert info.capability in choice.reason and ("natively" if native else "no native bf16") in choice.reason


def test_gpus_get_bf16_or_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    for supported, expected in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        for accelerator in ("gpu", "cuda", "auto"):
            assert resolve("auto", accelerator).lightning == expected
        assert resolve("auto", torch.device("cuda")).dtype == (torch.bfloat16 if supported else torch.float16)
    assert resolve("auto", "mps").lightning == "32-true"
    assert resolve("16-mixed", "gpu").lightning == "16-mixed"  # explicit values pass through
    assert resolve("fp16", "cuda").lightning == "16-mixed" and resolve("fp32", "cpu").lightning == "32-true"


def test_explicit_bf16_on_a_cpu_without_it_runs_after_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    precision._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="spamclf.precision"):
        for _ in range(3):
            assert resolve("bf16-mixed", "cpu").lightning == "bf16-mixed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slower" in warnings[0] and "trainer.precision=auto" in warnings[0]
    with pytest.raises(InvalidOption, match="precision='fp8'"):
        resolve("fp8", torch.device("cpu"))


def test_private_torch_ops_are_where_the_code_expects_them():
    """Fails loudly when torch drops or renames the private oneDNN ops spamclf uses (written against torch 2.13.0)."""
    if torch.backends.mkldnn.is_available():
        assert hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"), (
            "torch.ops.mkldnn._is_mkldnn_bf16_supported is gone")
    if precision.cpu().bf16_flag and _onednn_bf16_supported():
        assert _onednn_ops() is not None, "torch.ops.mkldnn._linear_pointwise / _reorder_linear_weight are gone"
        weight = torch.randn(8, 16)
        packed = _onednn_ops()._reorder_linear_weight(weight.to(torch.bfloat16), 64)
        x = torch.randn(4, 16)
        y = _onednn_ops()._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "")
        assert y.shape == (4, 8) and torch.allclose(y.float(), x @ weight.T, atol=0.1, rtol=0.05)


def _frozen_tiny():
    torch.manual_seed(0)
    model = GPT2.random(preset("gpt2-tiny")).requires_grad_(False).eval()
    model.trf_blocks[-1].requires_grad_(True)  # trainable layers are never swapped
    return model


def test_without_native_bf16_the_kernels_stay_out_and_bf16_still_runs(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    model = _frozen_tiny()
    before = [type(m) for m in model.modules()]
    ids = torch.randint(0, 50000, (3, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.run_blocks(model.embed(ids))
        with onednn_bf16_inference(model):
            assert [type(m) for m in model.modules()] == before
            got = model.run_blocks(model.embed(ids))
    assert torch.equal(got, expected)


def test_fp32_never_swaps_kernels():
    model = _frozen_tiny()
    before = [type(m) for m in model.modules()]
    with onednn_bf16_inference(model):
        assert [type(m) for m in model.modules()] == before


@needs_onednn
def test_onednn_kernels_fuse_gelu_closer_to_fp32_and_leave_nothing_behind():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.trf_blocks = torch.nn.ModuleList([TransformerBlock(preset("gpt2-tiny"))])
    block = holder.trf_blocks[0].requires_grad_(False)
    ff = block.ff
    x = torch.randn(37, 64)
    truth = ff(x)
    originals = list(ff.layers)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ff(x).float()
        with onednn_bf16_inference(holder):
            assert (isinstance(ff.layers[0], OneDNNLinear) and ff.layers[0].gelu
                    and isinstance(ff.layers[1], torch.nn.Identity))
            assert isinstance(block.att.qkv, OneDNNLinear)
            fused = ff(x).float()
    assert list(ff.layers) == originals and type(block.att.qkv) is torch.nn.Linear
    assert (fused - truth).abs().max() < 0.05
    assert (fused - truth).abs().mean() <= (plain - truth).abs().mean() * 1.1


@needs_onednn
def test_onednn_kernels_match_the_plain_bf16_model():
    model = _frozen_tiny()
    ids = torch.randint(0, 50000, (3, 11))
    with torch.no_grad():
        truth = model.run_blocks(model.embed(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model.run_blocks(model.embed(ids)).float()
            with onednn_bf16_inference(model):
                assert type(model.trf_blocks[0].att.qkv) is OneDNNLinear
                assert type(model.trf_blocks[-1].att.qkv) is torch.nn.Linear  # trainable: untouched
                fast = model.run_blocks(model.embed(ids)).float()
    scale = truth.abs().max()
    assert (fast - truth).abs().max() < 0.05 * scale and (plain - truth).abs().max() < 0.05 * scale


def test_prediction_at_auto_agrees_with_fp32():
    torch.manual_seed(0)
    clf = SpamClassifier("gpt2-tiny", weights="random", pooling="last_nonpad").eval()
    tokenization = {"pad_length": None, "context_length": 1024}
    texts = ["hi", "Free entry in 2 a wkly comp", "", "WINNER!! claim your prize now " * 3]
    fp32 = classifier_of(clf, tokenization, "fp32").predict(texts)
    auto = classifier_of(clf, tokenization, "auto").predict(texts)
    exact = resolve("auto", "cpu").dtype is None
    for a, b in zip(auto, fp32):
        assert a.probabilities["spam"] == pytest.approx(b.probabilities["spam"], abs=0 if exact else 0.02)


def test_progress_bar_draws_on_a_terminal_only():
    screen = io.StringIO()
    with progress_bar("prefix cache (train)", 10,
                      console=Console(file=screen, force_terminal=True, width=100)) as advance:
        for _ in range(10):
            advance(1)
    assert "prefix cache (train)" in screen.getvalue()
    quiet = io.StringIO()
    with progress_bar("x", 10, console=Console(file=quiet, force_terminal=False)) as advance:
        advance(10)
    with progress_bar("y", 10, enabled=False, console=Console(file=quiet, force_terminal=True)) as advance:
        advance(10)
    assert quiet.getvalue() == ""


def test_cache_build_reports_every_row(sms_module):
    from spamclf.cache import PrefixCache

    model = _frozen_tiny()
    done = []
    dataset = sms_module.datasets["val"]
    PrefixCache.build(model, dataset, None, 1, "last_nonpad", False, dtype=torch.float32, device=torch.device("cpu"),
                      tokens_per_batch=256, progress=done.append)
    assert sum(done) == len(dataset) and len(done) > 1


@needs_onednn
def test_kept_kernels_are_made_once_and_give_the_same_numbers():
    model = _frozen_tiny()
    ids = torch.randint(0, 50000, (3, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with onednn_bf16_inference(model, keep=True):
            first = model.trf_blocks[0].att.qkv
            a = model.run_blocks(model.embed(ids))
        assert type(model.trf_blocks[0].att.qkv) is torch.nn.Linear  # restored between calls
        with onednn_bf16_inference(model, keep=True):
            assert model.trf_blocks[0].att.qkv is first  # not prepacked again
            b = model.run_blocks(model.embed(ids))
        with onednn_bf16_inference(model):
            assert model.trf_blocks[0].att.qkv is not first  # without keep: fresh, and dropped after
    assert torch.equal(a, b)
