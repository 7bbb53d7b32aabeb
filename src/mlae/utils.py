"""Seeding and random-state helpers, the parsers of option values, and matplotlib figures to PNG files, shared by
the commands."""
from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from .errors import InputError
from .files import atomic_write

__all__ = [
    "get_rng_state",
    "parse_bool",
    "parse_list",
    "pyplot",
    "save_png",
    "seed_everything",
    "set_rng_state",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (CPU and CUDA), numpy and Python random states as (tensors, JSON-able dict)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, py_state, gauss = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(py_state), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(tensors["torch"].cpu())
    cuda = [tensors[f"cuda.{i}"].cpu() for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = info["python"]
    random.setstate((version, tuple(py_state), gauss))


def parse_bool(text: str | bool) -> bool:
    """An option's boolean from the command line or a recipe: 1/true/yes/on or 0/false/no/off (any case)."""
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"not a boolean: {text!r}")


def parse_list(text: str | list | tuple) -> list[str]:
    """A list option: a YAML list as it is, or text separated by commas and/or spaces (``qkv,proj``)."""
    return list(text) if isinstance(text, (list, tuple)) else [t for t in re.split(r"[,\s]+", text) if t]


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures to files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG through :func:`atomic_write` and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)
