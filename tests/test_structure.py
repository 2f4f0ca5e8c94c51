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


@pytest.mark.parametrize("module", ["spamclf.inference", "spamclf.predict", "spamclf.decision", "spamclf.batching"])
def test_the_inference_side_imports_no_training_framework(module):
    assert not _imported_after(f"import {module}") & set(TRAINING_FRAMEWORKS)


def test_decisions_and_batch_plans_need_no_torch():
    assert "torch" not in _imported_after("import spamclf.decision, spamclf.batching, spamclf.tokenizer, spamclf.answers")


def test_the_onnx_path_and_the_front_ends_import_no_torch():
    """predict/serve --onnx run without torch: the front ends import the torch side only when --ckpt is used."""
    assert "torch" not in _imported_after("import spamclf.onnx_classifier, spamclf.engines, spamclf.predict, spamclf.serve, "
                                          "spamclf.page, spamclf.agreement")


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


# Being shortened on another branch; they leave this list when it merges.
STILL_LONG = {"datamodule.py:SpamDataModule.__init__", "pipeline.py:run"}


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
            if lines > 50 and f"{path.name}:{name}" not in STILL_LONG:
                long.append(f"{path.parent.name}/{path.name}:{node.lineno} {name} ({lines} lines)")
    assert not long
