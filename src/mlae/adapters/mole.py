"""MoLE (Mixture of LoRA Experts) on a whole model: experts read from trained adapters, the MoLE built from them,
expert selection at inference, the arithmetic-merge baseline and MoLE's training hooks.

Experts come from our ``.safetensors`` adapters (any mergeable method: the same layer classes rebuild each
update's factors) or from PEFT LoRA folders. :func:`select_experts` switches LoRAs off at inference (softmax
over the kept logits); :func:`arithmetic_merge` is the weighted-sum baseline.

The math, the config and the layer are in :mod:`mlae.adapters.mole_layer` (re-exported here). This module uses
``mlae.inject`` and ``mlae.io``, which import the adapters package, so the package does not import it: it sits
above them.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import nn

from ..errors import InputError, MissingFileError
from ..inject import apply
from ..io import read_adapter_config
from .base import TrainingHooks, adapter_layers
from .lora import LoRAConfig
from .mole_layer import GRANULARITIES, MoLEConfig, MoLEGate, MoLELinear

__all__ = ["MoLEConfig", "MoLELinear", "MoLEGate", "MoLETraining", "from_adapters", "read_expert", "select_experts",
           "arithmetic_merge", "GRANULARITIES"]

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])


class MoLETraining(TrainingHooks):
    """MoLE in the training loop: its gating balance loss (``"balance"`` of :func:`mlae.aux_losses`) counts with
    the weight of the method's ``balance_weight`` option."""

    def aux_loss_weights(self) -> dict[str, float]:
        return {"balance": self.options["balance_weight"]}


# --------------------------------------------------------------------------------------------- experts


def _linear(model: nn.Module, name: str, source) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    module = getattr(module, "base", module)  # already adapted: the frozen layer inside
    if not isinstance(module, nn.Linear):
        raise InputError(f"expert {source} adapts {name!r}, which is not an nn.Linear of this model")
    return module


def _read_mlae_file(path: Path, model: nn.Module) -> Factors:
    """Factors of a saved mlae adapter, rebuilt through its own layer class (no second copy of the math)."""
    config = read_adapter_config(path)
    if config is None:
        raise InputError(f"{path} is a linear probe (head only), not a LoRA-like adapter")
    if isinstance(config, MoLEConfig):
        raise InputError(f"{path} is a MoLE adapter, which is input dependent; MoLE experts must be LoRA-like "
                         "(lora, mlae, dmlora)")
    with safe_open(str(path), "pt") as f:
        names = json.loads(f.metadata()["adapted_modules"])
        out: Factors = {}
        for name, kwargs in zip(names, config.layer_plan(names)):
            target = _linear(model, name, path)
            # Built on the meta device (nothing allocated), then given the file's tensors.
            layer = config.create_layer(nn.Linear(target.in_features, target.out_features, device="meta"), **kwargs)
            state = {k: f.get_tensor(f"{name}.{k}") for k in layer.adapter_state_dict()}
            try:
                layer.load_state_dict(state, strict=False, assign=True)
            except RuntimeError as err:  # shape mismatch: trained on another backbone
                raise InputError(f"{path} does not fit {name} of this model (another backbone?): {err}") from None
            a, b = layer.factors()
            out[name] = (a.detach().float(), b.detach().float())
    return out


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or a dotted suffix (or regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_dir(path: Path, model: nn.Module) -> Factors:
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise InputError(f"{path} is a PEFT {config.get('peft_type')} adapter; MoLE experts must be LoRA")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise InputError(f"{path}: DoRA and fan_in_fan_out LoRAs are not supported as MoLE experts")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found (only safetensors PEFT adapters are read, never pickles)")
    prefix = "base_model.model."
    out: Factors = {}
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")]
            a, b = f.get_tensor(key).float(), f.get_tensor(f"{name}.lora_B.weight").float()
            name = name[len(prefix):] if name.startswith(prefix) else name
            target = _linear(model, name, path)
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise InputError(f"{path}: the LoRA of {name} is {b.shape[0]}x{a.shape[1]} but this model's layer is "
                                 f"{target.out_features}x{target.in_features} (another backbone?)")
            r = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
            scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            out[name] = (a, b * scaling)
    if not out:
        raise InputError(f"{weights} holds no LoRA weights")
    return out


def read_expert(source: str | os.PathLike, model: nn.Module) -> Factors:
    """One trained LoRA as ``{module name: (A, B)}``: an mlae ``.safetensors`` adapter or a PEFT LoRA folder.
    ``model`` is the backbone the experts will be used on (it sizes and checks the modules)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise MissingFileError(f"{path} is a folder without adapter_config.json: not a PEFT adapter")
        return _read_peft_dir(path, model)
    if not path.is_file():
        raise MissingFileError(f"expert adapter not found: {path}")
    return _read_mlae_file(path, model)


def _read_experts(sources: Sequence, model: nn.Module) -> tuple[list[str], list[Factors]]:
    if not sources:
        raise InputError("give at least one trained adapter to build experts from")
    experts = [read_expert(s, model) for s in sources]
    order = [n for n, _ in model.named_modules() if n in experts[0]]
    for source, e in zip(sources[1:], experts[1:]):
        if set(e) != set(experts[0]):
            diff = sorted(set(e) ^ set(experts[0]))
            raise InputError(f"all experts must adapt the same modules: {sources[0]} and {source} differ on "
                             f"{diff[:4]}{'...' if len(diff) > 4 else ''}")
    return order, experts


def from_adapters(model: nn.Module, sources: Sequence[str | os.PathLike], *, granularity: str = "block",
                  temperature: float = 1.0, train_head: bool = True,
                  modules_to_save: list[str] | None = None) -> nn.Module:
    """Turn ``model`` (a fresh backbone) into a MoLE over the trained LoRAs ``sources``; only the gates (and the
    head) are trainable. Returns ``model``."""
    names, experts = _read_experts(sources, model)
    ranks = {n: [e[n][0].shape[0] for e in experts] for n in names}
    common = Counter(tuple(r) for r in ranks.values()).most_common(1)[0][0]
    config = MoLEConfig(target_modules=names, expert_ranks=list(common),
                        rank_pattern={n: r for n, r in ranks.items() if tuple(r) != common},
                        granularity=granularity, temperature=temperature, sources=[str(s) for s in sources],
                        train_head=train_head, modules_to_save=modules_to_save)
    apply(model, config)
    for name, layer in adapter_layers(model):
        layer.set_experts([e[name] for e in experts])
    return model


def select_experts(model: nn.Module, indices: Sequence[int] | None) -> nn.Module:
    """Keep only the LoRAs ``indices`` (``None``: all again): the gate weights are renormalised over them
    (softmax over their logits), without retraining."""
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, MoLELinear)]
    if not layers:
        raise InputError("the model has no MoLE layers")
    n = layers[0].experts
    if indices is not None:
        indices = sorted({int(i) for i in indices})
        if not indices or indices[0] < 0 or indices[-1] >= n:
            raise InputError(f"expert indices must be a non-empty subset of 0..{n - 1}, got {indices}")
    for layer in layers:
        if indices is None:
            layer.active = None
        else:
            layer.active = torch.zeros(n, dtype=torch.bool, device=layer.lora_A.device)
            layer.active[indices] = True
    return model


def arithmetic_merge(model: nn.Module, sources: Sequence[str | os.PathLike],
                     weights: Sequence[float] | None = None) -> nn.Module:
    """The arithmetic-merge baseline: ``ΔW = Σ_i w_i B_i A_i`` (default ``w_i = 1/N``) as a plain LoRA adapter on
    ``model`` (a fresh backbone). Concatenating the factors with ``w_i`` folded into ``B_i`` is exact (PEFT's
    "linear" ``add_weighted_adapter``); layers of smaller total rank are zero-padded. The head stays trainable."""
    names, experts = _read_experts(sources, model)
    weights = [1.0 / len(experts)] * len(experts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(experts):
        raise InputError(f"got {len(weights)} weights for {len(experts)} experts")
    rank = max(sum(e[n][0].shape[0] for e in experts) for n in names)
    apply(model, LoRAConfig(target_modules=names, rank=rank, alpha=rank))  # scaling 1: B carries everything
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            a = torch.cat([e[name][0] for e in experts])
            b = torch.cat([w * e[name][1] for w, e in zip(weights, experts)], dim=1)
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.lora_A[: a.shape[0]] = a
            layer.lora_B[:, : b.shape[1]] = b
    return model
