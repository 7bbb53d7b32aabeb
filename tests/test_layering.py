"""The package imports in one direction: errors/utils < adapters (configs and layers) < inject < io < the model-level
MoLE functions (adapters.mole) < recipes < engine < commands. Any module can be imported first, and the core does
not hide a cycle behind an import inside a function."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mlae

SRC = Path(mlae.__file__).parent
CORE = [*sorted((SRC / "adapters").glob("*.py")), SRC / "inject.py", SRC / "io.py", SRC / "utils.py", SRC / "errors.py",
        SRC / "patterns.py"]


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
                                    "adapters.mole_layer", "recipes", "engine"])
def test_any_module_imports_first(module):
    """Imported before anything else of mlae (the package's __init__, which fixes one order, left out), a module
    whose imports went in a circle would fail on a partially initialised module."""
    code = ("import importlib, sys, types; pkg = types.ModuleType('mlae'); pkg.__path__ = [sys.argv[1]]; "
            f"sys.modules['mlae'] = pkg; importlib.import_module('mlae.{module}')")
    subprocess.run([sys.executable, "-c", code, str(SRC)], check=True, capture_output=True, timeout=120)
