"""The package's shape: the inference side imports no training framework, no import cycle anywhere, short
functions. These hold the layout docs/design.md describes."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spamclf"
BENCHMARKS = PACKAGE.parent / "benchmarks"
TRAINING_FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "torchmetrics", "omegaconf")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("module", ["spamclf.inference", "spamclf.predict", "spamclf.decision", "spamclf.batching",
                                    "spamclf.classifier"])
def test_the_inference_side_imports_no_training_framework(module):
    assert not _imported_after(f"import {module}") & set(TRAINING_FRAMEWORKS)


def test_decisions_batch_plans_and_the_inference_base_need_no_torch():
    assert "torch" not in _imported_after("import spamclf.decision, spamclf.batching, spamclf.tokenizer, "
                                          "spamclf.classifier")


def test_the_onnx_path_and_the_front_ends_import_no_torch():
    """predict/serve --onnx run without torch: the front ends import the torch side only when --ckpt is used."""
    assert "torch" not in _imported_after("import spamclf.onnx_classifier, spamclf.predict, spamclf.serve, "
                                          "spamclf.page, spamclf.agreement")


def test_import_spamclf_imports_only_itself():
    assert _imported_after("import spamclf") & {"torch", "numpy", "onnxruntime", "tiktoken", "spamclf"} == {"spamclf"}


def _toy_graph(path: Path) -> Path:
    """A two-class graph with the metadata `spamclf.export` writes: logits (0, tokens / 10), so texts of 2 or more
    tokens are spam at its threshold 0.55, and texts are cut to the 8 tokens of its padding rule."""
    import json

    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["lengths"], ["length"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["length", "ten"], ["spam"]),
             helper.make_node("Sub", ["spam", "spam"], ["ham"]),
             helper.make_node("Unsqueeze", ["ham", "axis"], ["ham_column"]),
             helper.make_node("Unsqueeze", ["spam", "axis"], ["spam_column"]),
             helper.make_node("Concat", ["ham_column", "spam_column"], ["logits"], axis=1)]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
                       helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    decision = {"label_names": ["ham", "spam"], "positive_label": "spam", "threshold": 0.55, "rule": "fixed",
                "target": 0.5, "temperature": 1.0, "measured": {}}
    meta = {"decision": decision, "padding": {"padding": "batch", "pad_length": None, "context_length": 8},
            "readout": {"pooling": "last_nonpad"}, "context_length": 1024, "source": {"model_name": "toy"}}
    for key, value in {**{k: json.dumps(v) for k, v in meta.items()}, "quantization": "none"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_loading_and_running_an_onnx_graph_through_spamclf_imports_no_torch(tmp_path):
    """`spamclf.load` picks the backend from the suffix and imports only it."""
    graph = _toy_graph(tmp_path / "toy.onnx")
    code = (f"import spamclf; c = spamclf.load({str(graph)!r}); p = c.predict(['hi', 'a longer message', 'x ' * 20]); "
            f"assert [(x.label, x.truncated) for x in p] == [('ham', False), ('spam', False), ('spam', True)], p")
    assert "torch" not in _imported_after(code)


def _imports(path: Path) -> set[str]:
    """spamclf modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spamclf"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spamclf")}
    modules = {f"spamclf.{p.stem}" for p in PACKAGE.glob("*.py")}
    return {name for name in found if name in modules}


def test_no_import_cycles():
    graph = {f"spamclf.{p.stem}": _imports(p) - {f"spamclf.{p.stem}"} for p in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path
                                     else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function in `tree`, methods as Class.method."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _functions(node, f"{prefix}{node.name}.")


def test_functions_stay_short():
    long = []
    for path in [*PACKAGE.glob("*.py"), *BENCHMARKS.glob("*.py")]:
        for name, node in _functions(ast.parse(path.read_text())):
            lines = node.end_lineno - node.lineno + 1
            if lines > 50:
                long.append(f"{path.parent.name}/{path.name}:{node.lineno} {name} ({lines} lines)")
    assert not long


def test_the_code_passes_its_lint_rules():
    """ruff's rules as pyproject.toml sets them, lines within 120 characters included."""
    root = PACKAGE.parent
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "spamclf", "benchmarks", "tests", "train.py"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
