"""Shared pieces of the dataset layer: the `Task`/`Split` containers, image decoding and the uint8 cache.

Every loader turns a list of `(image path, label)` entries into a `Split` of uint8 RGB tensors of one fixed
size. Decoding happens once: the result is kept in memory and (optionally) written as a safetensors file next
to the data, keyed by a hash of the entry list and of every image file's size and times, so that an edited list
file or a replaced image invalidates it.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, MLAEWarning
from ..files import atomic_save_file, user_cache_dir
from ..hardware import cpu_cores

__all__ = ["DatasetError", "Split", "Task", "Entry", "check_split", "decode_entries", "cached_split", "to_rgb",
           "clear_cache"]

CACHE_DIR_NAME = ".mlae_cache"
CACHE_FORMAT = "mlae-cache-2"  # 2: the key covers every file's size and times
# Splits at least this big get a progress bar while decoding.
PROGRESS_MIN = 512
# Bad images named in one error, at most (the count of the others follows).
MAX_LISTED = 100
# Decoded splits kept in memory (each VTAB test split at 224 px is up to ~5 GB, so keep only a few).
MEMORY_CACHE_SIZE = 8


class DatasetError(InputError):
    """A dataset could not be loaded; the message names the file (and line) at fault."""


def check_split(split: str) -> None:
    """Refuse an evaluation protocol other than "test" (train on train+val, evaluate on test) or "val" (train on
    train, evaluate on val). A plain ValueError: it is the caller's argument at fault, not a dataset."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")


@dataclass(eq=False)
class Split:
    """One split of a task: `images` uint8 [N, 3, S, S] RGB, `labels` int64 [N]; `skipped`: image files left
    out because they could not be read (`skip_bad`)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"Split.images must be uint8 [N, 3, S, S], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"Split.labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> "Split":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(self.images[index], self.labels[index])

    @staticmethod
    def concat(splits: Sequence["Split"]) -> "Split":
        return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


@dataclass(eq=False)
class Task:
    """A classification task: what to train on (`train`) and what to report (`eval`, named `eval_name`).

    `augment` tells `prepare_batch` how to turn the cached uint8 images into model inputs: "none" (images are
    cached at `image_size`) or "fgvc" (cached larger, random crop + flip for training, centre crop for eval).
    """

    name: str
    num_classes: int
    domain: str
    train: Split
    eval: Split
    eval_name: str
    augment: str = "none"
    image_size: int = 32
    classes: list[str] | None = field(default=None, repr=False)
    skipped: list[str] = field(default_factory=list, repr=False)  # unreadable images left out (skip_bad)

    def __repr__(self) -> str:
        return (f"Task({self.name!r}, classes={self.num_classes}, domain={self.domain!r}, train={len(self.train)}, "
                f"{self.eval_name}={len(self.eval)}, size={self.image_size}, augment={self.augment!r})")


@dataclass(frozen=True)
class Entry:
    """One image to decode; `source` is "<file>:<line>" for error messages."""

    path: Path
    label: int
    source: str


# --------------------------------------------------------------------------------------------- decoding

_HIGH_BIT_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb(img):
    """Any PIL mode -> RGB. High bit-depth greyscale (I;16, I, F) is rescaled instead of clipped at 255."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_DEPTH:
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # 16-bit: 65535 -> 255
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif top > 255.0:  # 32-bit "I" (older Pillow opens 16-bit PNGs so): assume 16-bit unless larger
            arr = arr * (255.0 / max(65535.0, top))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    # Alpha is dropped (not composited), as torchvision's default loader does.
    return img.convert("RGB")


def _decode_one(entry: Entry, size: int, resample: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(entry.path) as img:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = to_rgb(img)
                if img.size != (size, size):
                    img = img.resize((size, size), resample=resample)
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise DatasetError(f"{entry.source}: image not found: {entry.path}") from None
    except DatasetError:
        raise
    except Exception as err:  # PIL raises a zoo of types for broken files
        raise DatasetError(f"{entry.source}: cannot decode image {entry.path}: {err}") from err


SKIP_HINT = "folder datasets can leave them out with --skip-bad-images"


def decode_entries(entries: Sequence[Entry], size: int, *, resample: str = "bicubic", desc: str = "decoding",
                   skip_bad: bool = False, skip_hint: str | None = SKIP_HINT) -> Split:
    """Decode and resize every entry to `size`×`size` RGB with a thread pool (PIL releases the GIL).

    Every missing or undecodable image is named in one error (not one per run); `skip_bad` leaves them out
    instead, listed in the returned split's `skipped` and in a warning."""
    from PIL import Image

    if not entries:
        raise DatasetError(f"{desc}: no images")
    mode = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resample]
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    bad: dict[int, str] = {}
    bar = _progress(len(entries), desc)
    workers = min(8, cpu_cores())

    def work(i: int) -> None:
        try:
            images[i] = _decode_one(entries[i], size, mode)
        except DatasetError as err:
            bad[i] = str(err)

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(work, range(len(entries))):
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    problems = [bad[i] for i in sorted(bad)]
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:MAX_LISTED]) + (f"\n  (and {len(problems) - MAX_LISTED} more)"
                                                     if len(problems) > MAX_LISTED else "")
        hint = f"; {skip_hint}" if skip_hint else ""  # only where the command has --skip-bad-images
        raise DatasetError(f"{len(problems)} of {len(entries)} images cannot be read (fix or remove them{hint}):"
                           f"\n  {shown}")
    keep = [i for i in range(len(entries)) if i not in bad]
    if not keep:
        raise DatasetError(f"{desc}: no readable images (all {len(entries)} failed, e.g. {problems[0]})")
    if problems:
        warnings.warn(f"skipped {len(problems)} unreadable image(s): " + "; ".join(
            str(entries[i].path) for i in sorted(bad)), MLAEWarning, stacklevel=2)
    labels = np.fromiter((entries[i].label for i in keep), dtype=np.int64, count=len(keep))
    return Split(torch.from_numpy(images[keep] if problems else images), torch.from_numpy(labels),
                 skipped=tuple(str(entries[i].path) for i in sorted(bad)))


def _progress(total: int, desc: str):
    if total < PROGRESS_MIN:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False)


# --------------------------------------------------------------------------------------------- caching

_memory: "OrderedDict[tuple[str, str], Split]" = OrderedDict()


def clear_cache() -> None:
    """Forget the splits decoded in this process (the files on disk stay)."""
    _memory.clear()


def entries_key(entries: Sequence[Entry], root: Path, size: int, resample: str) -> str:
    """Hash of what a decoded split depends on: the (relative path, label) list, the size and the resampling,
    and each image file's size and modification and change times, so that a replaced, rewritten or deleted
    image is decoded again (a change time moves even when a copy keeps the old modification time)."""
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{resample}\n".encode())
    for e in entries:
        try:
            rel = e.path.relative_to(root).as_posix()
        except ValueError:
            rel = e.path.as_posix()
        try:
            st = e.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        except OSError:
            stamp = "missing"  # never a hit: decoding then names the missing file
        h.update(f"{rel}\t{e.label}\t{stamp}\n".encode())
    return h.hexdigest()


def _fallback_cache_dir(root: Path) -> Path:
    return user_cache_dir() / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


def cache_paths(root: Path, filename: str) -> list[Path]:
    """Where a cache file may live: next to the data first, then the per-user fallback."""
    return [root / CACHE_DIR_NAME / filename, _fallback_cache_dir(root) / filename]


def _read_cache(path: Path, key: str) -> Split | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                return None
            return Split(f.get_tensor("images"), f.get_tensor("labels"))
    except (OSError, ValueError, RuntimeError, KeyError):
        return None  # absent, truncated or foreign: decode again


def _write_cache(paths: Sequence[Path], split: Split, key: str, info: dict) -> Path | None:
    meta = {"key": key, "format": CACHE_FORMAT, "info": json.dumps(info)}
    tensors = {"images": split.images.contiguous(), "labels": split.labels.contiguous()}
    for path in paths:
        try:
            atomic_save_file(tensors, path, meta)
            return path
        except OSError:
            continue  # read-only data folder: try the next location
    warnings.warn(f"could not write a dataset cache to any of {[str(p) for p in paths]}", MLAEWarning)
    return None


def cached_split(entries: Sequence[Entry], *, root: Path, cache_name: str, size: int, cache: bool = True,
                 resample: str = "bicubic", desc: str | None = None, skip_bad: bool = False) -> Split:
    """Decode `entries` at `size` px, or return them from the memory / disk cache when neither the entry list nor
    any image file changed (see `entries_key`).

    `cache_name` names the file (`<root>/.mlae_cache/<cache_name>_<size>.safetensors`, or the per-user cache
    folder when the data folder cannot be written). `cache=False` always decodes and stores nothing.
    """
    desc = desc or f"decoding {root.name}/{cache_name}"
    if not cache:
        return decode_entries(entries, size, resample=resample, desc=desc, skip_bad=skip_bad)
    key = entries_key(entries, root, size, resample)
    mem_key = (str(root.resolve()), key)
    if mem_key in _memory:
        _memory.move_to_end(mem_key)
        return _memory[mem_key]
    paths = cache_paths(root, f"{cache_name}_{size}.safetensors")
    split = next((s for s in (_read_cache(p, key) for p in paths) if s is not None), None)
    if split is None:
        split = decode_entries(entries, size, resample=resample, desc=desc)
        _write_cache(paths, split, key, {"root": str(root), "split": cache_name, "size": size, "n": len(split)})
    _memory[mem_key] = split
    while len(_memory) > MEMORY_CACHE_SIZE:
        _memory.popitem(last=False)
    return split
