"""The house rules of the package layout (CONTRIBUTING.md), checked on the source.

* imports go one way, down the layers of :data:`LAYERS` (data flows config -> discovery -> cube ->
  mask -> predict -> outputs -> ledger; the commands sit on top);
* no import circle between modules (imports inside functions and ``TYPE_CHECKING`` blocks count);
* no private name (``_x``) of one module is used by another;
* torch is imported only by the models, the prediction kernel, training and benchmarks;
* a module longer than 400 lines says at its top why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "treesits_dask"

#: bottom to top; a module may import modules of its own layer and of the layers below it
LAYERS = [
    {"errors", "version"},
    {"io"},
    {"models"},
    {"config"},
    {"kube"},
    {"state"},
    {"outputs"},
    {"pipeline"},
    {"synthetic", "training"},
    {"api", "progress", "demo", "bench", "cli", "__init__", "__main__"},
]
# pipeline.warmup: the preload of the workers that run inference, whose job is importing torch
TORCH_ALLOWED = ("models.", "pipeline.predict", "pipeline.warmup", "training.", "bench.")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if module != "__init__" else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(target.split(".") if target else [])])


def _imports(module: str, path: Path):
    """(imported module, names taken, line) of every import of ``module`` from the package."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES:  # `from . import storage`: the module itself
                    yield sub, (), node.lineno
                else:
                    yield target or "__init__", (alias.name,), node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("treesits_dask"):
            target = node.module.removeprefix("treesits_dask").lstrip(".") or "__init__"
            yield target, tuple(a.name for a in node.names), node.lineno


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} is in no layer of LAYERS; add its package there")


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_go_down_the_layers():
    wrong = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_private_names_across_modules():
    used = []
    for module, path in MODULES.items():
        for target, names, line in _imports(module, path):
            used += [
                f"{module}:{line} takes {n} from {target}"
                for n in names
                if n.startswith("_") and not n.startswith("__")
            ]
        tree = ast.parse(path.read_text())
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level
            for alias in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                used.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not used, "\n".join(used)


def test_torch_stays_in_the_model_layers():
    heavy = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "torch" or n.startswith("torch.") for n in names):
                if not (module + ".").startswith(TORCH_ALLOWED) and module != "models":
                    heavy.append(f"{module}:{node.lineno}")
    assert not heavy, f"torch imported outside {TORCH_ALLOWED}: {heavy}"


def test_long_modules_say_why():
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > 400 and "longer than" not in doc:
            silent.append(f"{module} ({len(lines)} lines)")
    assert not silent, f"modules over 400 lines without a reason at their top: {silent}"


def test_public_api_names_exist_and_are_documented():
    import treesits_dask

    for name in treesits_dask.__all__:
        value = getattr(treesits_dask, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"treesits_dask.{name} has no docstring"
