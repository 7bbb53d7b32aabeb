"""Fine-grained visual classification (FGVC) in the VPT layout.

`<root>/<name>/{train,val,test}.json` map an image path to its class id. VPT resolves the paths against a
dataset-specific image folder (`images/` for CUB and NABirds, `Images/` for Stanford Dogs, the dataset folder
itself for Flowers and Cars); paths relative to the dataset folder are accepted too. Class names are the image
folders when each class has its own (CUB's `001.Black_footed_Albatross/`, Stanford Dogs' `n02085620-Chihuahua/`). Images are cached at the
"resize 256" size (bilinear, as VPT's torchvision Resize) and cropped in `prepare_batch`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import DatasetError, Entry, Split, Task, cached_split, check_split
from .transforms import fgvc_cache_size

__all__ = ["FGVC_TASKS", "FGVC_LAYOUT", "load_fgvc", "read_json_split"]

FGVC_TASKS: dict[str, int] = {
    "CUB": 200,
    "NABirds": 555,
    "OxfordFlowers": 102,
    "StanfordDogs": 120,
    "StanfordCars": 196,
}
# name -> (folder names tried under data_root, image folder the json paths are relative to)
FGVC_LAYOUT: dict[str, tuple[tuple[str, ...], str]] = {
    "CUB": (("CUB", "CUB_200_2011", "cub"), "images"),
    "NABirds": (("NABirds", "nabirds"), "images"),
    "OxfordFlowers": (("OxfordFlowers", "OxfordFlower", "flowers102", "oxford_flowers"), ""),
    "StanfordDogs": (("StanfordDogs", "Stanford-dogs", "stanford_dogs"), "Images"),
    "StanfordCars": (("StanfordCars", "Stanford-cars", "stanford_cars"), ""),
}
_PROTOCOL = {"test": (("train", "val"), "test"), "val": (("train",), "val")}


def canonical_name(name: str) -> str:
    for known in FGVC_TASKS:
        if name.lower() in (known.lower(), *(alias.lower() for alias in FGVC_LAYOUT[known][0])):
            return known
    raise DatasetError(f"unknown FGVC dataset {name!r}; known: {', '.join(FGVC_TASKS)}")


def _key_lines(text: str, keys) -> list[int]:
    """Line of each key in the raw json text (keys come in file order), so errors can point at the line."""
    lines, at, line = [], 0, 1
    for key in keys:
        found = -1
        for quoted in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
            found = text.find(quoted, at)
            if found >= 0:
                break
        if found >= 0:
            line += text.count("\n", at, found)
            at = found
        lines.append(line)
    return lines


def read_json_split(path: Path, root: Path, image_dir: str, num_classes: int) -> list[Entry]:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: cannot parse json: {err.msg}") from None
    if not isinstance(mapping, dict):
        raise DatasetError(f"{path}:1: expected a json object mapping image path -> class id")
    if not mapping:
        raise DatasetError(f"{path}: empty split (no images)")
    base = root / image_dir
    entries = []
    for (rel, label), line in zip(mapping.items(), _key_lines(text, mapping)):
        source = f"{path}:{line}"
        if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).lstrip("-").isdigit():
            raise DatasetError(f"{source}: cannot parse label {label!r} of {rel!r}: expected an integer class id")
        y = int(label)
        if not 0 <= y < num_classes:
            raise DatasetError(f"{source}: label {y} outside [0, {num_classes}) for {rel!r}")
        image = base / rel
        if image_dir and not image.is_file() and (root / rel).is_file():
            image = root / rel
        entries.append(Entry(image, y, source))
    return entries


def class_names_from_folders(entries: list[Entry], num_classes: int) -> list[str] | None:
    """Each class's image folder name, when every class has exactly one folder of its own; else None."""
    folders: dict[int, set[str]] = {}
    for e in entries:
        folders.setdefault(e.label, set()).add(e.path.parent.name)
    names = [next(iter(folders[k])) if len(folders.get(k, ())) == 1 else None for k in range(num_classes)]
    return names if None not in names and len(set(names)) == num_classes else None


def load_fgvc(name: str, data_root: str | Path, *, image_size: int = 224, split: str = "test",
              cache: bool = True) -> Task:
    name = canonical_name(name)
    check_split(split)
    folders, image_dir = FGVC_LAYOUT[name]
    candidates = [Path(data_root) / f for f in folders]
    root = next((c for c in candidates if c.is_dir()), None)
    if root is None:
        raise DatasetError(f"FGVC folder for {name!r} not found; tried {', '.join(map(str, candidates))}")
    num_classes = FGVC_TASKS[name]
    size = fgvc_cache_size(image_size)

    seen: list[Entry] = []

    def load(split_name: str):
        entries = read_json_split(root / f"{split_name}.json", root, image_dir, num_classes)
        seen.extend(entries)
        return cached_split(entries, root=root, cache_name=split_name, size=size, cache=cache,
                            resample="bilinear", desc=f"decoding {name}/{split_name}")

    train_names, eval_name = _PROTOCOL[split]
    train_parts = [load(s) for s in train_names]
    train = train_parts[0] if len(train_parts) == 1 else Split.concat(train_parts)
    evaluation = load(eval_name)
    return Task(name=name, num_classes=num_classes, domain="fgvc", train=train, eval=evaluation,
                eval_name=split, augment="fgvc", image_size=image_size,
                classes=class_names_from_folders(seen, num_classes))
