"""VTAB-1k in the layout used by NOAH / SPT / RepAdapter / FacT.

`<root>/<name>/{train800,val200,train800val200,test}.txt`, one `relative/path.jpg <label>` per line (path relative
to `<root>/<name>`; the last whitespace-separated token is the label, so paths may contain spaces). Train and test
images are both bicubic-resized to the model size, with no augmentation. The lists hold label numbers only; an
optional `<root>/<name>/classes.txt` (one class name per line, line k = label k) names them.
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Entry, Task, cached_split, check_split

__all__ = ["VTAB_TASKS", "VTAB_GROUPS", "check_vtab_name", "load_vtab", "read_list", "read_class_names"]

# name -> (number of classes, VTAB group)
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar": (100, "natural"),
    "caltech101": (102, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_GROUPS = ("natural", "specialized", "structured")

# split argument of load_task -> (list files to train on, list file to evaluate on)
_PROTOCOL = {"test": ("train800val200", "test"), "val": ("train800", "val200")}


def read_list(path: Path, num_classes: int) -> list[Entry]:
    """Parse one VTAB list file into entries, checking syntax and label range (not yet the images)."""
    if not path.is_file():
        raise DatasetError(f"{path}: list file not found")
    root = path.parent
    entries = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not path text
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            source = f"{path}:{lineno}"
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise DatasetError(f"{source}: cannot parse {text!r}: expected '<relative image path> <label>'")
            rel, label = parts
            try:
                y = int(label)
            except ValueError:
                raise DatasetError(f"{source}: cannot parse {text!r}: label {label!r} is not an integer") from None
            if not 0 <= y < num_classes:
                raise DatasetError(f"{source}: label {y} outside [0, {num_classes}) for {root.name}")
            entries.append(Entry(root / rel, y, source))
    if not entries:
        raise DatasetError(f"{path}: empty split (no '<path> <label>' lines)")
    return entries


def read_class_names(path: Path, num_classes: int) -> list[str] | None:
    """Class names from `classes.txt` (one per line, line k = label k), or None when there is no such file."""
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DatasetError(f"{path}: {len(names)} class names for {num_classes} classes (one name per line, "
                           "line k = label k)")
    return names


def check_vtab_name(name: str) -> None:
    if name not in VTAB_TASKS:
        raise DatasetError(f"unknown VTAB-1k dataset {name!r}; known: {', '.join(VTAB_TASKS)} (or vtab:all)")


def load_vtab(name: str, data_root: str | Path, *, image_size: int = 32, split: str = "test",
              cache: bool = True) -> Task:
    check_vtab_name(name)
    check_split(split)
    num_classes, domain = VTAB_TASKS[name]
    root = Path(data_root) / name
    if not root.is_dir():
        raise DatasetError(f"{root}: VTAB-1k folder for {name!r} not found (expected <data_root>/{name}/"
                           "{train800,val200,train800val200,test}.txt)")
    train_list, eval_list = _PROTOCOL[split]

    def load(list_name: str):
        entries = read_list(root / f"{list_name}.txt", num_classes)
        return cached_split(entries, root=root, cache_name=list_name, size=image_size, cache=cache,
                            resample="bicubic", desc=f"decoding {name}/{list_name}")

    return Task(name=name, num_classes=num_classes, domain=domain, train=load(train_list), eval=load(eval_list),
                eval_name=split, augment="none", image_size=image_size,
                classes=read_class_names(root / "classes.txt", num_classes))
