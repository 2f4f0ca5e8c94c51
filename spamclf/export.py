"""Hand a trained classifier to the tools people already use: a Hugging Face folder or an ONNX file.

    python -m spamclf.export --ckpt CKPT --out DIR --format hf     # transformers' GPT2ForSequenceClassification
    python -m spamclf.export --ckpt CKPT --out DIR --format onnx   # DIR/model.onnx for ONNX Runtime
    python -m spamclf.export --ckpt CKPT --out DIR --format onnx --quantize int8   # int8 weights, ~4x smaller

hf: `AutoModelForSequenceClassification.from_pretrained(DIR)` and `pipeline("text-classification", model=DIR)`
load it as it is. transformers' GPT-2 classifier reads the last non-padding token through a `score` layer
without bias, so runs with `model.pooling=last_nonpad` export exactly: the head's bias is folded into the
final LayerNorm's shift (W·(β+δ) = W·β + b with δ = Wᵀ(WWᵀ)⁻¹b, exact when W has full row rank), and a
calibration temperature into the score weights. LoRA adapters are merged into their layers first.

onnx: inputs `input_ids` [batch, length] (int64, right-padded with <|endoftext|> = 50256 as the run padded:
to `pad_length` when the model's metadata gives one, else to any width) and `lengths` [batch] (real tokens per
row); output `logits` [batch, classes] (temperature applied). The metadata holds the label names, the
tokenization (padding rule, truncation, mail headers), the pooling, the decision and the checkpoint it came from;
`spamclf.onnx_classifier` runs it without torch.
`--quantize int8` stores the linear layers' weights as int8 (dynamic quantization) and compares the int8 graph's
labels with the checkpoint's on the run's validation split (`validation.csv` beside `checkpoints/`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

import spamclf
from spamclf.agreement import report_agreement
from spamclf.errors import SpamclfError
from spamclf.inference import Classifier
from spamclf.io import atomic_folder

FORMATS = ("hf", "onnx")
QUANTIZE = ("int8",)


def _merged_body(clf: Classifier) -> nn.Module:
    """The classifier's GPT-2 with any LoRA adapters merged into plain nn.Linear layers (a copy)."""
    import copy

    body = copy.deepcopy(clf.model).eval()
    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "base_layer") and hasattr(child, "merge"):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return body


def _check_exportable_to_hf(clf: Classifier) -> None:
    if clf.readout.pooling != "last_nonpad":
        raise SpamclfError(f"the checkpoint pools with model.pooling={clf.readout.pooling}; transformers' GPT-2 "
                           "classifier reads the last non-padding token: train with model.pooling=last_nonpad to "
                           "export it (or use --format onnx)")
    if not clf.readout.causal:
        raise SpamclfError("the checkpoint was trained with model.causal=false; transformers' GPT-2 is causal: "
                           "use --format onnx")


def hf_state_dict(clf: Classifier) -> dict[str, torch.Tensor]:
    """GPT2ForSequenceClassification's tensors for a last_nonpad classifier: the body in Hugging Face's layout,
    the head's bias folded into ln_f's shift, the temperature into `score`."""
    from spamclf.weights import to_hf_state_dict

    body = _merged_body(clf)
    state = to_hf_state_dict(body)
    weight = body.out_head.weight.detach().double()
    bias = (body.out_head.bias.detach().double() if body.out_head.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64))
    delta = weight.T @ torch.linalg.solve(weight @ weight.T, bias)  # the least-norm δ with W·δ = b
    if not torch.allclose(weight @ delta, bias, atol=1e-6):
        raise SpamclfError("the classification head has dependent rows, so its bias cannot be folded exactly; "
                           "use --format onnx")
    state["transformer.ln_f.bias"] = (state["transformer.ln_f.bias"].double() + delta).float()
    state["score.weight"] = (weight / clf.decision.temperature).float().contiguous()
    return state


def export_hf(clf: Classifier, out: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import GPT2Config

    from spamclf.tokenizer import ENDOFTEXT, PAD_ID, asset_path

    _check_exportable_to_hf(clf)
    cfg, names, width = clf.model.cfg, clf.label_names, clf.width
    with atomic_folder(out) as tmp:
        config = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, layer_norm_epsilon=cfg.layer_norm_eps, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            pad_token_id=PAD_ID, bos_token_id=PAD_ID, eos_token_id=PAD_ID,
            architectures=["GPT2ForSequenceClassification"],
        )
        config.spamclf = {"positive_label": clf.decision.positive_label, "threshold": clf.decision.threshold,
                          "max_length": width, "truncation": clf.truncation}
        config.save_pretrained(tmp)
        save_file(hf_state_dict(clf), tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(asset_path("encoder.json"), tmp / "vocab.json")
        shutil.copy(asset_path("vocab.bpe"), tmp / "merges.txt")
        # The BPE files as they are (transformers builds its GPT-2 tokenizer from them), padding with <|endoftext|>.
        special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
        # transformers cuts one end only: "left" keeps the tail; head_tail has no equivalent and cuts as head does
        side = "left" if clf.truncation == "tail" else "right"
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "model_max_length": width, "add_prefix_space": False,
             "truncation_side": side, **special}, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


class _OnnxClassifier(nn.Module):
    def __init__(self, clf: Classifier):
        super().__init__()
        self.model, self.readout, self.temperature = clf.model, clf.readout, clf.decision.temperature

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.readout.logits(self.model, input_ids, lengths) / self.temperature


def onnx_metadata(clf: Classifier, quantization: str) -> dict[str, str]:
    """What a graph needs besides its tensors to classify as the checkpoint does (read by `spamclf.onnx_classifier`)."""
    from spamclf.io import file_sha256

    source = {**clf.about, "sha256": file_sha256(clf.about["checkpoint"])} if clf.about.get("checkpoint") else clf.about
    readout = {"pooling": clf.readout.pooling, "causal": clf.readout.causal, "pooled_only": clf.readout.pooled_only}
    return {"label_names": json.dumps(clf.label_names), "padding": json.dumps(clf.tokenization),
            "positive_label": clf.decision.positive_label, "threshold": str(clf.decision.threshold),
            "decision": json.dumps(clf.decision.as_dict()), "pad_id": "50256", "readout": json.dumps(readout),
            "context_length": str(clf.model.cfg.context_length), "quantization": quantization,
            "source": json.dumps(source, default=str)}


def trace_onnx(clf: Classifier, path: Path) -> None:
    """The classifier as an fp32 ONNX graph at `path` (torch.onnx.export, dynamo): dynamic batch, and dynamic
    length unless the run padded to a fixed width."""
    wrapper = _OnnxClassifier(clf)
    tokenization = clf.tokenization
    width = tokenization.get("pad_length") or 16
    example = (torch.full((2, width), 50256, dtype=torch.long), torch.tensor([width, max(1, width // 2)]))
    batch, length = (torch.export.Dim("batch", min=1),
                     torch.export.Dim("length", min=1, max=clf.model.cfg.context_length))
    dynamic = {"input_ids": {0: batch} if tokenization.get("pad_length") else {0: batch, 1: length},
               "lengths": {0: batch}}
    program = torch.onnx.export(wrapper, example, input_names=["input_ids", "lengths"], output_names=["logits"],
                                dynamic_shapes=dynamic, dynamo=True, verbose=False)
    program.save(str(path))


def quantize_int8(path: Path) -> None:
    """Dynamic int8 weights in place (ONNX Runtime's `quantize_dynamic`): the MatMuls with constant weights (every
    linear layer) get int8 weights and quantize their activations per batch; attention's activation-by-activation
    MatMuls and the embeddings stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("fp32.onnx")
    path.rename(fp32)
    quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     extra_options={"MatMulConstBOnly": True})
    fp32.unlink()


def write_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def export_onnx(clf: Classifier, out: Path, quantize: str | None = None) -> Path:
    with atomic_folder(out) as tmp:
        trace_onnx(clf, tmp / "model.onnx")
        if quantize == "int8":
            quantize_int8(tmp / "model.onnx")
        write_metadata(tmp / "model.onnx", onnx_metadata(clf, quantize or "none"))
        if quantize:
            report_agreement(clf, tmp / "model.onnx")
    return out / "model.onnx"


def checkpoint_classifier(path: str) -> Classifier:
    """The torch classifier of --ckpt at fp32, the precision every export computes in."""
    if Path(path).suffix.lower() == ".onnx":
        raise SpamclfError(f"{path}: an exported graph is not exported again; pass the .ckpt it came from (fix --ckpt)")
    return spamclf.load(path, precision="fp32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spamclf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--out", required=True, help="folder to create (hf: the model folder; onnx: holds model.onnx)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--quantize", choices=QUANTIZE, help="onnx only: int8 = dynamic int8 weights (ONNX Runtime)")
    args = parser.parse_args(argv)
    try:
        if args.quantize and args.format != "onnx":
            raise SpamclfError(f"--quantize {args.quantize} applies to --format onnx only; drop --quantize or use "
                               "--format onnx")
        clf = checkpoint_classifier(args.ckpt)
        written = (export_hf(clf, Path(args.out)) if args.format == "hf"
                   else export_onnx(clf, Path(args.out), args.quantize))
    except SpamclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e.name} is not installed; pip install 'spamclf[export]'", file=sys.stderr)
        return 2
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
