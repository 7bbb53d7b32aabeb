"""Your own images in the ImageFolder layout: one sub-folder per class, class ids = sorted folder names.

If `<path>/train` exists it is the training set and `<path>/test` (else `<path>/val`) the evaluation set.
Without sub-folders a stratified, seeded fraction `holdout` of every class is held out for evaluation.
split="val" never evaluates on the test images: it uses `<path>/val` when present, otherwise it holds a
further fraction out of the training images. macOS's `._*` AppleDouble files are not images and are ignored; a
class folder without images still counts as a class (its name gives it an index) and is warned about.
`skip_bad` trains without the images that cannot be read (listed in `Task.skipped`) instead of stopping.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import MLAEWarning
from .base import CACHE_DIR_NAME, DatasetError, Entry, Split, Task, cached_split, check_split

__all__ = ["IMAGE_EXTENSIONS", "image_paths", "load_folder", "scan_folder", "stratified_holdout"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def _class_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_paths(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively, sorted), without our decode cache and macOS's ``._*`` files."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and CACHE_DIR_NAME not in p.parts and not p.name.startswith("._"))


def scan_folder(path: Path, classes: list[str]) -> list[Entry]:
    """Every image under `<path>/<class>/` (recursively, sorted), labelled by the class's index in `classes`."""
    found = _class_dirs(path)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{path}: class folder(s) {unknown} not among the training classes {classes}")
    entries = []
    for label, name in enumerate(classes):
        folder = path / name
        if not folder.is_dir():
            continue
        entries += [Entry(p, label, str(p)) for p in image_paths(folder)]
    if not entries:
        raise DatasetError(f"{path}: empty split (no images with extensions {sorted(IMAGE_EXTENSIONS)} "
                           "in class folders)")
    return entries


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of each class (at least one image when a class has two or more)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def load_folder(path: str | Path, *, image_size: int = 32, split: str = "test", holdout: float = 0.2, seed: int = 0,
                cache: bool = True, skip_bad: bool = False) -> Task:
    check_split(split)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found")
    has = {s: (root / s).is_dir() for s in ("train", "val", "test")}
    class_root = root / "train" if has["train"] else root
    classes = _class_dirs(class_root)
    if not classes:
        raise DatasetError(f"{class_root}: no class sub-folders (expected <path>/<class>/<image> or "
                           "<path>/{train,test}/<class>/<image>)")
    if len(classes) < 2:  # a one-way classifier is 100 % right on everything and learns nothing
        raise DatasetError(f"{class_root}: only one class folder ({classes[0]}); a classifier needs at least two "
                           "(one sub-folder per class)")

    skipped: list[str] = []

    def load(sub: str) -> Split:
        entries = scan_folder(root / sub if sub != "all" else root, classes)
        if sub in ("train", "all"):
            empty = sorted(set(classes) - {classes[e.label] for e in entries})
            if empty:
                warnings.warn(f"{root / sub if sub != 'all' else root}: class folder(s) {empty} hold no images but "
                              f"still count as classes ({len(classes)} outputs); remove them if that is a mistake",
                              MLAEWarning, stacklevel=3)
        # A cached split does not remember which images were skipped: decode afresh when skipping.
        data = cached_split(entries, root=root, cache_name=sub, size=image_size, cache=cache and not skip_bad,
                            desc=f"decoding {root.name}/{sub}", skip_bad=skip_bad)
        skipped.extend(data.skipped)
        return data

    def hold_out(data: Split, salt: int) -> tuple[Split, Split]:
        keep, held = stratified_holdout(data.labels.numpy(), holdout, seed * 1000003 + salt)
        if len(held) == 0:
            raise DatasetError(f"{root}: too few images to hold out a fraction {holdout} per class")
        return data.subset(keep), data.subset(held)

    if has["train"]:
        train = load("train")
        if split == "test":
            eval_sub = "test" if has["test"] else "val" if has["val"] else None
            if eval_sub is None:
                train, evaluation = hold_out(train, 0)
            else:
                if eval_sub == "test" and has["val"]:
                    train = Split.concat([train, load("val")])
                evaluation = load(eval_sub)
        elif has["val"] and has["test"]:
            evaluation = load("val")
        else:
            train, evaluation = hold_out(train, 1)
    else:
        train, evaluation = hold_out(load("all"), 0)
        if split == "val":
            train, evaluation = hold_out(train, 1)
    return Task(name=root.name, num_classes=len(classes), domain="folder", train=train, eval=evaluation,
                eval_name=split, augment="none", image_size=image_size, classes=classes, skipped=skipped)
