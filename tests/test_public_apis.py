"""mlae uses other libraries through their public APIs only: a private name may change in any of their releases."""
from __future__ import annotations

import ast
from pathlib import Path

import mlae

SRC = Path(mlae.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC), ast.parse(path.read_text(), str(path))


def test_no_private_names_imported_from_other_libraries():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] != "mlae":
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] != "mlae"]
            else:
                continue
            found += [f"{path}:{node.lineno} {n}" for n in names if any(map(_private, n.split(".")))]
    assert not found, found


def test_optuna_objects_are_used_through_public_attributes():
    """In the modules that use Optuna (sweep), ``x._name`` on anything but ``self`` reaches into a library object
    (``study._storage``, ``trial._trial_id``); its internal ``fixed_params`` system attribute is private too."""
    found, checked = [], []
    for path, tree in _modules():
        if not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "optuna" in ast.unparse(n) for n in ast.walk(tree)):
            continue
        checked.append(str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and ast.unparse(node.value) not in ("self",
                                                                                                          "cls"):
                found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and node.value == "fixed_params":
                found.append(f"{path}:{node.lineno} 'fixed_params'")
    assert "experiments/sweep.py" in checked
    assert not found, found
