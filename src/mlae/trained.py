"""The trained weights file a run leaves (adapter or whole model): its metadata, writing it, rebuilding from it."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backbones import (DEFAULT_ARCH, DEFAULT_EMBEDDED, EMBEDDED, EMBEDDED_ARCH, EMBEDDED_VERSIONS, _looks_like_path,
                        card_folder, create_backbone, embedded_card)
from .errors import InputError, MissingFileError
from .files import atomic_save_file, read_safetensors_header
from .inject import adapter_layers
from .io import load_adapter, read_adapter_metadata, save_adapter

if TYPE_CHECKING:  # annotations only: the engine imports this module
    from .engine import Inputs, TrainConfig

__all__ = ["load_trained", "weights_file", "expert_source", "absolute_spec", "read_weights_metadata",
           "weights_metadata", "save_weights", "timm_spec", "merged_state_dict", "build_backbone", "backbone_kwargs",
           "ADAPTER_FILE", "MODEL_FILE", "MODEL_FORMAT", "CHECKPOINT", "checkpoint_settings", "what_folder"]

ADAPTER_FILE = "adapter.safetensors"  # the weights in the run folder: the adapter's,
MODEL_FILE = "model.safetensors"      # or the whole model's (full fine-tuning), in this format:
MODEL_FORMAT = "mlae.model/1"
CHECKPOINT = "checkpoint.safetensors"  # an unfinished run's state (the run folder's, see rundir)


# --------------------------------------------------------------------------------------------- the network


def backbone_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of mlae.backbones.create_backbone besides num_classes (stored with the weights)."""
    kwargs = {"pretrained": cfg.pretrained, "arch": cfg.arch, "img_size": cfg.img_size,
              "patch_size": cfg.patch_size}
    return {k: v for k, v in kwargs.items() if v is not None}


def build_backbone(name: str | None, num_classes: int, seed: int, drop_path: float = 0.0, **kwargs) -> nn.Module:
    """The backbone, with any randomly initialised weights drawn from ``seed`` so that `mlae eval` can rebuild
    exactly the network a run was trained on."""
    torch.manual_seed(seed)
    return create_backbone(name, num_classes=num_classes, drop_path_rate=drop_path, **kwargs)


# --------------------------------------------------------------------------------------------- writing


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def absolute_spec(spec: str) -> str:
    """A dataset spec that means the same from any folder: ``folder:`` specs get an absolute path."""
    prefix, _, rest = spec.partition(":")
    return f"folder:{_absolute(rest)}" if prefix == "folder" else spec


def weights_metadata(cfg: TrainConfig, task, inputs: Inputs, normalize: str) -> dict[str, Any]:
    """What `mlae eval` / `mlae export` need to rebuild the network the weights belong to and feed it. Paths
    are made absolute, so that the file works from any folder."""
    # The version, so that the file still names its weights when the default changes.
    backbone = DEFAULT_EMBEDDED if cfg.backbone in (None, EMBEDDED) else cfg.backbone
    is_path = backbone not in EMBEDDED_VERSIONS and _looks_like_path(backbone)
    return {"backbone": _absolute(backbone) if is_path else backbone,
            "backbone_kwargs": backbone_kwargs(cfg),
            "num_classes": task.num_classes, "seed": cfg.seed, "image_size": inputs.image_size,
            "normalize": normalize, "input_mean": inputs.mean, "input_std": inputs.std, "augment": task.augment,
            "dataset": task.name, "dataset_spec": absolute_spec(cfg.dataset),
            "data_root": _absolute(cfg.data_root), "method": cfg.method, "classes": task.classes,
            "skip_bad_images": cfg.skip_bad_images,
            "split": cfg.split}  # "test": trained on train+val, so its val split is no held-out set


def save_weights(out: Path, model: nn.Module, adapter: bool, meta: dict[str, Any]) -> None:
    """The trained weights into the run folder ``out`` with ``meta`` (:func:`weights_metadata`): the adapter's
    (``adapter.safetensors``) or, for full fine-tuning, the whole model's (``model.safetensors``)."""
    if adapter:
        save_adapter(model, out / ADAPTER_FILE, metadata=meta)
    else:
        atomic_save_file(model.state_dict(), out / MODEL_FILE,
                         {"format": MODEL_FORMAT, "metadata": json.dumps(meta, sort_keys=True)})


# --------------------------------------------------------------------------------------------- reloading


def _read_header(path: str | os.PathLike) -> dict[str, str]:
    return read_safetensors_header(path, "weights file")


def _merged_metadata(header: dict[str, str]) -> dict[str, Any]:
    """A merged export's header (`mlae export --format merged`) in the terms of a run's metadata. Exports written
    before the provenance recorded the dataset spec, seed and augmentation lack them (eval then needs
    --dataset); their augmentation follows from the crop the pretrained_cfg describes."""
    provenance = json.loads(header.get("mlae_provenance") or "{}")
    cfg = json.loads(header.get("pretrained_cfg") or "{}")
    return {**provenance, "merged": True, "timm_model": header["timm_model"],
            "timm_kwargs": json.loads(header["timm_kwargs"]), "num_classes": int(header["num_classes"]),
            "image_size": int(header["image_size"]), "input_mean": json.loads(header["input_mean"]),
            "input_std": json.loads(header["input_std"]),
            "augment": provenance.get("augment") or ("fgvc" if cfg.get("crop_pct", 1.0) < 1.0 else "none")}


def read_weights_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata a run stored with its weights (adapter file, full model file, or a merged export)."""
    header = _read_header(path)
    if "timm_model" in header:
        return _merged_metadata(header)
    meta = json.loads(header["metadata"]) if header.get("format") == MODEL_FORMAT else read_adapter_metadata(path)
    if "backbone" not in meta or "num_classes" not in meta:
        raise InputError(f"{path}: no backbone metadata; was it written by `mlae train`?")
    return meta


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run folder the weights file in it (``adapter.safetensors``, else the full model's
    ``model.safetensors``): `mlae eval`, `predict` and `export` take either, as `mlae analyze` does."""
    p = Path(path)
    if not p.is_dir():
        return p
    for name in (ADAPTER_FILE, MODEL_FILE):
        if (p / name).is_file():
            return p / name
    raise MissingFileError(f"{p} holds no {ADAPTER_FILE} or {MODEL_FILE}: {what_folder(p)}")


def checkpoint_settings(path: Path) -> dict | None:
    """The settings a checkpoint records (``config``: what the run started with), None where it records none."""
    from .files import read_safetensors_header

    return json.loads(read_safetensors_header(path, "checkpoint")["state"]).get("config")


def what_folder(p: Path) -> str:
    """What a folder without trained weights is, and what to do, for the errors of the commands that read them."""
    if (p / CHECKPOINT).is_file() and p.parent.name == "trials" and (p.parent.parent / "study.db").exists():
        return "an unfinished trial of a sweep; run the sweep command again to finish it"
    if (p / CHECKPOINT).is_file():
        return (f"an unfinished run; finish it with `mlae train --resume --out {shlex.quote(str(p))}` (its "
                "settings come from its config.yaml), or name a finished run")
    if (p / "adapter_config.json").is_file():
        return ("a PEFT adapter folder (`mlae export --format peft`), which PEFT loads; name the run folder it was "
                "exported from")
    if (p / "runs").is_dir():
        return "an `mlae compare` folder: name one of its run folders, runs/<label>/<dataset>/s<seed>"
    return "is it the folder of a finished `mlae train` run?"


def expert_source(path: str | os.PathLike) -> str:
    """A trained LoRA for MoLE's ``--experts-from``: an adapter file or a PEFT adapter folder as given, and the
    folder of an `mlae train` run as its adapter file."""
    p = Path(path)
    if not p.is_dir() or (p / "adapter_config.json").is_file():
        return str(path)
    if (p / ADAPTER_FILE).is_file():
        return str(p / ADAPTER_FILE)
    if (p / MODEL_FILE).is_file():
        raise InputError(f"{p} is a full fine-tuning run ({MODEL_FILE}, no {ADAPTER_FILE}): MoLE mixes trained "
                         "LoRA-style adapters")
    raise MissingFileError(f"{p} is neither a PEFT adapter folder (no adapter_config.json) nor the folder of a "
                           f"finished `mlae train` run (no {ADAPTER_FILE})")


def load_trained(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a run saved (``adapter.safetensors`` or ``model.safetensors``, or the run folder
    holding it; or a merged export, file or folder), in eval mode."""
    from safetensors.torch import load_file

    path = weights_file(path)
    meta = read_weights_metadata(path)
    if meta.get("merged"):
        import timm

        model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
        model.load_state_dict(load_file(str(path)))
        return model.eval(), meta
    backbone = _saved_backbone(meta)
    model = build_backbone(backbone, int(meta["num_classes"]), int(meta.get("seed", 0)), **meta["backbone_kwargs"])
    if _read_header(path).get("format") == MODEL_FORMAT:
        model.load_state_dict(load_file(str(path)))
    else:
        # a replaced backbone checkpoint would give a meaningless accuracy: refuse it
        model = load_adapter(model, path, check_backbone="error")
    return model.eval(), meta


# Files written before weights recorded the embedded version say "embedded"; the default was v2 then.
LEGACY_EMBEDDED = "embedded-v2"


def _saved_backbone(meta: dict[str, Any]) -> str:
    return LEGACY_EMBEDDED if meta["backbone"] == EMBEDDED else meta["backbone"]


def timm_spec(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model name, kwargs) such that ``timm.create_model(name, **kwargs)`` builds the architecture of a run's
    backbone, head included."""
    kwargs = {k: v for k, v in meta["backbone_kwargs"].items() if k in ("img_size", "patch_size")}
    name = _saved_backbone(meta)
    folder = card_folder(name)
    if folder is not None:
        kwargs = dict(embedded_card(folder).get("arch") or EMBEDDED_ARCH)
        name = kwargs.pop("model_name")
    elif meta["backbone_kwargs"].get("arch") or Path(name).suffix:
        name = meta["backbone_kwargs"].get("arch") or DEFAULT_ARCH  # a checkpoint file of that architecture
    return name, {**kwargs, "num_classes": int(meta["num_classes"])}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a merged model under the backbone's own names: each adapter layer contributes its
    (merged) base layer's tensors, its adapter tensors are dropped."""
    layers = [name for name, layer in adapter_layers(model)]
    if any(not layer.merged for _, layer in adapter_layers(model)):
        raise ValueError("merge the model first")
    out = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + ".base."):
            out[owner + key[len(owner) + len(".base"):]] = value
    return out
