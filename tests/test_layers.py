"""The packages' imports flow one way: core → quant → callbacks → trainer → eval → runtimes → export → pipeline.

Checked twice: statically (every import statement of every module, function bodies included, names
a package at or below its own), and at run time (importing a package in a fresh interpreter loads no
module of a later one). Function-local imports of qaft modules are allowed only where they keep the
CLI's start fast (``pipeline/cli.py``: each verb loads its stack when it runs) and in the root
package, which is the parent of ``qaft.core`` and so must not import the export stack when loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "quant", "callbacks", "trainer", "eval", "runtimes", "export", "pipeline"]
LAZY_ALLOWED = {"pipeline/cli.py", "pipeline/_qaft/__init__.py"}


def modules() -> list[tuple[str, Path]]:
    return [(layer, p) for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]


def imported(path: Path, layer: str) -> list[tuple[str, bool, int]]:
    """``(qaft package imported, inside a function, line)`` for every import of a qaft module in ``path``."""
    tree = ast.parse(path.read_text())
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the importing file's own package
                found.append((layer, id(node) in in_function, node.lineno))
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "qaft":
                target = parts[1] if len(parts) > 1 and parts[1] in LAYERS else "pipeline"  # `import qaft` = the root package
                found.append((target, id(node) in in_function, node.lineno))
    return found


def test_no_package_imports_a_later_one():
    wrong = []
    for layer, path in modules():
        for target, _, line in imported(path, layer):
            if LAYERS.index(target) > LAYERS.index(layer):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports qaft.{target}")
    assert wrong == []


def test_function_local_imports_of_qaft_only_where_they_keep_start_up_fast():
    local = sorted({str(path.relative_to(ROOT)) for layer, path in modules() for _, inside, _ in imported(path, layer) if inside})
    assert set(local) <= LAZY_ALLOWED, local


def test_importing_a_package_loads_no_later_package():
    """Every module of each package, imported in layer order: none pulls in a module of a later package."""
    script = (
        "import importlib, pkgutil, sys, json\n"
        f"layers = {LAYERS!r}\n"
        "out = {}\n"
        "for i, layer in enumerate(layers):\n"
        "    pkg = importlib.import_module('qaft.' + layer)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if '._qaft' not in m.name:  # pipeline/_qaft is the root package itself, and its __main__ runs the CLI\n"
        "            importlib.import_module(m.name)\n"
        "    later = {m.split('.')[1] for m in sys.modules if m.startswith('qaft.') and m.split('.')[1] in layers[i + 1:]}\n"
        "    out[layer] = sorted(later)\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout.strip().splitlines()[-1]) == {layer: [] for layer in LAYERS}
