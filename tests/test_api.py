"""The package's shape: a public API that cannot shadow itself, no import cycle, no maths in the facade."""

from __future__ import annotations

import ast
import itertools
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import inspector

PKG = Path(inspector.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], prefix="inspector."))


def test_no_submodule_shares_a_name_with_an_exported_name():
    subs = {m.split(".")[1] for m in _modules()}
    clash = subs & set(inspector.__all__)
    assert not clash, f"submodules {clash} would shadow the exported names of the same name"


@pytest.mark.parametrize("order", ["forward", "reverse", "submodules-first"])
def test_every_exported_name_imports_in_every_order(order):
    """Importing a submodule never replaces an exported function (``inspector.audit`` stays callable)."""
    names = [n for n in inspector.__all__ if n != "__version__"]
    if order == "reverse":
        names = names[::-1]
    pre = ""
    if order == "submodules-first":
        pre = f"import importlib\nfor m in {_modules()!r}: importlib.import_module(m)\n"
    code = (
        pre
        + "import inspector\n"
        + "".join(f"assert getattr(inspector, {n!r}) is not None\n" for n in names)
        + "import inspector.pipeline, inspector.config\n"
        + "assert callable(inspector.audit) and not isinstance(inspector.audit, type(inspector))\n"
        + "cfg = inspector.AuditConfig(alpha=0.01)\n"
        + "assert inspector.audit is inspector.pipeline.audit and cfg.alpha == 0.01\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_each_exported_name_alone():
    for a, b in itertools.islice(itertools.permutations(["audit", "AuditConfig", "Calibration"], 2), 3):
        code = f"import inspector\nx = inspector.{a}\ny = inspector.{b}\nassert callable(inspector.audit)\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (a, b, r.stderr)


def _imports(path: Path, modname: str) -> set[str]:
    """Modules of the package imported by one file (function-level imports included, TYPE_CHECKING not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    pkg = modname if path.name == "__init__.py" else modname.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("inspector"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("inspector")}
    return out


def _graph() -> dict[str, set[str]]:
    mods = set(_modules()) | {"inspector"}
    files = {m: PKG / (m.split(".", 1)[1].replace(".", "/") if m != "inspector" else "") for m in mods}
    graph: dict[str, set[str]] = {}
    for m, f in files.items():
        path = f / "__init__.py" if f.is_dir() else f.with_suffix(".py")
        graph[m] = {t for t in _imports(path, m) if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def test_there_is_no_import_cycle_in_the_package():
    graph = _graph()
    graph.pop("inspector", None)  # the lazy facade names every module by string only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t == "inspector":
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_facade_holds_no_numerical_code():
    """``audit()`` only orchestrates: no numpy maths in its body, no branch on the mode."""
    tree = ast.parse((PKG / "pipeline.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "audit")
    src = ast.unparse(fn)
    assert "np." not in src and "mode" not in src.replace("model", "")
    assert not (PKG / "audit.py").exists()
