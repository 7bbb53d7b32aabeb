"""The suite's task registry, each task declared once, and how a task is built from it: a seeded random stream
per (seed, task, split), class-balanced labels, resizing, and an in-memory cache of the generated splits."""
from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..base import DatasetError, Split, Task, check_split
from . import clevr, digits, norb, sprites, textures
from .canvas import SUITE_SIZE

N_TRAIN, N_VAL, MIN_TEST = 800, 200, 1000

Renderer = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # labels [N] -> float images [N, 32, 32, 3]


@dataclass(frozen=True)
class SuiteTask:
    """One suite task: its VTAB-like domain, how its label is defined (one line), what each class means (their
    number is the task's class count) and its renderer (None for digits, which splits real images instead)."""

    domain: str
    definition: str
    classes: tuple[str, ...]
    render: Renderer | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _bins(template: str, start: float, step: float, n: int) -> tuple[str, ...]:
    """Names of `n` classes: `{v:g}` in `template` is the class's value (bin start or centre, count), `{w:g}` its
    end for range bins. Start and step restate the label definitions of the renderers."""
    return tuple(template.format(v=start + k * step, w=start + (k + 1) * step) for k in range(n))


_TASKS: dict[str, SuiteTask] = {
    "digits": SuiteTask(
        "natural", "the digit 0-9 of scikit-learn's 8x8 handwritten digits (1,797 real images; test = the 797 left)",
        _bins("{v:g}", 0, 1, digits.CLASSES)),
    "dsprites_loc": SuiteTask(
        "structured", "16 equal bins of a white-ish sprite's x centre over [6, 26) px",
        _bins("x {v:g}-{w:g} px", 6, 1.25, sprites.LOC_BINS), sprites.render_dsprites_loc),
    "dsprites_ori": SuiteTask(
        "structured", "16 equal bins of an asymmetric sprite's rotation over [0, 360)",
        _bins("rotation {v:g}-{w:g} deg", 0, 22.5, sprites.ORI_BINS), sprites.render_dsprites_ori),
    "clevr_count": SuiteTask(
        "structured", "number of CLEVR-like objects minus 3 (3-10 objects)",
        _bins("{v:g} objects", clevr.MIN_OBJECTS, 1, clevr.COUNT_CLASSES), clevr.render_clevr_count),
    "clevr_dist": SuiteTask(
        "structured", "6 equal bins of the nearest object's camera depth over [5.0, 9.8)",
        _bins("depth {v:g}-{w:g}", 5.0, 0.8, clevr.DIST_BINS), clevr.render_clevr_dist),
    "smallnorb_azi": SuiteTask(
        "structured", "18 bins of 20 deg of the camera azimuth around a box-built toy",
        _bins("azimuth {v:g} deg", 0, 20, norb.AZI_BINS), norb.render_smallnorb_azi),
    "smallnorb_ele": SuiteTask(
        "structured", "9 bins of 5 deg of the camera elevation (30-70 deg) above a box-built toy",
        _bins("elevation {v:g} deg", 30, 5, norb.ELE_BINS), norb.render_smallnorb_ele),
    "textures": SuiteTask(
        "natural", "procedural texture family: " + ", ".join(textures.FAMILIES),
        textures.FAMILIES, textures.render_textures),
}

# name -> (number of classes, VTAB-like domain, how the label is defined): the registry as the rest of mlae reads it
SUITE_TASKS: dict[str, tuple[int, str, str]] = {name: (t.num_classes, t.domain, t.definition)
                                                for name, t in _TASKS.items()}


def suite_class_names(name: str) -> list[str]:
    """What each label of a suite task means, e.g. "3 objects" or "azimuth 40 deg"."""
    return list(_TASKS[name].classes)


def split_sizes(name: str) -> tuple[int, int, int]:
    """(train, val, test) sizes of a suite task; test is the smallest multiple of the class count >= 1000."""
    if name == "digits":
        return N_TRAIN, N_VAL, digits.TEST_SIZE
    num_classes = _TASKS[name].num_classes
    return N_TRAIN, N_VAL, -(-MIN_TEST // num_classes) * num_classes


def generate_split(name: str, part: int, seed: int = 0, n: int | None = None) -> Split:
    """Part 0 (train), 1 (val) or 2 (test) of a rendered suite task at the native 32 px (`n` overrides the size)."""
    task = _TASKS[name]
    if task.render is None:
        raise ValueError(f"{name} is not rendered (see make_suite_task)")
    n = split_sizes(name)[part] if n is None else n
    # one stream per (seed, task, split): a test image is never a training image, and tasks are independent
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2 ** 63, zlib.crc32(name.encode()), part]))
    labels = np.arange(n) % task.num_classes
    labels = labels[rng.permutation(n)]
    images = task.render(labels, rng)
    images = torch.from_numpy(np.rint(images * 255).clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def _resize(split: Split, size: int) -> Split:
    if size == SUITE_SIZE:
        return split
    x = F.interpolate(split.images.float(), size=(size, size), mode="bicubic", align_corners=False,
                      antialias=size < SUITE_SIZE)
    return Split(x.round().clamp(0, 255).to(torch.uint8), split.labels)


_generated: "OrderedDict[tuple[str, int, int], tuple[Split, Split, Split]]" = OrderedDict()


def _splits(name: str, seed: int, image_size: int) -> tuple[Split, Split, Split]:
    key = (name, int(seed), int(image_size))
    if key not in _generated:
        if image_size != SUITE_SIZE:  # resized from the native splits, which are cached too
            parts = tuple(_resize(s, image_size) for s in _splits(name, seed, SUITE_SIZE))
        elif name == "digits":
            parts = digits.splits(seed)
        else:
            parts = tuple(generate_split(name, k, seed) for k in range(3))
        _generated[key] = parts
        while len(_generated) > 48:
            _generated.popitem(last=False)
    _generated.move_to_end(key)
    return _generated[key]


def check_suite_name(name: str) -> None:
    if name not in _TASKS:
        raise DatasetError(f"unknown suite task {name!r}; known: {', '.join(_TASKS)} (or suite:all)")


def make_suite_task(name: str, *, image_size: int = 32, split: str = "test", seed: int = 0) -> Task:
    """An embedded task; split="test": train on train+val (1,000 images), evaluate on test; "val": 800 / 200."""
    check_suite_name(name)
    check_split(split)
    task = _TASKS[name]
    train, val, test = _splits(name, seed, image_size)
    if split == "test":
        train, evaluation = Split.concat([train, val]), test
    else:
        evaluation = val
    return Task(name=name, num_classes=task.num_classes, domain=task.domain, train=train, eval=evaluation,
                eval_name=split, augment="none", image_size=image_size, classes=suite_class_names(name))
