"""Tiny on-disk datasets in the real layouts, for tests (ours and other modules').

Images are class-dependent (a per-class colour and stripe direction plus noise), so a model can learn them,
and cycle through PIL modes (RGB, L, P, RGBA, CMYK, I;16) and formats (JPEG, PNG) to exercise decoding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fgvc import FGVC_LAYOUT, FGVC_TASKS, canonical_name
from .vtab import VTAB_TASKS

__all__ = ["make_vtab_folder", "make_fgvc_folder", "make_image_folder", "write_image", "MODES"]

MODES = ("RGB", "L", "P", "RGBA", "CMYK", "I;16")
_JPEG_MODES = {"RGB", "L", "CMYK"}


def _class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    hue = np.array([np.sin(label * 2.4), np.sin(label * 2.4 + 2.1), np.sin(label * 2.4 + 4.2)]) * 0.4 + 0.5
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = np.sin(2 * np.pi * 3 * (xx if label % 2 else yy) + rng.uniform(0, 6.3)) * 0.25
    img = hue[None, None, :] + stripes[..., None] + rng.normal(0, 0.05, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image(path: Path, array: np.ndarray, mode: str) -> Path:
    """Save an RGB uint8 array in `mode` (JPEG when the mode allows it, else PNG); returns the path written."""
    from PIL import Image

    img = Image.fromarray(array, "RGB")
    if mode == "P":
        img = img.quantize(16)
    elif mode == "I;16":
        img = Image.fromarray(array.mean(-1).astype(np.uint16) * 257)  # 16-bit greyscale PNG
    elif mode != "RGB":
        img = img.convert(mode)
    path = path.with_suffix(".jpg" if mode in _JPEG_MODES else ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def make_vtab_folder(root: str | Path, name: str = "cifar", n_train: int = 16, n_test: int = 8, size: int = 32,
                     num_classes: int | None = None, n_val: int | None = None, seed: int = 0) -> Path:
    """Write `<root>/<name>/{train800,val200,train800val200,test}.txt` and their images; returns `root`.

    train800 holds `n_train` images, val200 `n_val` (default n_train // 4, at least 1), test `n_test`. Labels use
    the first `num_classes` classes (default: min(4, the dataset's classes)), cycling so that every class appears.
    """
    root = Path(root)
    real = VTAB_TASKS[name][0]
    num_classes = min(4, real) if num_classes is None else num_classes
    if not 0 < num_classes <= real:
        raise ValueError(f"num_classes must be in [1, {real}] for {name}")
    n_val = max(1, n_train // 4) if n_val is None else n_val
    rng = np.random.default_rng(seed)
    folder = root / name
    lines: dict[str, list[str]] = {}
    k = 0
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines[split] = []
        for y in _labels(n, num_classes, rng):
            path = write_image(folder / "images" / split / f"{k:06d}", _class_image(int(y), size, rng),
                               MODES[k % len(MODES)])
            lines[split].append(f"{path.relative_to(folder).as_posix()} {int(y)}")
            k += 1
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_fgvc_folder(root: str | Path, name: str = "CUB", n_train: int = 12, n_val: int = 4, n_test: int = 8,
                     size: int = 48, num_classes: int | None = None, seed: int = 0) -> Path:
    """Write `<root>/<name>/{train,val,test}.json` (VPT layout) and images under the dataset's image folder.

    Images are stored as `<image folder>/<class>/<index>.<ext>`; returns `root`.
    """
    root = Path(root)
    name = canonical_name(name)
    real = FGVC_TASKS[name]
    num_classes = min(4, real) if num_classes is None else num_classes
    if not 0 < num_classes <= real:
        raise ValueError(f"num_classes must be in [1, {real}] for {name}")
    rng = np.random.default_rng(seed)
    folder = root / name
    image_dir = folder / FGVC_LAYOUT[name][1]
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        mapping = {}
        for y in _labels(n, num_classes, rng):
            path = write_image(image_dir / f"{int(y):03d}.class" / f"{k:06d}", _class_image(int(y), size, rng),
                               MODES[k % len(MODES)])
            mapping[path.relative_to(image_dir).as_posix()] = int(y)
            k += 1
        (folder / f"{split}.json").write_text(json.dumps(mapping, indent=1))
    return root


def make_image_folder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 5,
                      size: int = 24, subsets: tuple[str, ...] = (), seed: int = 0) -> Path:
    """ImageFolder layout: `<root>/<class>/*`, or `<root>/<subset>/<class>/*` for `subsets` like ("train", "test")."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    k = 0
    for subset in subsets or ("",):
        for y, cls in enumerate(classes):
            for _ in range(per_class):
                write_image(root / subset / cls / f"{k:05d}", _class_image(y, size, rng), MODES[k % len(MODES)])
                k += 1
    return root
