"""The packages import only downward (../shared/DESIGN.md), at module level:

    minimind_jax  <  lora  <  convert  <  train, serve  <  bench

Walks every module's imports with `ast` (no module is executed). An import placed inside a function is allowed
only for optional dependencies (torch, matplotlib, ...), never for one of the project's own packages.
"""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

LEVEL = {"minimind_jax": 0, "lora": 1, "convert": 2, "train": 3, "serve": 3, "bench": 4}


def _imports(path: Path):
    """-> [(imported top-level package, line, at module level?)] of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno, id(node) in top


def _files():
    for pkg in LEVEL:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down(path):
    pkg = path.relative_to(ROOT).parts[0]
    for name, line, module_level in _imports(path):
        if name not in LEVEL or name == pkg:
            continue
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        assert LEVEL[name] < LEVEL[pkg], f"{where}: {name} is not below {pkg}"
        assert module_level, f"{where} inside a function: project imports belong at module level"


def test_train_and_serve_do_not_import_each_other():
    for pkg, other in (("train", "serve"), ("serve", "train")):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            assert other not in {n for n, _, _ in _imports(path)}, f"{path.relative_to(ROOT)} imports {other}"
