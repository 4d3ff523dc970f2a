"""The package's imports run one way: no cycles, the CLI never imports the benchmarks, and evaluation,
mixed precision and generation import nothing of training. Read from the source, imports inside
functions included, so a lazy import cannot hide a cycle."""

import ast
from pathlib import Path

import torch

import gptfast
from gptfast import GPT, GPTConfig, pretrained

PACKAGE = Path(gptfast.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The names of the gptfast modules (gptfast/NAME.py, or gptfast.kernels, gptfast.bench) ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
            names.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gptfast"):
            parts = node.module.split(".")
            names.update(parts[1:2] or [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("gptfast."))
    return names


GRAPH = {path.stem: imported_modules(path) for path in PACKAGE.glob("*.py")}


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for name in GRAPH.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_the_graph_is_read():
    assert "model" in GRAPH["pretrained"] and {"kernels", "model", "evaluate", "precision"} <= GRAPH["train"]


def test_no_import_cycles():
    cycles = sorted(module for module in GRAPH if module in reachable(module))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_package_never_imports_the_benchmarks():
    assert not [module for module in GRAPH if "bench" in GRAPH[module]]


def test_evaluation_precision_and_generation_import_nothing_of_training():
    for module in ("evaluate", "precision", "generation", "distributed", "checkpoint", "pretrained", "model"):
        assert "train" not in reachable(module), module
    assert "pretrained" not in reachable("model")


def test_hugging_face_methods_are_the_pretrained_functions():
    assert GPT.from_pretrained is pretrained.from_pretrained is gptfast.from_pretrained
    model = GPT(GPTConfig(vocab_size=20, n_embd=8, n_head=1, n_layer=1, context_length=4))
    assert model.save_pretrained.__func__ is pretrained.save_pretrained is gptfast.save_pretrained


def test_names_that_moved_out_of_train_import_from_it_still():
    from gptfast import evaluate, precision, runlog
    from gptfast.train import AMP_DTYPES, LOG_FILE, amp_dtype_for, split_loss

    assert (AMP_DTYPES, amp_dtype_for) == (precision.AMP_DTYPES, precision.amp_dtype_for)
    assert (LOG_FILE, split_loss) == (runlog.LOG_FILE, evaluate.split_loss)
    assert amp_dtype_for("float16", torch.device("cpu")) == torch.float16
