"""Each layer of the package imports only from the layers below it (README, "Layout"):

    base        errors, files, hardware, utils
    core        adapters, inject, patterns, io, similarity, attention
    facade      mlae/__init__: the public API, re-exporting core (so core must not import it: a cycle)
    training    engine, rundir, trained, recipes, data, backbones, fractals, pretrain, published, evaluation, export
    experiments mlae.experiments: compare, sweep, ablations, analysis as Python APIs
    commands    mlae.commands, cli, __main__: define options, parse, call, print

Every import counts: module level and inside functions, ``import mlae.x``, ``from mlae.x import y`` and relative
ones. A module that no rule below names fails the test, so a new module is given its layer when it is added.
Within the core, modules import each other at module level only (no cycle hidden behind an import inside a
function), and any module can be imported first.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mlae

SRC = Path(mlae.__file__).parent
LAYERS = ("base", "core", "facade", "training", "experiments", "commands")
# dotted module (or package prefix) -> layer; the longest matching prefix wins
RULES = {
    "mlae.errors": "base", "mlae.files": "base", "mlae.hardware": "base", "mlae.utils": "base",
    "mlae.adapters": "core", "mlae.inject": "core", "mlae.patterns": "core", "mlae.io": "core",
    "mlae.similarity": "core", "mlae.attention": "core",
    "mlae": "facade",
    "mlae.engine": "training", "mlae.rundir": "training", "mlae.trained": "training", "mlae.recipes": "training",
    "mlae.data": "training", "mlae.backbones": "training", "mlae.fractals": "training", "mlae.pretrain": "training",
    "mlae.published": "training", "mlae.evaluation": "training", "mlae.export": "training",
    "mlae.experiments": "experiments",
    "mlae.commands": "commands", "mlae.cli": "commands", "mlae.__main__": "commands",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RULES:
            return RULES[".".join(parts[:n])]
    return None


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its ``__init__``)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("mlae", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, mlae module) for every import of the package in ``source``, the code of ``module``. ``from X import
    y`` depends on ``X.y`` when that is a module in ``known``, else on ``X`` (y is one of its names)."""
    here = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mlae"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "mlae":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return found


def violations(module: str, source: str, is_package: bool = False, known: set[str] | None = None) -> list[str]:
    """``"mlae.x:LINE imports mlae.y (layer a > layer b)"`` for each import of a higher layer in ``source``."""
    known = set(package_modules()) if known is None else known
    mine = layer_of(module)
    out = []
    for line, target in imported_modules(source, module, is_package, known):
        theirs = layer_of(target)
        if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
            out.append(f"{module}:{line} imports {target} ({theirs} is above {mine})")
    return out


def test_every_module_has_a_layer():
    assert [m for m in package_modules() if layer_of(m) is None] == []


def test_no_module_imports_a_higher_layer():
    modules = package_modules()
    found = []
    for module, path in modules.items():
        found += violations(module, path.read_text(), path.name == "__init__.py", set(modules))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module, source", [
    ("mlae.engine", "from .commands.train import _fail"),                  # training -> commands, relative
    ("mlae.adapters.lora", "def f():\n    from ..experiments import compare"),  # inside a function, two dots
    ("mlae.recipes", "import mlae.cli"),                                    # absolute import
    ("mlae.experiments.ablations", "from mlae.commands.compare import report"),
    ("mlae.inject", "import mlae"),                                         # core -> the facade above it
    ("mlae.utils", "from . import engine"),                                 # base -> training, as a name
])
def test_a_higher_import_is_caught(module, source):
    assert len(violations(module, source)) == 1


@pytest.mark.parametrize("module, source", [
    ("mlae.commands.compare", "from ..experiments.compare import compare"),
    ("mlae.experiments.compare", "from ..rundir import RESULTS\nfrom .summary import summarize"),
    ("mlae.engine", "import mlae\nfrom .recipes import get_method\nfrom . import utils"),
    ("mlae.data.base", "from ..errors import InputError"),
])
def test_a_lower_or_same_layer_import_passes(module, source):
    assert violations(module, source) == []


CORE = [*sorted((SRC / "adapters").glob("*.py")), SRC / "inject.py", SRC / "io.py", SRC / "utils.py", SRC / "files.py",
        SRC / "hardware.py", SRC / "errors.py", SRC / "patterns.py"]


def test_the_core_imports_mlae_modules_at_module_level_only():
    found = []
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith("mlae")):
                        found.append(f"{path.relative_to(SRC)}:{sub.lineno} {'.' * sub.level}{sub.module or ''}")
    assert not found, found


@pytest.mark.parametrize("module", ["inject", "io", "adapters", "adapters.base", "adapters.dmlora", "adapters.mole",
                                    "adapters.mole_layer", "recipes", "engine", "rundir", "trained"])
def test_any_module_imports_first(module):
    """Imported before anything else of mlae (the package's __init__, which fixes one order, left out), a module
    whose imports went in a circle would fail on a partially initialised module."""
    code = ("import importlib, sys, types; pkg = types.ModuleType('mlae'); pkg.__path__ = [sys.argv[1]]; "
            f"sys.modules['mlae'] = pkg; importlib.import_module('mlae.{module}')")
    subprocess.run([sys.executable, "-c", code, str(SRC)], check=True, capture_output=True, timeout=120)
