"""Exporting a trained adapter (``mlae export``): folded into a plain timm checkpoint, or as a PEFT LoRA adapter."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, NotMergeableError

__all__ = ["export_file", "timm_pretrained_cfg"]


def _file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timm_pretrained_cfg(meta: dict) -> dict:
    """The inputs a merged model expects, in timm's ``pretrained_cfg`` terms (what resolve_data_config reads):
    resized to image_size (FGVC: resized larger, then centre-cropped), [0, 1], normalised with these statistics."""
    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .data.transforms import fgvc_cache_size

    size = int(meta["image_size"])
    fgvc = meta.get("augment") == "fgvc"
    return {"input_size": [3, size, size], "mean": list(meta.get("input_mean") or IMAGENET_MEAN),
            "std": list(meta.get("input_std") or IMAGENET_STD), "interpolation": "bilinear" if fgvc else "bicubic",
            "crop_pct": size / fgvc_cache_size(size) if fgvc else 1.0, "crop_mode": "center",
            "num_classes": int(meta["num_classes"]), **({"label_names": meta["classes"]} if meta.get("classes") else {})}


def _check_outside_run(adapter: Path, target: Path) -> None:
    """Refuse an ``out`` that is the adapter itself or lies in its run folder: ``--overwrite`` would replace the
    trained adapter (or the run's other files) with the export, and the run could not be evaluated again."""
    source, where = adapter.resolve(), target.resolve()
    run = source.parent
    in_run = (run / "config.yaml").exists() or (run / "results.json").exists()  # a `mlae train` folder
    if where == source or (in_run and (where == run or run in where.parents)):
        raise InputError(f"--out {target} is {'the adapter itself' if where == source else 'inside its run folder'} "
                         f"{run}: the export would mix with (with --overwrite, replace) the run's files; choose --out "
                         f"outside {run}")


def export_file(adapter: str, fmt: str, out: str, overwrite: bool = False) -> Path:
    """``fmt="merged"``: a ``.safetensors`` ``out`` is one file (timm name, kwargs, pretrained_cfg and provenance in
    its metadata); any other ``out`` is a folder in timm's ``local-dir:`` layout (``config.json`` +
    ``model.safetensors``). ``fmt="peft"``: a PEFT adapter folder. An existing ``out`` needs ``overwrite``."""
    import mlae
    from .trained import load_trained, merged_state_dict, timm_spec, weights_file
    from .files import atomic_save_file, atomic_write_text

    adapter = weights_file(adapter)  # a run folder names its adapter file (the provenance hashes that file)
    target = Path(out)
    if fmt == "peft" and target.suffix == ".safetensors":  # a PEFT adapter is a folder, never one file
        raise InputError(f"--format peft writes a folder (adapter_config.json + adapter_model.safetensors), not "
                         f"{target.name}; give --out a folder name such as {target.with_suffix('')}")
    _check_outside_run(Path(adapter), target)
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise InputError(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    model, meta = load_trained(adapter)
    if meta.get("merged"):
        raise InputError(f"{adapter} is already a merged export (a plain timm checkpoint): export the run's "
                         "adapter.safetensors instead")
    if not all(layer.mergeable for _, layer in mlae.adapter_layers(model)):
        raise NotMergeableError(f"{adapter} is a {meta.get('method')} adapter: its gates weigh the LoRAs anew for "
                                "every input, so it has no merged or single-LoRA form to export; use it as it is "
                                f"(mlae eval --adapter {adapter})")
    if fmt == "peft":
        return mlae.export_peft(model, out)
    mlae.merge(model)
    name, kwargs = timm_spec(meta)
    pretrained_cfg = timm_pretrained_cfg(meta)
    provenance = {"method": meta.get("method"), "source_adapter": str(Path(adapter).resolve()),
                  "source_sha256": _file_sha256(adapter), "backbone": meta.get("backbone"),
                  "dataset": meta.get("dataset"), "classes": meta.get("classes"),
                  # what `mlae eval` needs to test the merged model on the run's own split
                  **{k: meta.get(k) for k in ("dataset_spec", "data_root", "seed", "augment", "skip_bad_images", "split")}}
    header = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs, sort_keys=True),
              "num_classes": str(meta["num_classes"]), "image_size": str(meta["image_size"]),
              "input_mean": json.dumps(pretrained_cfg["mean"]), "input_std": json.dumps(pretrained_cfg["std"]),
              # timm.create_model(name, pretrained=True, pretrained_cfg_overlay={**this, "file": path}, **kwargs)
              "pretrained_cfg": json.dumps(pretrained_cfg),
              "mlae_provenance": json.dumps(provenance, sort_keys=True)}
    if target.suffix == ".safetensors":
        return atomic_save_file(merged_state_dict(model), target, header)
    # timm's local-dir layout (timm.models.load_model_config_from_path reads it)
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    config = {"architecture": name.partition(".")[0], "num_classes": int(meta["num_classes"]),
              "pretrained_cfg": pretrained_cfg, "model_args": model_args, "mlae_provenance": provenance}
    atomic_save_file(merged_state_dict(model), target / "model.safetensors", header)
    atomic_write_text(target / "config.json", json.dumps(config, indent=2) + "\n")
    return target
