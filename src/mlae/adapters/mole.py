"""MoLE: Mixture of LoRA Experts (Wu et al., ICLR 2024).

``N`` already-trained LoRAs stay frozen; a learned gate mixes their outputs in every gated layer:

    E_i(x) = B_i A_i x                                   output of LoRA i (its scaling folded into B_i)
    ε      = W_g · flatten(LayerNorm(concat_i E_i(x)))   one logit per LoRA
    G      = softmax(ε / τ)
    y      = W x + b + Σ_i G_i E_i(x)

Choices (docs/METHODS.md): the gate runs per token (``x: [..., in]`` gives one ``G`` per position, the official
code's per-token gating over the output dimension; a ``[B, in]`` input is gated per sample). ``granularity``:
"layer" gives every gated layer its own gate, "block" shares one gate (its weights) between the gated layers of
a transformer block, "network" one gate for all -- a shared gate needs equal output sizes. ``W_g`` starts at
zero, so training starts from the plain average of the LoRAs. The experts are stored as buffers in the adapter
file, so a saved MoLE is self-contained. Gating balance loss ``−Σ_i log q_i`` (``q_i``: LoRA ``i``'s weight
averaged over gated layers and tokens) comes from :func:`mlae.aux_losses` as ``"balance"``.

Experts come from our ``.safetensors`` adapters (any mergeable method: the same layer classes rebuild each
update's factors) or from PEFT LoRA folders. :func:`select_experts` switches LoRAs off at inference (softmax
over the kept logits); :func:`arithmetic_merge` is the weighted-sum baseline.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .. import patterns
from ..errors import InputError, MissingFileError, NotMergeableError
from .base import AdapterConfig, AdapterLayer

__all__ = ["MoLEConfig", "MoLELinear", "from_adapters", "read_expert", "select_experts", "arithmetic_merge",
           "GRANULARITIES"]

GRANULARITIES = ("layer", "block", "network")
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])


@dataclass
class MoLEConfig(AdapterConfig):
    method = "mole"
    expert_ranks: list[int] = field(default_factory=lambda: [8, 8])
    """Rank of each LoRA expert, in source order (set by from_adapters; N = len(expert_ranks))."""
    rank_pattern: dict[str, list[int]] = field(default_factory=dict)
    """Per-module expert ranks where they differ from expert_ranks."""
    granularity: str = "block"
    """"layer": a gate per gated layer; "block": one gate shared by a block's gated layers (official code);
    "network": one gate for all gated layers."""
    temperature: float = 1.0
    """Softmax temperature τ of the gate: < 1 sharpens, > 1 flattens."""
    sources: list[str] = field(default_factory=list)
    """Where the experts came from (a record only: their weights are in the adapter file)."""

    def __post_init__(self):
        super().__post_init__()
        for ranks in [self.expert_ranks, *self.rank_pattern.values()]:
            if not ranks or any(isinstance(r, bool) or int(r) != r or r < 1 for r in ranks):
                raise InputError(f"expert ranks must be non-empty lists of positive integers, got {ranks!r}")
            if len(ranks) != len(self.expert_ranks):
                raise InputError(f"every rank list needs one rank per expert ({len(self.expert_ranks)}), got {ranks}")
        self.expert_ranks = [int(r) for r in self.expert_ranks]
        self.rank_pattern = {k: [int(r) for r in v] for k, v in self.rank_pattern.items()}
        if self.granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        self.sources = [str(s) for s in self.sources]

    def layer_plan(self, names: list[str]) -> list[dict[str, Any]]:
        # A gate group is a dict shared by its layers: the first layer creates (and owns) the gate there.
        keys = {"layer": names, "block": [patterns.layer_index(n) for n in names], "network": [0] * len(names)}
        groups: dict[Any, dict] = {}
        return [{"ranks": self.rank_pattern.get(n, self.expert_ranks), "group": groups.setdefault(k, {})}
                for n, k in zip(names, keys[self.granularity])]

    def create_layer(self, base: nn.Linear, ranks: list[int], group: dict) -> "MoLELinear":
        return MoLELinear(base, ranks, self.temperature, group)


class MoLEGate(nn.Module):
    """``ε = W_g · LayerNorm(concat_i E_i)`` for stacked expert outputs ``e: [..., N, out]``."""

    def __init__(self, experts: int, out_features: int, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(experts * out_features, device=device)
        self.proj = nn.Linear(experts * out_features, experts, device=device)
        nn.init.zeros_(self.proj.weight)  # uniform weights at the start: the average of the LoRAs
        nn.init.zeros_(self.proj.bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(e.flatten(-2)))


class MoLELinear(AdapterLayer):
    mergeable = False  # the gate weights depend on the input

    def __init__(self, base: nn.Linear, ranks: list[int], temperature: float, group: dict):
        super().__init__(base)
        dev = base.weight.device
        self.ranks, self.temperature = list(ranks), temperature
        n, total = len(ranks), sum(ranks)
        # All experts stacked like one LoRA of rank Σ r_i; `membership[i]` selects expert i's rank components.
        self.register_buffer("lora_A", torch.zeros(total, base.in_features, device=dev))
        self.register_buffer("lora_B", torch.zeros(base.out_features, total, device=dev))
        owner = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(ranks, device=dev))
        self.register_buffer("membership", F.one_hot(owner, n).T.float(), persistent=False)
        if "gate" not in group:
            group.update(gate=MoLEGate(n, base.out_features, device=dev), out=base.out_features)
            self.lora_gate = group["gate"]  # registered (trained, saved) by the group's first layer only
        elif group["out"] != base.out_features:
            raise InputError(f"a shared MoLE gate needs equal output sizes, but {base.out_features} != {group['out']};"
                             " use granularity='layer' or gate layers of one size")
        self._gate = (group["gate"],)  # a tuple, so that sharing layers do not register it again
        self.active: torch.Tensor | None = None  # experts kept by select_experts (None: all)
        self.last_weights: torch.Tensor | None = None  # mean gate weights of the last forward, [N]

    @property
    def experts(self) -> int:
        return len(self.ranks)

    @torch.no_grad()
    def set_experts(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Load the experts' ``(A_i, B_i)`` (scaling folded into ``B_i``)."""
        self.lora_A.copy_(torch.cat([a for a, _ in factors]))
        self.lora_B.copy_(torch.cat([b for _, b in factors], dim=1))

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N, out]``: every LoRA's output, from one A matmul and one B matmul over the stacked experts."""
        h = F.linear(x, self.lora_A)
        return F.linear(h.unsqueeze(-2) * self.membership.to(h.dtype), self.lora_B)

    def gate_weights(self, e: torch.Tensor) -> torch.Tensor:
        logits = self._gate[0](e)
        if self.active is not None:
            logits = logits.masked_fill(~self.active, float("-inf"))  # renormalise over the kept experts
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expert_outputs(x)
        g = self.gate_weights(e)
        self.last_weights = g.reshape(-1, self.experts).mean(0)
        return (g.to(e.dtype).unsqueeze(-1) * e).sum(-2)

    def factors(self):
        raise NotMergeableError("a MoLE layer's update depends on the input: it has no single (A, B)")

    @staticmethod
    def collect_aux_losses(layers: list["MoLELinear"]) -> dict[str, torch.Tensor]:
        """Gating balance loss ``−Σ_i log q_i`` over the kept experts, ``q`` averaged over layers and tokens."""
        weights = [layer.last_weights for layer in layers if layer.last_weights is not None]
        if not weights:
            return {}
        q = torch.stack(weights).mean(0)
        active = layers[0].active
        return {"balance": -torch.log(q if active is None else q[active]).sum()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ranks={self.ranks}, temperature={self.temperature}"


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
    from ..io import read_adapter_config

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
    from ..inject import adapter_layers, apply

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
    from ..inject import adapter_layers

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
    from ..inject import adapter_layers, apply
    from .lora import LoRAConfig

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
