"""Using a trained run's weights: top-1 accuracy on a task (:func:`evaluate_file`, ``mlae eval``) and the classes
of image files (:func:`predict_files`, ``mlae predict``), fed exactly as the run was evaluated."""
from __future__ import annotations

import warnings
from pathlib import Path

from .errors import InputError, MissingFileError, MLAEWarning

__all__ = ["evaluate_file", "predict_files", "image_files"]


def evaluate_file(path: str, *, dataset: str | None = None, data_root: str | None = None, split: str = "test",
                  precision: str = "auto", device: str | None = None, experts: list[int] | None = None,
                  attention: str = "auto", cache: bool = True) -> dict:
    """Top-1 of the weights in ``path`` (adapter.safetensors or model.safetensors) on ``dataset`` (default: the
    one they were trained on). ``experts``: MoLE only, keep these experts."""
    from .adapters.mole import select_experts
    from .attention import set_attention
    from .data import load_task
    from .engine import Inputs, evaluate
    from .trained import absolute_spec, load_trained
    from .hardware import resolve_device, resolve_precision

    model, meta = load_trained(path)
    if experts is not None:
        select_experts(model, experts)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    spec = dataset or meta.get("dataset_spec") or (None if meta.get("merged") else meta["dataset"])
    if spec is None:
        raise InputError(f"{path} is a merged export that does not record its dataset spec (exports before "
                         f"2026-12-03): name it with --dataset (it was trained on {meta.get('dataset')!r})")
    if split == "val" and meta.get("split") == "test" and absolute_spec(spec) == meta.get("dataset_spec"):
        warnings.warn(f"{path} was trained with --split test, on train+val: the val split was among its training "
                      "images, so its val top-1 is no held-out accuracy; evaluate --split test, or train with "
                      "--split val to keep val out", MLAEWarning, stacklevel=2)
    task = load_task(spec, data_root=data_root if data_root is not None else meta.get("data_root"),
                     image_size=int(meta["image_size"]), split=split, seed=int(meta.get("seed", 0)), cache=cache,
                     skip_bad=bool(meta.get("skip_bad_images")) and spec.startswith("folder:"))
    if task.num_classes != int(meta["num_classes"]):
        raise InputError(f"{path} has a {meta['num_classes']}-class head but {task.name} has {task.num_classes} "
                         "classes")
    trained_on = meta.get("classes")
    if trained_on and task.classes and list(trained_on) != list(task.classes):
        pairs = [f"{k}: {a!r} vs {b!r}" for k, (a, b) in enumerate(zip(trained_on, task.classes)) if a != b]
        warnings.warn(f"{path} was trained on other class names than {task.name}'s (label {', '.join(pairs[:3])}"
                      f"{', ...' if len(pairs) > 3 else ''}); top-1 compares label numbers, so it means nothing "
                      "unless label k names the same class in both", MLAEWarning, stacklevel=2)
    inputs = Inputs(task.augment, int(meta["image_size"]), dev, meta.get("input_mean"), meta.get("input_std"))
    model = model.to(dev)
    set_attention(model, attention, device=dev, precision=prec)
    top1 = evaluate(model, task.eval, inputs, precision=prec)
    key = f"{task.eval_name}_top1"
    return {"adapter": str(path), "dataset": task.name, "eval_split": task.eval_name, "images": len(task.eval),
            "top1": top1, key: top1, "method": meta.get("method"), "precision": prec,
            "classes": task.classes or meta.get("classes"),
            **({"experts": experts} if experts is not None else {})}


def image_files(paths: list[str]) -> list[str]:
    """``paths`` with each folder replaced by the images under it (recursively, sorted, as a folder dataset
    finds them); a path that does not exist, or a folder without images, is an error."""
    from .data.folder import IMAGE_EXTENSIONS, image_paths

    files: list[str] = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise MissingFileError(f"{text}: no such file or folder")
        if not path.is_dir():
            files.append(text)
            continue
        found = [str(p) for p in image_paths(path)]
        if not found:
            raise InputError(f"{text}: a folder with no images in it (extensions "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
    return files


def predict_files(path: str, images: list[str], *, top: int = 1, device: str | None = None) -> list[dict]:
    """Top-``top`` classes of each image (a folder stands for the images under it), named by the class names
    stored with the weights (the label number when the dataset had none), fed exactly as in evaluation."""
    import torch

    from .data.base import Entry, decode_entries
    from .data.transforms import cache_size
    from .engine import EVAL_BATCH, Inputs
    from .trained import load_trained
    from .hardware import resolve_device

    model, meta = load_trained(path)
    images = image_files(images)
    dev = resolve_device(device)
    size, augment = int(meta["image_size"]), meta.get("augment", "none")
    names = meta.get("classes") or [str(k) for k in range(int(meta["num_classes"]))]
    split = decode_entries([Entry(Path(p), 0, p) for p in images], cache_size(augment, size), desc="images",
                           skip_hint=None)
    inputs = Inputs(augment, size, dev, meta.get("input_mean"), meta.get("input_std"))
    model = model.to(dev)
    with torch.inference_mode():
        probs = torch.cat([model(inputs(split.images[i:i + EVAL_BATCH], train=False)).float().softmax(-1).cpu()
                           for i in range(0, len(split), EVAL_BATCH)])
    best = probs.topk(min(top, probs.shape[1]), dim=-1)
    return [{"image": image, "top": [{"label": int(k), "name": names[int(k)], "probability": float(v)}
                                     for v, k in zip(values, labels)]}
            for image, values, labels in zip(images, best.values, best.indices)]
