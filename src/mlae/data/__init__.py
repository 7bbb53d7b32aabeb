"""Datasets: VTAB-1k and FGVC in the field's on-disk layouts, image folders, and an embedded suite of tasks.

    task = load_task("vtab:cifar", data_root="/data/vtab-1k", image_size=224)
    x = prepare_batch(task.train.images[:64], train=True, augment=task.augment, image_size=224)

Specs: "vtab:<name>", "fgvc:<name>", "folder:<path>", "suite:<task>" (no download needed; a suite task name
alone works too unless VTAB-1k has a dataset of that name). Images are decoded once into uint8 tensors and
cached next to the data (see `base.cached_split`).
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import DatasetError, Split, Task, check_split, clear_cache
from .fgvc import FGVC_TASKS, canonical_name, load_fgvc
from .folder import load_folder
from .suite import SUITE_TASKS, check_suite_name, make_suite_task
from .transforms import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, cache_size, prepare_batch
from .vtab import VTAB_TASKS, check_vtab_name, load_vtab

__all__ = ["load_task", "expand_specs", "Task", "Split", "prepare_batch", "cache_size", "DatasetError",
           "VTAB_TASKS", "FGVC_TASKS", "SUITE_TASKS", "SPEC_PREFIXES", "IMAGENET_MEAN", "IMAGENET_STD",
           "INCEPTION_MEAN", "INCEPTION_STD", "clear_cache", "protocol_splits"]

SPEC_PREFIXES = ("vtab", "fgvc", "folder", "suite")
# "<prefix>:all" expands to every task of that family
_FAMILIES = {"vtab": VTAB_TASKS, "fgvc": FGVC_TASKS, "suite": SUITE_TASKS}


def _parse(spec: str) -> tuple[str, str]:
    prefix, sep, rest = spec.partition(":")
    if not sep:
        return _bare(spec)
    if prefix not in SPEC_PREFIXES or not rest:
        raise DatasetError(f"cannot parse dataset spec {spec!r}: expected one of "
                           + ", ".join(f"'{p}:<name>'" for p in SPEC_PREFIXES))
    return prefix, rest


def _bare(spec: str) -> tuple[str, str]:
    """A spec without a prefix, as new users type it: an embedded suite task name stands for itself; a VTAB-1k or
    FGVC name or a folder gets an error that says which spec to write."""
    if spec in SUITE_TASKS and spec not in VTAB_TASKS:
        return "suite", spec
    if spec in SUITE_TASKS:
        raise DatasetError(f"{spec!r} is both an embedded suite task and a VTAB-1k dataset: write suite:{spec}, "
                           f"or vtab:{spec} with --data-root <folder holding the VTAB-1k datasets>")
    for family, benchmark, known in (("vtab", "VTAB-1k", spec in VTAB_TASKS), ("fgvc", "FGVC", _is_fgvc(spec))):
        if known:
            raise DatasetError(f"dataset {spec!r} needs its benchmark: write {family}:{spec} with --data-root "
                               f"<folder holding the {benchmark} datasets>")
    path = Path(spec).expanduser()
    if path.is_dir():
        name, parent = path.resolve().name, path.resolve().parent
        if (path / "train800val200.txt").is_file():
            hint = f"vtab:{name} with --data-root {parent}"
        elif any((path / f"{s}.json").is_file() for s in ("train", "val", "test")):
            hint = f"fgvc:{name} with --data-root {parent}"
        else:
            hint = f"folder:{spec} (class sub-folders, optionally under train/ and test/)"
        raise DatasetError(f"{spec!r} is a folder, not a dataset spec: write {hint}")
    raise DatasetError(f"cannot parse dataset spec {spec!r}: expected a suite task name or one of "
                       + ", ".join(f"'{p}:<name>'" for p in SPEC_PREFIXES))


def protocol_splits(spec: str) -> tuple[str, str, str]:
    """The splits of the selection protocol in the dataset's own terms: (what ``split="val"`` trains on, what it
    is scored on, what ``split="test"`` trains on before the one test). For reports, e.g. a sweep's."""
    prefix = _parse(spec)[0]
    if prefix in ("vtab", "suite"):
        return "train800", "val200", "train800val200"
    if prefix == "fgvc":
        return "train", "val", "train+val"
    return ("the training images less a held-out part (or train/)", "that held-out part (or val/)",
            "all training images")


def _is_fgvc(name: str) -> bool:
    try:
        canonical_name(name)
    except DatasetError:
        return False
    return True


def expand_specs(specs: str | list[str]) -> list[str]:
    """Comma-separated specs (or a list) with "suite:all" / "vtab:all" / "fgvc:all" expanded into single tasks."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        prefix, rest = _parse(item)
        if rest == "all" and prefix in _FAMILIES:
            out += [f"{prefix}:{name}" for name in _FAMILIES[prefix]]
        else:
            _check_name(prefix, rest)
            out.append(f"{prefix}:{rest}")  # "digits" -> "suite:digits"
    return out


_CHECK_NAME = {"suite": check_suite_name, "vtab": check_vtab_name, "fgvc": canonical_name}


def _check_name(prefix: str, name: str) -> None:
    """A typo in a task name is an error when the specs are read, not in the log of a run started later (compare
    and sweep expand their specs before starting any). Folders are checked when they are loaded."""
    if prefix in _CHECK_NAME:
        _CHECK_NAME[prefix](name)


def _root(data_root: str | Path | None, prefix: str) -> Path:
    root = data_root or os.environ.get("MLAE_DATA_ROOT")
    if not root:
        raise DatasetError(f"'{prefix}:' datasets need data_root (--data-root <folder holding them>) or the MLAE_DATA_ROOT "
                           "environment variable")
    return Path(root).expanduser()


def load_task(spec: str, *, data_root: str | Path | None = None, image_size: int = 32, split: str = "test",
              holdout: float = 0.2, seed: int = 0, cache: bool = True, skip_bad: bool = False) -> Task:
    """Load a task from a spec.

    split="test" trains on train+val (VTAB's train800val200) and evaluates on test, the paper protocol;
    split="val" trains on train (train800) and evaluates on val (val200), for hyperparameter search.
    `holdout` and `seed` choose the held-out images of folders without train/test sub-folders; `seed` also seeds
    the embedded suite. `cache=False` decodes afresh and writes no cache file. `skip_bad` (folders only) trains
    without the images that cannot be read, listed in `Task.skipped`, instead of stopping.
    """
    check_split(split)
    prefix, rest = _parse(spec)
    if skip_bad and prefix != "folder":
        raise DatasetError(f"skipping unreadable images applies to 'folder:' datasets only, not {spec!r} (a "
                           "benchmark's splits must stay complete)")
    if rest == "all" and prefix in _FAMILIES:
        raise DatasetError(f"{spec!r} names several tasks: train one (e.g. suite:digits), or run them all with "
                           f"mlae compare --datasets {spec} (in Python: mlae.data.expand_specs)")
    if prefix == "suite":
        return make_suite_task(rest, image_size=image_size, split=split, seed=seed)
    if prefix == "folder":
        return load_folder(rest, image_size=image_size, split=split, holdout=holdout, seed=seed, cache=cache,
                           skip_bad=skip_bad)
    if prefix == "vtab":
        check_vtab_name(rest)  # before asking for data_root: a typo should be named as such
        return load_vtab(rest, _root(data_root, prefix), image_size=image_size, split=split, cache=cache)
    return load_fgvc(rest, _root(data_root, prefix), image_size=image_size, split=split, cache=cache)
