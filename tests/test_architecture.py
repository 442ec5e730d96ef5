"""The package's import directions, read from its source with ``ast`` (module-level and lazy imports alike).

- the reference (the specification) imports nothing of the package but itself;
- ops and the Triton kernels import no models (no timm, no model-side module of the package);
- nothing outside the CLI imports the CLI (``__main__`` modules are entry points and may);
- only ``rollout_fast.ops`` imports the compiled extension ``rollout_fast._C`` and ``rollout_fast.triton``;
- no import circles between modules;
- no function over 80 lines outside kernels, no module over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "rollout_fast"
MODEL_SIDE = ("rollout_fast.models", "rollout_fast.students", "rollout_fast.zoo", "rollout_fast.explain",
              "rollout_fast.capture", "rollout_fast.prune", "rollout_fast.distill", "rollout_fast.jobs",
              "rollout_fast.cli", "rollout_fast.teacher", "rollout_fast.ltpa", "rollout_fast.saliency",
              "rollout_fast.check")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import statement in ``path``; ``from X import name`` also
    yields ``X.name`` (it may be a submodule)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def _violations(pred) -> list[str]:
    bad = []
    for name, path in sorted(_modules().items()):
        for mod, line in _imports(path):
            why = pred(name, path, mod)
            if why:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod} ({why})")
    return bad


def test_reference_imports_nothing_of_the_package():
    def pred(name, path, mod):
        if _within(name, "rollout_fast.reference") and _within(mod, "rollout_fast") \
                and not _within(mod, "rollout_fast.reference"):
            return "the reference imports nothing of the package"
    assert _violations(pred) == []


def test_ops_and_kernels_import_no_models():
    def pred(name, path, mod):
        if not (_within(name, "rollout_fast.ops") or _within(name, "rollout_fast.triton")):
            return None
        if _within(mod, "timm") or any(_within(mod, m) for m in MODEL_SIDE):
            return "ops and kernels import no models"
    assert _violations(pred) == []


def test_nothing_imports_the_cli():
    def pred(name, path, mod):
        if _within(mod, "rollout_fast.cli") and not _within(name, "rollout_fast.cli") \
                and path.name != "__main__.py":
            return "only entry points import the CLI"
    assert _violations(pred) == []


def test_only_ops_imports_the_extension_and_triton():
    def pred(name, path, mod):
        if _within(name, "rollout_fast.ops") or _within(name, "rollout_fast.triton"):
            return None
        if _within(mod, "rollout_fast._C") or _within(mod, "rollout_fast.triton"):
            return "only rollout_fast.ops imports the compiled extension and triton/"
    assert _violations(pred) == []


def test_no_import_circles():
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for mod, _ in _imports(path):
            # the deepest module of the package the import names (a name imported from a module is not one)
            while mod and mod not in mods:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not _within(name, mod):  # a submodule may import its package
                deps.add(mod)
        graph[name] = deps
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_no_long_functions_or_modules():
    """Kernels (Triton ``@triton.jit`` functions) are exempt from the function limit."""
    long_functions, long_modules = [], []
    for name, path in sorted(_modules().items()):
        src = path.read_text()
        if src.count("\n") > 500:
            long_modules.append(f"{name}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                if not jit and node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long_functions == [] and long_modules == []


def test_no_test_imports_from_conftest():
    """pytest imports every folder's conftest.py as the module ``conftest``: ``from conftest import`` may get
    another folder's (it broke the suite twice). Shared values live in tests/paths.py and tests/helpers.py."""
    tests = Path(__file__).resolve().parent
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "conftest" in names:
                bad.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert bad == []
