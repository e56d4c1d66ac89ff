"""The package's layers (DESIGN.md "Layout"): a module imports only from its own layer or lower ones, and no imports
go round in a circle. Read from the source with ast (nothing is imported or run), every import counted: at the top
of a module or inside a function, absolute or relative."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastsd35"

# Lowest first. A module belongs to the longest prefix listed (so `tiny.train` is not `tiny`); the package itself
# (`__init__`, `__main__`) is above everything.
LAYERS = (
    ("errors", "files", "version"),
    ("kernels",),
    ("models",),
    ("weights",),
    ("tiny",),  # the family's components, used by Pipeline.from_preset
    ("pipeline",),
    ("benchmarks", "diffusers", "tiny.train"),  # beside the app: they use the pipeline (training evaluates with it)
    ("app", "serve"),  # fastsd35/serve.py: the public name of the server's Python API (fastsd35.app.serve)
    ("__init__", "__main__"),
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, root: Path, modules) -> set[str]:
    """The package modules `path` imports (names relative to the package, "" for the package itself)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == root.name]
            found.update(t.partition(".")[2] for t in targets)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            source = ".".join([*base, *([node.module] if node.module else [])])
        elif (node.module or "").split(".")[0] == root.name:
            source = node.module.partition(".")[2]
        else:
            continue
        for alias in node.names:  # `from . import x` imports module x when there is one
            sub = f"{source}.{alias.name}" if source else alias.name
            found.add(sub if sub in modules else source)
    return {m if m in modules else "" for m in found}


def graph(root: Path) -> dict[str, set[str]]:
    modules = package_modules(root)
    named = set(modules) | {m.rsplit(".", 1)[0] for m in modules if "." in m}
    return {m: imports(p, root, named) - {m} for m, p in modules.items()}


def layer(module: str) -> int:
    module = module or "__init__"
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    if best is None:
        raise AssertionError(f"fastsd35.{module} is in no layer: add its folder to LAYERS in {__file__}")
    return best[0]


def upward_imports(g: dict[str, set[str]], root: Path) -> list[str]:
    return [f"{root.name}/{m.replace('.', '/')} (layer {layer(m)}) imports {root.name}.{t or '__init__'} (layer {layer(t)})"
            for m, targets in sorted(g.items()) for t in sorted(targets) if layer(t) > layer(m)]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a cycle through it."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(graph(PACKAGE), PACKAGE) == []


def test_no_import_cycles():
    assert cycles(graph(PACKAGE)) == []


def test_every_module_has_a_layer():
    for module in package_modules(PACKAGE):
        layer(module)


# -- the guard itself finds what it guards against --------------------------------------------------------------


def make_package(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "fastsd35"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_upward_import_is_named(tmp_path):
    root = make_package(tmp_path, {
        "errors.py": "", "models/__init__.py": "", "pipeline/__init__.py": "",
        "pipeline/presets.py": "from ..errors import X\n",
        "models/mmditx.py": "def f():\n    from ..pipeline import presets\n",  # inside a function: still counted
    })  # fmt: skip
    assert upward_imports(graph(root), root) == [
        "fastsd35/models/mmditx (layer 2) imports fastsd35.pipeline.presets (layer 5)"]


def test_importing_the_package_root_from_inside_is_upward(tmp_path):
    root = make_package(tmp_path, {"version.py": "", "app/__init__.py": "", "app/cli.py": "from .. import __version__\n"})
    assert upward_imports(graph(root), root) == ["fastsd35/app/cli (layer 7) imports fastsd35.__init__ (layer 8)"]


def test_a_planted_cycle_is_found(tmp_path):
    root = make_package(tmp_path, {
        "weights/__init__.py": "", "weights/checkpoints.py": "from . import loading\n",
        "weights/loading.py": "import fastsd35.weights.lora\n", "weights/lora.py": "from .checkpoints import x\n",
        "weights/fp8.py": "from .loading import y\n",  # reaches the cycle but is not on it
    })  # fmt: skip
    assert cycles(graph(root)) == [["weights.checkpoints", "weights.loading", "weights.lora"]]


def test_a_module_outside_every_layer_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="fastsd35.server is in no layer"):
        layer("server")
