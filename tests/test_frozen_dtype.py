"""A bf16-mixed run keeps the frozen linear layers in bf16 (`spamclf.heads.frozen_linears_to`): the same logits under
bf16 autocast, half their memory, and checkpoints that still predict in fp32."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from spamclf.gpt2 import Packed, real_tokens
from spamclf.heads import Readout, classifier_network, frozen_linears_to
from spamclf.inference import Classifier
from spamclf.kernels import onednn_bf16_inference
from spamclf.module import DataHandOver, SpamClassifier


def _logits(model, readouts, ids, lengths) -> list[torch.Tensor]:
    """Class logits under bf16 autocast for each readout, plus the frozen prefix through oneDNN and packed rows."""
    depth = len(model.trf_blocks) - 1
    keep = real_tokens(lengths, ids.shape[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = [r.logits(model, ids, lengths) for r in readouts]
        with onednn_bf16_inference(model, depth):
            hidden = model.run_blocks(model.embed(ids), stop=depth)
            packed = model.run_blocks(model.embed(ids)[keep], stop=depth, packed=Packed.of(keep))
        out += [hidden, packed, readouts[0].logits(model, ids, lengths, hidden, depth)]
    return [t.float() for t in out]


@pytest.mark.parametrize("policy", ["last_block", "head"])
def test_bf16_frozen_linears_compute_what_autocast_computed(policy):
    torch.manual_seed(0)
    model = classifier_network("gpt2-tiny", 2, weights="random", trainable_layers=policy).eval()
    ids, lengths = torch.randint(0, 50000, (4, 13)), torch.tensor([13, 5, 1, 9])
    readouts = [Readout("last_nonpad"), Readout("last_nonpad", pooled_only=False), Readout("mean"), Readout("last")]
    before = _logits(model, readouts, ids, lengths)
    linears = [getattr(parent, name) for b in model.trf_blocks for parent, name, _ in b.linears()]
    frozen = [fc for fc in linears if not any(p.requires_grad for p in fc.parameters())]
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}

    freed = frozen_linears_to(model, torch.bfloat16)

    assert freed == 2 * sum(p.numel() for fc in frozen for p in fc.parameters()) > 0
    assert all(p.dtype == torch.bfloat16 for fc in frozen for p in fc.parameters())
    assert {n: p.dtype for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.tok_emb.weight.dtype == model.trf_blocks[0].norm1.weight.dtype == torch.float32
    for a, b in zip(before, _logits(model, readouts, ids, lengths)):
        assert torch.equal(a, b)
    assert frozen_linears_to(model, torch.bfloat16) == 0  # again: nothing left to convert


def test_a_bf16_run_stores_frozen_linears_in_bf16_and_its_checkpoint_predicts_in_fp32(sms_module, tmp_path):
    torch.manual_seed(0)
    module = SpamClassifier("gpt2-tiny", weights="random", pooling="last_nonpad")
    qkv = module.model.trf_blocks[0].att.qkv
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[DataHandOver(sms_module, "bf16-mixed")])
    trainer.fit(module, datamodule=sms_module)
    assert qkv.weight.dtype == torch.bfloat16 and module.model.trf_blocks[-1].att.qkv.weight.dtype == torch.float32
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state["model.trf_blocks.0.att.qkv.weight"].dtype == torch.bfloat16
    assert state["model.out_head.weight"].dtype == torch.float32

    texts = ["hi", "Free entry in 2 a wkly comp", "WINNER!! claim your prize now " * 3]
    fp32 = Classifier.load(path, precision="fp32")
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())
    bf16 = Classifier.load(path, precision="bf16")
    for a, b in zip(fp32.predict(texts), bf16.predict(texts)):
        assert a.probabilities["spam"] == pytest.approx(b.probabilities["spam"], abs=0.02)


def test_an_fp32_run_leaves_every_weight_in_fp32(sms_module):
    module = SpamClassifier("gpt2-tiny", weights="random", pooling="last_nonpad")
    module.use_data(sms_module.prepared(), "32-true")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    module.use_data(sms_module.prepared(), "bf16-mixed")
    assert module.model.trf_blocks[0].ff.layers[0].weight.dtype == torch.bfloat16
