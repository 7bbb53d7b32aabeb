"""LoRA (Hu et al., 2022): ``ΔW = (α/r) B A``; with ``dropout > 0`` it is the LoRA+Dropout baseline
(dropout on the adapter's input, as in loralib/PEFT)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import AdapterConfig, AdapterLayer, option

__all__ = ["LoRAConfig", "LoRALinear"]


@dataclass
class LoRAConfig(AdapterConfig):
    method = "lora"
    rank: int = option(8, "LoRA rank")
    """Rank r of the update."""
    alpha: float = option(8.0, "LoRA alpha (the update is scaled by alpha / rank)")
    """Scale numerator: the update is multiplied by alpha / rank."""
    # `--lora-dropout`: MLAE's `--dropout` is another option (expert dropout, which may be "auto").
    dropout: float = option(0.0, "dropout probability on the LoRA input", name="lora_dropout")
    """Dropout probability on the adapter input (LoRA+Dropout baseline); 0 for plain LoRA."""

    def __post_init__(self):
        super().__post_init__()
        self._require_positive_int("rank")
        self._require_scale("alpha")
        if not 0 <= self.dropout < 1:
            raise InputError(f"{self._label('dropout')} must be in [0, 1), got {self.dropout!r}")

    def create_layer(self, base: nn.Linear, **_) -> "LoRALinear":
        return LoRALinear(base, self.rank, self.alpha / self.rank, self.dropout)


class LoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__(base)
        self.init_factors(rank)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def factors(self):
        return self.lora_A, self.lora_B * self.scaling
