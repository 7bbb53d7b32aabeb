"""DMLoRA: Dropout Mixture LoRA (ECCV 2024).

``K`` parallel low-rank branches replace LoRA's single pair, scaled by one learnable scalar per layer:

    ΔW = (α_l / r) · Σ_k B_k A_k                r = Σ_k r_k (the total rank)
    α_l = α · exp(u_l)                          u_l = 0 until stage 2

*Gradual branch dropout*: in each training step every branch is dropped with probability ``p(t)``, rising from
0 to ``p_max`` over stage 1 along a schedule (linear, cosine or constant). Branches are stacked like MLAE's
experts (``A: [K·r_k, in]``, ``B: [out, K·r_k]``); a step computes only the rows/columns of the kept branches,
so a dropped branch takes part in neither the forward nor the backward pass.

*Two-stage learning scalar (2S-LS)*: stage 1 trains the branches with the global scale ``α`` (``lora_alpha``,
a buffer); :func:`start_stage2` then freezes the branches, turns branch dropout off and makes each layer's log
scale ``u_l`` (``lora_log_scale``) trainable -- :class:`DMLoRATraining` has the engine train those for the last
``stage2_fraction`` of the steps, on a cosine of their own from a tenth of the learning rate.
The scale is learned relative to ``α`` and in log space because Adam moves a parameter by about its learning
rate per step whatever its size: trained directly, ``α_l ≈ 16`` would move α times less, relatively, than
``u_l`` does, and could never leave ``α`` by more than a fraction of a percent. Inference merges everything
with ``α_l``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import AdapterConfig, AdapterLayer, Phase, TrainingHooks, adapter_layers, option

__all__ = ["DMLoRAConfig", "DMLoRALinear", "DMLoRATraining", "drop_probability", "layer_scales", "learned_scales",
           "start_stage2", "plot_scales", "SCHEDULES"]

SCHEDULES = ("linear", "cosine", "constant")


def drop_probability(t: float, p_max: float, schedule: str) -> float:
    """Branch dropout probability at stage-1 progress ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    if schedule == "linear":
        return p_max * t
    if schedule == "cosine":
        return p_max * (1.0 - math.cos(math.pi * t)) / 2.0
    if schedule == "constant":
        return p_max
    raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass
class DMLoRAConfig(AdapterConfig):
    method = "dmlora"
    branches: int = option(4, "number of parallel LoRA branches K")
    """Number K of parallel branches."""
    rank: int = option(8, "LoRA rank")
    """LoRA rank r: split over the branches (r/K each), or given to every branch with rank_per_branch."""
    rank_per_branch: bool = option(False, "give every branch the full rank (default: split it over the branches)")
    """Give every branch the full rank r (total rank K·r) instead of splitting r over the branches."""
    alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    """Global scale α of stage 1 and initial α_l of stage 2; the update is scaled by α / (total rank).
    "Large": twice LoRA's usual α = r."""
    branch_dropout: float = option(0.5, "final branch dropout probability p_max")
    """Final branch dropout probability p_max, reached at the end of stage 1."""
    schedule: str = option("linear", "growth of the branch dropout over stage 1", choices=SCHEDULES)
    """How p grows from 0 to p_max over stage 1: "linear", "cosine" or "constant" (p_max from the start)."""
    rescale: bool = option(True, "do not scale the kept branches by 1/(1-p) in training (default: they are scaled)")
    """Scale the kept branches by 1/(1-p) in training (inverted dropout), so the expected training update equals
    the full update used at inference and in stage 2. False: kept branches unscaled (training then sees an update
    shrunk by (1-p) on average)."""
    stage2_fraction: float = option(0.1, "share of training in stage 2 (per-layer scales only, lr / 10)")
    """Share of the training steps spent in stage 2 of 2S-LS (0: stage 1 only, α_l stays α)."""

    def __post_init__(self):
        super().__post_init__()
        self._require_positive_int("branches", "rank")
        if not self.rank_per_branch and self.rank % self.branches:
            raise InputError(f"rank {self.rank} cannot be split over {self.branches} branches; choose a multiple "
                             "or set rank_per_branch=True")
        self._require_scale("alpha")
        if not 0 <= self.branch_dropout < 1:
            raise InputError(f"{self._label('branch_dropout')} must be in [0, 1), got {self.branch_dropout!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.stage2_fraction < 1:
            raise InputError(f"{self._label('stage2_fraction')} must be in [0, 1), got {self.stage2_fraction!r}")

    @property
    def branch_rank(self) -> int:
        return self.rank if self.rank_per_branch else self.rank // self.branches

    def create_layer(self, base: nn.Linear, **_) -> "DMLoRALinear":
        return DMLoRALinear(base, self.branches, self.branch_rank, self.alpha, self.branch_dropout, self.schedule,
                            self.rescale, self.stage2_fraction)


class DMLoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, branches: int, branch_rank: int, alpha: float, p_max: float,
                 schedule: str, rescale: bool, stage2_fraction: float):
        super().__init__(base)
        dev = base.weight.device
        self.branches, self.branch_rank = branches, branch_rank
        self.p_max, self.schedule, self.rescale, self.stage2_fraction = p_max, schedule, rescale, stage2_fraction
        self.p = 0.0  # current drop probability, set by set_progress
        self.stage2 = False
        self.init_factors(branches * branch_rank)  # each branch is initialised like a LoRA
        # α_l = α · exp(u_l): u_l frozen at 0 in stage 1, learned in stage 2.
        self.register_buffer("lora_alpha", torch.tensor(float(alpha), device=dev))
        self.lora_log_scale = nn.Parameter(torch.zeros((), device=dev), requires_grad=False)

    @property
    def layer_alpha(self) -> torch.Tensor:
        """``α_l``, the layer's scale of the update."""
        return self.lora_alpha * self.lora_log_scale.exp()

    def set_progress(self, t: float) -> None:
        """Training progress ``t`` over both stages; the dropout ramp spans stage 1."""
        self.p = drop_probability(t / (1.0 - self.stage2_fraction), self.p_max, self.schedule)

    def _kept_rows(self, device) -> torch.Tensor | None:
        """Indices of the rank components of this step's kept branches (``None``: all kept, no scaling)."""
        if not self.training or self.stage2 or self.p <= 0:
            return None
        keep = torch.rand(self.branches, device=device) >= self.p
        return keep.repeat_interleave(self.branch_rank).nonzero().squeeze(1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.layer_alpha / self.lora_A.shape[0]
        rows = self._kept_rows(x.device)
        if rows is None:
            return F.linear(F.linear(x, self.lora_A), self.lora_B * scale)
        if self.rescale:
            scale = scale / (1.0 - self.p)
        # Only the kept branches' slices enter the graph: dropped ones are neither computed nor get gradient.
        return F.linear(F.linear(x, self.lora_A[rows]), self.lora_B[:, rows] * scale)

    def factors(self):
        return self.lora_A, self.lora_B * (self.layer_alpha / self.lora_A.shape[0])

    def expert_sizes(self) -> list[int]:
        return [self.branch_rank] * self.branches

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, branches={self.branches}, branch_rank={self.branch_rank}, "
                f"p_max={self.p_max}, schedule={self.schedule}, stage2={self.stage2}")


def _layers(model: nn.Module) -> list[DMLoRALinear]:
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, DMLoRALinear)]
    if not layers:
        raise InputError("the model has no DMLoRA layers; apply mlae.DMLoRAConfig first")
    return layers


def layer_scales(model: nn.Module) -> list[nn.Parameter]:
    """The per-layer log scales ``u_l`` (frozen until :func:`start_stage2`)."""
    return [layer.lora_log_scale for layer in _layers(model)]


def learned_scales(model: nn.Module) -> dict[str, float]:
    """``α_l / α = exp(u_l)`` of every DMLoRA layer, by qualified name: what stage 2 learned."""
    return {layer.name: float(layer.lora_log_scale.detach().exp()) for layer in _layers(model)}


def start_stage2(model: nn.Module) -> list[nn.Parameter]:
    """Switch every DMLoRA layer of ``model`` to stage 2 of 2S-LS: freeze the branches, stop branch dropout and
    make ``u_l`` trainable. Returns the ``u_l`` parameters (to train at a tenth of the learning rate)."""
    for layer in _layers(model):
        layer.stage2 = True
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
        layer.lora_log_scale.requires_grad_(True)
    return layer_scales(model)


def plot_scales(plt, scales: dict[str, float]):
    """Bars of the learned α_l / α per adapted layer, 1 marked (where stage 2 started); returns the figure."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(scales) + 1.5), 3.2))
    ax.bar(range(len(scales)), [v - 1 for v in scales.values()], bottom=1.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scales)))
    ax.set_xticklabels(list(scales), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("learned α_l / α")
    fig.tight_layout()
    return fig


class DMLoRATraining(TrainingHooks):
    """2S-LS in the training loop: the last ``stage2_fraction`` of the steps are stage 2 (:func:`start_stage2`),
    on a fresh cosine from lr / 10; the run reports the learned α_l / α (``layer_scales`` in results.json and
    ``scales.png``). Nothing of this with ``stage2_fraction=0``."""

    files = ("scales.png",)

    @property
    def stage2_fraction(self) -> float:
        return self.options["stage2_fraction"]

    def param_groups(self) -> list[dict[str, Any]]:
        # No weight decay: it would pull u_l back to 0, i.e. α_l back to α.
        return [{"params": layer_scales(self.model), "weight_decay": 0.0}] if self.stage2_fraction else []

    def phases(self, total_steps: int, lr: float) -> list[Phase]:
        if not self.stage2_fraction:
            return []
        return [Phase(round(total_steps * (1 - self.stage2_fraction)), lr / 10, lambda: start_stage2(self.model))]

    def results(self) -> dict[str, Any]:
        return {"layer_scales": learned_scales(self.model)} if self.stage2_fraction else {}

    def figures(self, results: dict[str, Any]) -> dict[str, Any]:
        if not self.stage2_fraction:
            return {}
        return {"scales.png": lambda plt: plot_scales(plt, results["layer_scales"])}
