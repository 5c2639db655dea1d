"""The house rules, checked on the source: one way for data to flow, no import cycles, small
files, and none of the retired duplicates coming back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "histoclass"
# Layers, bottom up: a module may import its own layer and those below it, never above.
LAYERS = [
    {"histoclass.data", "histoclass.stain", "histoclass.metrics", "histoclass.evidence",
     "histoclass.calibration"},
    {"histoclass.models"},
    {"histoclass.predict", "histoclass.explain", "histoclass.distributed"},
    {"histoclass.train", "histoclass.evaluate", "histoclass.report", "histoclass.deploy",
     "histoclass.slides", "histoclass.selective"},
    {"histoclass.pipeline", "histoclass.api", "histoclass.preflight"},
    {"histoclass.cli", "histoclass.app", "histoclass.__main__"},
]
NO_TORCH = ("histoclass.data.breakhis", "histoclass.data.images", "histoclass.data.manifest",
            "histoclass.data.scan", "histoclass.data.splits", "histoclass.data.fixed",
            "histoclass.stain",
            "histoclass.metrics", "histoclass.evaluate", "histoclass.evidence",
            "histoclass.data.files", "histoclass.calibration", "histoclass.data.field_tiles",
            "histoclass.selective")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level and inside functions):
    ``from pkg import sub`` is ``pkg.sub`` when that is a module, else ``pkg``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return out


def _is_face(path: Path) -> bool:
    """An ``__init__.py`` that only hands names on (docstring, imports, ``__all__``)."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Import | ast.ImportFrom)
        or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        or (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__all__"])
        for n in body)


def _graph() -> dict[str, set[str]]:
    """histoclass module -> the histoclass modules it imports. A package face's imports of
    its own submodules are not edges (importing ``pkg.sub`` runs the face first)."""
    graph = {}
    for name, path in MODULES.items():
        deps = {d for d in _imports(path) if d in MODULES and d != name}
        if _is_face(path):
            deps = {d for d in deps if not d.startswith(name + ".")}
        graph[name] = deps
    return graph


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    return None


def test_no_import_cycles():
    graph = _graph()
    assert sum(map(len, graph.values())) > 100  # the scan sees the package's imports
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_flows_one_way():
    wrong = []
    for m, deps in _graph().items():
        here = _layer(m)
        for d in deps:
            there = _layer(d)
            if here is not None and there is not None and there > here:
                wrong.append(f"{m} imports {d}")
    assert not wrong, "imports that climb back up: " + "; ".join(sorted(wrong))


@pytest.mark.parametrize("module", NO_TORCH)
def test_lower_layers_do_not_import_torch(module):
    files = [p for m, p in MODULES.items() if m == module or m.startswith(module + ".")]
    assert files
    for path in files:
        heavy = {i for i in _imports(path) if i.split(".")[0] in ("torch", "torchvision", "timm")}
        assert not heavy, f"{path.name} imports {sorted(heavy)}"


def test_files_are_small_and_the_retired_names_are_gone():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"files over 300 lines: {long}"
    top = {p.stem for p in SRC.glob("*.py")}
    assert not {t for t in top if t.startswith(("explain_", "train_", "onnx_"))}
    assert not top & {"torch_engine", "ensembling", "train", "explain", "export", "quantize"}
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for name in ("TorchEngine", "SingleModel", "load_any", "to_torch", "__init_subclass__"):
        assert name not in text, f"{name} is back"
    for folder in ("models", "explain", "train", "deploy", "data", "stain", "cli"):
        assert (SRC / folder / "__init__.py").is_file()
