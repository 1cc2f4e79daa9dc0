"""The examples are written against the packages' public surfaces: every name they import from minimind_jax, lora,
convert, train or serve is one its package's `__init__.py` exports (`__all__`), never a submodule's; the rest is
the standard library, third-party packages, or the examples' own `common` module."""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
PUBLIC = ("minimind_jax", "lora", "convert", "train", "serve")
LOCAL = {"common"}  # examples/common.py, imported by the examples beside it


def imports(path: Path) -> list[tuple[int, str, list]]:
    """(line, module, names) of every import in the file, at any depth (`import a.b` -> ("a.b", []))."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def outside_project(top: str) -> bool:
    """The standard library or an installed third-party package (not a folder of this checkout)."""
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    if (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file():
        return False
    return importlib.util.find_spec(top) is not None


def problems(path: Path) -> list[str]:
    bad = []
    for line, module, names in imports(path):
        where = f"{path.relative_to(ROOT) if ROOT in path.parents else path.name}:{line}"
        top = module.split(".")[0]
        if module.startswith("."):
            bad.append(f"{where}: relative import {module}")
        elif top in PUBLIC:
            if module != top:
                bad.append(f"{where}: {module} is a submodule of {top}: import from {top} itself")
                continue
            exported = set(importlib.import_module(top).__dict__.get("__all__", ()))
            bad += [f"{where}: {top}.{n} is not in {top}.__all__" for n in names if n not in exported]
        elif top in LOCAL:
            continue
        elif not outside_project(top):
            bad.append(f"{where}: {module} is neither a public package, the stdlib, third-party nor common")
    return bad


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_import_only_public_names(path):
    assert problems(path) == []


def test_the_check_catches_private_imports(tmp_path):
    """A submodule import, a name outside __all__, a project folder that is no public package, a relative import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import lora.core\nfrom train.job import load_base\nfrom lora import _rank_for, stack\n"
                   "import bench.serve\nfrom . import x\nimport numpy, json\nfrom minimind_jax import generate\n",
                   encoding="utf-8")
    got = problems(bad)
    assert [p.split(": ", 1)[1] for p in got] == [
        "lora.core is a submodule of lora: import from lora itself",
        "train.job is a submodule of train: import from train itself",
        "lora._rank_for is not in lora.__all__",
        "bench.serve is neither a public package, the stdlib, third-party nor common",
        "relative import .",
    ]


@pytest.mark.parametrize("package", PUBLIC)
def test_every_exported_name_exists(package):
    mod = importlib.import_module(package)
    assert mod.__doc__ and mod.__all__
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []
