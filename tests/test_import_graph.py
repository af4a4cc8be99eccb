"""The package has no import circles: each folder only looks down (cli → stages → ... → adapters → config).

The graph is read from the source (ast), so it sees every import a module can make: at module level and inside
functions alike. Imports under `if TYPE_CHECKING:` are for annotations only and do not count. A circle is a
strongly connected component of that graph (Tarjan); each is reported with the file:line of every edge in it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = "tunekit"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name → source file, for every module of `package` under `root`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_edges(root: Path, package: str) -> dict[str, dict[str, list[str]]]:
    """module → {imported module of the package → ["file:line", ...]}.

    `import a.b.c` and `from a.b import c` reach the named module; `from a.b import name` reaches a.b (or
    a.b.name when that is a submodule). Importing a submodule also runs its parent packages' __init__, but an
    edge to a parent package would make every `__init__` that imports its children a false circle, so only
    the named module counts.
    """
    modules = module_names(root, package)
    edges: dict[str, dict[str, list[str]]] = {m: {} for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _runtime_imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            where = f"{path.relative_to(root)}:{node.lineno}"
            for target in targets:
                while target and target not in modules:  # `import tunekit.x.y` where y is a name: its module
                    target = target.rpartition(".")[0]
                if target and target != mod and where not in edges[mod].get(target, []):
                    edges[mod].setdefault(target, []).append(where)
    return edges


def strongly_connected(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each is an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(circles: list[list[str]], edges: dict[str, dict[str, list[str]]]) -> str:
    lines = []
    for component in circles:
        members = set(component)
        lines.append("circle: " + ", ".join(component))
        for a in component:
            for b, where in sorted(edges[a].items()):
                if b in members:
                    lines.append(f"  {a} -> {b}  ({', '.join(where)})")
    return "\n".join(lines)


def test_tunekit_has_no_import_circles():
    edges = import_edges(ROOT, PACKAGE)
    assert len(edges) > 100  # the whole package was read
    circles = strongly_connected(edges)
    assert not circles, "import circles:\n" + describe(circles, edges)


def test_the_detector_finds_circles_and_ignores_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import low\n")  # a package importing its child: no circle
    (pkg / "sub" / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n")
    (pkg / "top.py").write_text("import pkg.sub.low\nfrom pkg.mid import helper\n")
    (pkg / "mid.py").write_text("def helper():\n    from . import top\n    return top\n")  # in a function

    edges = import_edges(tmp_path, "pkg")
    assert edges["pkg.top"] == {"pkg.sub.low": ["pkg/top.py:1"], "pkg.mid": ["pkg/top.py:2"]}
    assert edges["pkg.sub.low"] == {}  # TYPE_CHECKING only
    assert edges["pkg.sub"] == {"pkg.sub.low": ["pkg/sub/__init__.py:1"]}
    circles = strongly_connected(edges)
    assert circles == [["pkg.mid", "pkg.top"]]
    report = describe(circles, edges)
    assert "pkg.mid -> pkg.top  (pkg/mid.py:2)" in report and "pkg.top -> pkg.mid  (pkg/top.py:2)" in report

    (pkg / "mid.py").write_text("def helper():\n    return 1\n")
    assert strongly_connected(import_edges(tmp_path, "pkg")) == []


#: modules that are programs: importing one runs it (they are still parsed into the graph above).
SCRIPTS = {
    "tunekit.__main__": "`python -m tunekit`: runs the CLI",
    "tunekit.rewards.sandbox_runner": "the code-test sandbox's program, run by `python -I -S -c` in a sandbox",
}


def test_every_module_imports_on_its_own():
    """Each module imports with no other tunekit module loaded before it (an import that works only after another
    module was imported would hide otherwise)."""
    modules = module_names(ROOT, PACKAGE)
    assert set(SCRIPTS) <= set(modules)
    names = sorted(set(modules) - set(SCRIPTS))
    script = (
        "import importlib, sys, traceback\n"
        "bad, done = [], 0\n"
        "for name in sys.stdin.read().split():\n"
        "    before = set(sys.modules)\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        done += 1\n"
        "    except Exception:\n"
        "        bad.append(name + ': ' + traceback.format_exc(limit=-1).strip().splitlines()[-1])\n"
        "    for m in set(sys.modules) - before:\n"
        "        if m.startswith('tunekit'):\n"
        "            del sys.modules[m]\n"
        "print(done)\n"
        "print('\\n'.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], input="\n".join(names), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n", 1) == [str(len(names)), "\n"], res.stdout
