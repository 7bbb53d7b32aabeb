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

This module holds MoLE's config and layer, which need nothing of mlae above ``adapters.base``. Building a MoLE from
trained adapters needs ``mlae.inject`` and ``mlae.io``, which import the adapters package: that part is
:mod:`mlae.adapters.mole` (a module above them, which the package does not import).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import patterns
from ..errors import InputError, NotMergeableError
from .base import AdapterConfig, AdapterLayer, option

__all__ = ["MoLEConfig", "MoLEGate", "MoLELinear", "GRANULARITIES"]

GRANULARITIES = ("layer", "block", "network")


@dataclass
class MoLEConfig(AdapterConfig):
    method = "mole"
    expert_ranks: list[int] = field(default_factory=lambda: [8, 8])
    """Rank of each LoRA expert, in source order (set by from_adapters; N = len(expert_ranks))."""
    rank_pattern: dict[str, list[int]] = field(default_factory=dict)
    """Per-module expert ranks where they differ from expert_ranks."""
    granularity: str = option("block", "one gate per adapted layer, per block or for the whole network",
                              choices=GRANULARITIES)
    """"layer": a gate per gated layer; "block": one gate shared by a block's gated layers (official code);
    "network": one gate for all gated layers."""
    temperature: float = option(1.0, "gate softmax temperature τ")
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
        mean = g.reshape(-1, self.experts).mean(0)
        # Only training's balance loss needs the graph; held in eval it would keep the graph alive and make the
        # model impossible to deepcopy.
        self.last_weights = mean if self.training else mean.detach()
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
