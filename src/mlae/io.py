"""Adapters on disk: safetensors with a JSON config in the metadata; export to a standard PEFT LoRA adapter.

Files a user hands us are read with safetensors only -- never unpickled.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .adapters.base import AdapterConfig, config_from_dict
from .errors import InputError, MLAEWarning, NotMergeableError
from .files import atomic_save_file, read_safetensors_header
from .inject import (CONFIG_ATTR, HEADS_ATTR, adapter_layers, apply, backbone_fingerprint, freeze_backbone,
                     learned_values)

__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "read_adapter_config", "read_adapter_learned",
           "export_peft", "atomic_save_file"]

FORMAT = "mlae.adapter/1"


def _saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (everything in adapter layers but the frozen base) and the fully trained modules."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for k, v in layer.adapter_state_dict().items():
            out[f"{name}.{k}"] = v
    modules = dict(model.named_modules())
    for name in getattr(model, HEADS_ATTR, []):
        for k, v in modules[name].state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapters, the trained head and the config to ``path`` (safetensors). ``metadata``: any
    JSON-serialisable facts to keep with it (backbone name, number of classes, dataset...). A fingerprint of
    the frozen backbone goes with it, so that loading onto other backbone weights is noticed."""
    config: AdapterConfig | None = getattr(model, CONFIG_ATTR, None)
    if config is None and not getattr(model, HEADS_ATTR, None):
        raise InputError("the model has no adapters and no trained head to save; call mlae.apply first")
    if Path(path).is_dir():
        raise InputError(f"{path} is a folder; name the adapter file to write, e.g. {Path(path) / 'adapter.safetensors'}")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict of JSON-serialisable facts, got {type(metadata).__name__}")
    try:
        metadata_json = json.dumps(metadata or {}, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise InputError(f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {err}") from None
    fingerprint = backbone_fingerprint(model)
    header = {
        "format": FORMAT,
        "config": config.to_json() if config is not None else "null",
        "adapted_modules": json.dumps([n for n, _ in adapter_layers(model)]),
        "modules_to_save": json.dumps(getattr(model, HEADS_ATTR, [])),
        "metadata": metadata_json,
        **({"backbone_sha256": fingerprint} if fingerprint else {}),
        # e.g. MLAE's learned masking probability per layer: training-only, so kept as facts, not tensors
        "learned": json.dumps(learned_values(model), sort_keys=True),
    }
    return atomic_save_file(_saved_state(model), path, header)


def _read_header(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists():
        raise InputError(f"{path} is a PEFT adapter directory, not an mlae adapter file")
    header = read_safetensors_header(path, "adapter file", "; adapters are only read as safetensors, never unpickled")
    if header.get("format") != FORMAT:
        raise InputError(f"{path} is a safetensors file but not an mlae adapter (metadata format is "
                         f"{header.get('format')!r}, expected {FORMAT!r})")
    for key in ("config", "adapted_modules", "modules_to_save", "metadata", "learned"):
        try:
            json.loads(header[key]) if key in header else None
        except ValueError:
            raise InputError(f"{path}: its {key!r} metadata is not valid JSON: the file is damaged") from None
    missing = [k for k in ("config", "adapted_modules", "modules_to_save") if k not in header]
    if missing:
        raise InputError(f"{path}: the adapter metadata lacks {', '.join(missing)}: the file is damaged")
    return header


def _file_config(header: dict[str, str], path: str | os.PathLike, warn: bool = False) -> dict[str, Any] | None:
    """The adapter config of a file's header. A file saved with train_head=False and modules_to_save (earlier
    mlae froze those modules and saved them untrained; the pair is refused now) is read with train_head=True,
    which loads exactly the saved weights and keeps the file usable."""
    config = json.loads(header["config"])
    if isinstance(config, dict) and config.get("train_head") is False and config.get("modules_to_save"):
        if warn:
            warnings.warn(f"{path} was saved with train_head=False and modules_to_save={config['modules_to_save']}, "
                          "a pair mlae now refuses; it is read with train_head=True (the saved modules hold the "
                          "weights they were saved with)", MLAEWarning, stacklevel=3)
        config = {**config, "train_head": True}
    return config


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` given to :func:`save_adapter` (backbone, dataset, ...)."""
    return json.loads(_read_header(path)["metadata"])


def read_adapter_learned(path: str | os.PathLike) -> dict[str, dict]:
    """What the adapters learned besides their updates, by layer (:func:`mlae.learned_values` at save time)."""
    return json.loads(_read_header(path).get("learned", "{}"))


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig | None:
    """The adapter config stored in the file (``None`` for a head-only linear probe)."""
    d = _file_config(_read_header(path), path)
    return None if d is None else config_from_dict(d)


def load_adapter(model: nn.Module, path: str | os.PathLike, check_backbone: str = "warn") -> nn.Module:
    """Apply the config saved in ``path`` to ``model`` (unless already applied) and load the weights.
    Every tensor must fit the model; the error lists those that do not. When the model's frozen weights
    differ from those the adapter was trained on (fingerprints differ), ``check_backbone`` says what to do:
    ``"warn"``, ``"error"`` (ValueError) or ``"ignore"``."""
    if check_backbone not in ("warn", "error", "ignore"):
        raise InputError(f"check_backbone must be warn, error or ignore, not {check_backbone!r}")
    header = _read_header(path)
    cfg_dict = _file_config(header, path, warn=True)
    saved_names, heads = json.loads(header["adapted_modules"]), json.loads(header["modules_to_save"])
    current: AdapterConfig | None = getattr(model, CONFIG_ATTR, None)
    if cfg_dict is None:
        if current is not None:
            raise InputError(f"{path} holds a head-only (linear probe) adapter but the model already has adapters")
        freeze_backbone(model, modules_to_save=heads)
    elif current is None:
        apply(model, config_from_dict(cfg_dict))
    elif current.to_dict() != cfg_dict:
        raise InputError(f"the model already has adapters with another config than {path}: "
                         f"{current.to_dict()} vs {cfg_dict}")
    names = [n for n, _ in adapter_layers(model)]
    if names != saved_names:
        raise InputError(f"{path} adapts {len(saved_names)} modules ({saved_names[:3]}...) but on this model the "
                         f"config adapts {len(names)} ({names[:3]}...): is it the same architecture?")
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise InputError("unmerge the model before loading adapter weights into it")
    expected = _saved_state(model)
    problems = []
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for k in sorted(keys):
            if k not in expected:
                problems.append(f"{k}: in the file but not in the model")
                continue
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(expected[k].shape):
                problems.append(f"{k}: file has shape {list(shape)}, model has {list(expected[k].shape)}")
        problems += [f"{k}: missing from the file" for k in sorted(set(expected) - keys)]
        if problems:
            raise InputError(f"{path} does not fit this model:\n  " + "\n  ".join(problems[:10]) +
                             ("\n  (a head shape mismatch means a different num_classes)" if heads else ""))
        saved_fp = header.get("backbone_sha256")
        own_fp = backbone_fingerprint(model) if saved_fp and check_backbone != "ignore" else saved_fp
        if own_fp != saved_fp:
            message = (f"{path} was trained on other backbone weights than this model's (fingerprint "
                       f"{saved_fp[:12]} in the file, {(own_fp or 'none')[:12]} here): was the backbone "
                       "checkpoint replaced or a different one passed? Its accuracy would be meaningless")
            half = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
            if half:  # the fingerprint hashes exact values: the same weights cast to bf16 hash differently
                message += (f" (or only cast: this model has {', '.join(half)} weights; load the adapter into the "
                            "fp32 model and cast afterwards)")
            if check_backbone == "error":
                raise InputError(message)
            warnings.warn(message, MLAEWarning, stacklevel=2)
        tensors = {k: f.get_tensor(k) for k in keys}
    # safetensors has no checksum: damaged bytes read as numbers, often NaN. Refuse them before copying any.
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InputError(f"{path}: {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''} hold NaN/inf values; "
                         "the file is damaged, or was saved from a diverged run")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    learned = json.loads(header.get("learned", "{}"))
    for name, layer in adapter_layers(model):
        if name in learned:
            layer.restore_learned_values(learned[name])
    return model


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a standard HF PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
    Every mergeable adapter is a LoRA of rank R with ``ΔW = B A`` (MLAE: ``B' = s·B·diag(c)``), so it is
    exported with ``lora_alpha = r`` (scaling 1) per layer; the head goes in ``modules_to_save``."""
    layers = list(adapter_layers(model))
    if not layers:
        raise InputError("the model has no adapters to export")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file, but a PEFT adapter is a folder (adapter_config.json + "
                         "adapter_model.safetensors): choose another path")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in layers:
            if not layer.mergeable:
                raise NotMergeableError(f"{type(layer).__name__} ({name}) is input dependent and has no PEFT LoRA "
                                        "form")
            a, b = layer.factors()
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.float()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.float()
            ranks[name] = a.shape[0]
    heads = getattr(model, HEADS_ATTR, [])
    modules = dict(model.named_modules())
    for h in heads:
        for k, v in modules[h].state_dict().items():
            tensors[f"base_model.model.{h}.{k}"] = v
    r = max(ranks.values())
    uneven = {n: k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": r, "rank_pattern": uneven, "alpha_pattern": dict(uneven),
        "target_modules": sorted(ranks), "modules_to_save": heads or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_file(tensors, directory / "adapter_model.safetensors", {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
