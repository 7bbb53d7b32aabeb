"""MLAE: Masked LoRA Experts (Wang et al.).

The update is cut into ``E`` independent rank-``k`` experts, each with a coefficient, and experts are masked:

    ΔW = s · Σ_i c_i · m_i · B_i A_i

All experts of a layer are stacked (``A: [E·k, in]``, ``B: [out, E·k]``), so the forward is one matmul pair
exactly like LoRA of rank ``E·k``; masking multiplies the ``E·k`` columns of B (or, per sample, the
``E·k`` hidden activations) by ``c · m / (1 - p)``. Masked experts thus contribute nothing and get zero gradient.

Masking strategies (paper §3.3): *stochastic* draws a Bernoulli mask on every training forward (expert-level
dropout, inverted so that evaluation uses all experts unscaled); *fixed* keeps ``n_l`` experts in layer ``l``
(only those are allocated: the others would never train or run); *mixed* is fixed counts plus stochastic masking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import patterns
from ..errors import InputError
from .base import AdapterConfig, AdapterLayer

__all__ = ["MLAEConfig", "MLAELinear"]


@dataclass
class MLAEConfig(AdapterConfig):
    method = "mlae"
    experts: int = 8
    """Number of experts E per layer (the fixed/mixed patterns scale their counts to mean E)."""
    expert_rank: int = 1
    """Rank k of each expert's sub-matrix (the paper's best: 1)."""
    dropout: float = 0.5
    """Expert-level masking probability p (stochastic and mixed masking). 0.5 is the median of the paper's
    per-dataset choices (Table 10); p = 0 is the "decomposition only" ablation."""
    coeff_init: float = 1.0
    """Initial value of every expert coefficient c_i."""
    adaptive: bool = True
    """Train the coefficients (False: frozen at coeff_init, the paper's ablation)."""
    masking: str = "stochastic"
    """"stochastic", "fixed" or "mixed"."""
    pattern: str | list[float] = "uniform"
    """Per-layer pattern: "uniform", "incremental", "decremental", "hourglass", "protruding", "random" (fixed
    and mixed only), or an explicit per-layer list (dropout rates for stochastic, expert counts otherwise)."""
    mask_granularity: str = "batch"
    """"batch": one mask per layer per forward, shared by the batch (official code); "sample": one per sample."""
    scale: float = 1.0
    """Global scale s of the update (the official code has no α/r factor)."""
    seed: int = 0
    """Seed of the random fixed pattern."""

    def __post_init__(self):
        super().__post_init__()
        self._require_positive_int("experts", "expert_rank")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.coeff_init) and math.isfinite(self.scale)):
            raise InputError("coeff_init and scale must be finite")
        if self.masking not in ("stochastic", "fixed", "mixed"):
            raise InputError(f"masking must be 'stochastic', 'fixed' or 'mixed', got {self.masking!r}")
        if self.mask_granularity not in ("batch", "sample"):
            raise InputError(f"mask_granularity must be 'batch' or 'sample', got {self.mask_granularity!r}")
        if isinstance(self.pattern, tuple):
            self.pattern = list(self.pattern)
        if isinstance(self.pattern, str) and self.pattern not in patterns.PATTERN_NAMES:
            raise InputError(f"unknown pattern {self.pattern!r}; choose one of {patterns.PATTERN_NAMES} or a list")
        if self.pattern == "random" and self.masking == "stochastic":
            raise InputError("the random pattern draws expert counts: use it with masking='fixed' or 'mixed'")

    def layer_plan(self, names: list[str]) -> list[dict[str, Any]]:
        def plan(depth: int) -> list[dict[str, Any]]:
            if self.masking == "stochastic":
                counts = [self.experts] * depth
                rates = patterns.dropout_rates(self.pattern, depth, self.dropout)
            else:
                counts = patterns.expert_counts(self.pattern, depth, self.experts, self.seed)
                rates = [self.dropout if self.masking == "mixed" else 0.0] * depth
            return [{"experts": n, "dropout": p} for n, p in zip(counts, rates)]

        return patterns.per_depth(names, plan)

    def create_layer(self, base: nn.Linear, experts: int, dropout: float) -> "MLAELinear":
        return MLAELinear(base, experts, self.expert_rank, dropout, self.coeff_init, self.adaptive,
                          self.scale, self.mask_granularity)


class MLAELinear(AdapterLayer):
    def __init__(self, base: nn.Linear, experts: int, expert_rank: int, dropout: float, coeff_init: float,
                 adaptive: bool, scale: float, granularity: str):
        super().__init__(base)
        dev = base.weight.device
        self.experts, self.expert_rank, self.p = experts, expert_rank, dropout
        self.scale, self.granularity = scale, granularity
        self.init_factors(experts * expert_rank)  # every expert gets LoRA's init on its own slice
        coeff = torch.full((experts,), float(coeff_init), device=dev)
        if adaptive:
            self.coeff = nn.Parameter(coeff)
        else:
            self.register_buffer("coeff", coeff)

    def _mask(self, shape: tuple[int, ...], device) -> torch.Tensor:
        keep = 1.0 - self.p
        return torch.empty(shape, device=device).bernoulli_(keep) / keep

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeff * self.scale
        masked = self.training and self.p > 0
        if masked and self.granularity == "sample":
            # One mask per sample, broadcast over tokens: scale the E·k hidden activations.
            m = self._mask((x.shape[0], self.experts), x.device)
            w = (c * m).repeat_interleave(self.expert_rank, dim=1)
            h = F.linear(x, self.lora_A)
            return F.linear(h * w.view(x.shape[0], *([1] * (x.dim() - 2)), -1).to(h.dtype), self.lora_B)
        if masked:
            c = c * self._mask((self.experts,), x.device)
        # Folding c·m into B's columns costs O(out·E·k), independent of the batch size.
        return F.linear(F.linear(x, self.lora_A), self.lora_B * c.repeat_interleave(self.expert_rank))

    def factors(self):
        return self.lora_A, self.lora_B * (self.coeff * self.scale).repeat_interleave(self.expert_rank)

    def expert_sizes(self) -> list[int]:
        return [self.expert_rank] * self.experts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}, expert_rank={self.expert_rank}, p={self.p}"
