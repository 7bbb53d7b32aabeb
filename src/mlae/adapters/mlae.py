"""MLAE: Masked LoRA Experts (Wang et al.).

The update is cut into ``E`` independent rank-``k`` experts, each with a coefficient, and experts are masked:

    ΔW = s · Σ_i c_i · m_i · B_i A_i

All experts of a layer are stacked (``A: [E·k, in]``, ``B: [out, E·k]``), so the forward is one matmul pair
exactly like LoRA of rank ``E·k``; masking multiplies the ``E·k`` columns of B (or, per sample, the
``E·k`` hidden activations) by ``c · m / (1 - p)``. Masked experts thus contribute nothing and get zero gradient.

Masking strategies (paper §3.3): *stochastic* draws a Bernoulli mask on every training forward (expert-level
dropout, inverted so that evaluation uses all experts unscaled); *fixed* keeps ``n_l`` experts in layer ``l``
(only those are allocated: the others would never train or run); *mixed* is fixed counts plus stochastic masking.

Learned masking probability (``dropout="auto"``), three learners (:data:`LEARNERS`). The default, ``concrete``
(it measured best on the paper-regime benchmark, docs/METHODS.md and docs/REPRODUCTION.md), and ``variational``
train ``p = P_MAX · σ(GAIN · θ)`` per layer (or per expert) with the network, as the variational objective
``mean task loss + (1/N) Σ_l KL_l(p_l)`` has it (N = training examples, passed in through
:func:`mlae.set_train_size`; the KL term is the aux loss ``"dropout_kl"``), with two estimators:

* ``concrete`` (Gal, Hron & Kendall 2017): the mask is drawn hard, ``z = 1[logit p + logit u > 0]`` with
  ``u ~ U(0, 1)`` (exactly Bernoulli(p), so the forward mask stays binary), and the gradient flows through its
  relaxation ``σ((logit p + logit u) / TEMPERATURE)`` (straight-through). ``KL = Σ_experts −H(p)``.
* ``variational`` (Kingma, Salimans & Welling 2015; Molchanov et al. 2017): Gaussian noise
  ``ξ ~ N(1, α)``, ``α = p / (1 − p)`` (the mean and variance of the inverted Bernoulli mask), with the
  log-uniform prior's KL approximation ``k1 − k1·σ(k2 + k3 log α) + ½ log(1 + 1/α)`` per expert. Its mask is not
  binary: every expert trains in every step, with noise.

The third, ``heldout`` (it measured best on a toy problem), has no gradient and no prior: one p for all layers
(:class:`ControlledDropout`, MLAE's binary Bernoulli masks exactly as a fixed p) is set after every epoch by
:class:`DropoutController` from the gap between the eval-mode loss on training images ``L_t`` and on images held
out of training ``L_h``: ``p ← p + BETA · (clip(1 − L_t / L_h, 0, P_MAX) − p)``. The engine holds out
``dropout_holdout`` of the training split for it (:meth:`MLAETraining.held_out_fraction`) and calls it through
:meth:`MLAETraining.end_epoch`.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import patterns
from ..errors import InputError, MLAEWarning
from .base import AdapterConfig, AdapterLayer, TrainingHooks, option

MASKINGS = ("stochastic", "fixed", "mixed")
MASK_GRANULARITIES = ("batch", "sample")

__all__ = ["MLAEConfig", "MLAELinear", "LearnedDropout", "ControlledDropout", "DropoutController", "MLAETraining",
           "AUTO", "LEARNERS", "GRADIENT_LEARNERS", "P_MAX", "GAIN", "TEMPERATURE", "BETA", "HOLDOUT", "HOLDOUT_MAX"]

AUTO = "auto"
_DEFAULT_P = 0.5  # the default p (the median of the paper's Table 10)
LEARNERS = ("concrete", "heldout", "variational")  # the default first, as `mlae train --help` lists them
HELDOUT = "heldout"  # the learner without a gradient: a controller on the held-out gap (DropoutController)
GRADIENT_LEARNERS = ("variational", "concrete")  # those that train p as a parameter (LearnedDropout)
P_MAX = 0.9        # a learned p stays in (0, P_MAX]: the top of the paper's search grid
GAIN = 50.0        # logit = GAIN·θ: Adam moves θ by about lr per step, the logit by GAIN·lr (lr 5e-4: 0.025)
TEMPERATURE = 0.1  # of the concrete relaxation (Gal et al.'s value)
_EPS = 1e-7        # keeps logit(u) finite
BETA = 0.5         # heldout: the controller's step towards its target p* per epoch (p ← p + BETA (p* − p))
HOLDOUT = 0.2      # heldout: the default fraction of the training images held out (VTAB-1k's 200 of 1000)
HOLDOUT_MAX = 0.5  # heldout: at most half the training images are held out
AUTO_ONLY = ("dropout_learner", "dropout_init", "dropout_per_expert", "dropout_holdout")  # dropout="auto" settings
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al.'s fit of the log-uniform prior's KL


def _dropout(text: str | float) -> float | str:
    """The ``dropout`` option: a masking probability, or ``auto`` (learned while training)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    value = float(text)
    if math.isnan(value):  # NaN compares unequal to everything, the default included: refuse it here
        raise ValueError(f"dropout must be a probability or auto, not {text!r}")
    return value


_dropout.__name__ = "dropout"  # argparse names the type in its error: "invalid dropout value: 'abc'"


@dataclass
class MLAEConfig(AdapterConfig):
    method = "mlae"
    experts: int = option(8, "number of experts per adapted layer")
    """Number of experts E per layer (the fixed/mixed patterns scale their counts to mean E)."""
    expert_rank: int = option(1, "rank of each expert")
    """Rank k of each expert's sub-matrix (the paper's best: 1)."""
    dropout: float | Literal["auto"] = option(_DEFAULT_P, "expert dropout probability p of the stochastic masks, "
                                              "or auto: learned in the same run (see --dropout-learner)",
                                              type=_dropout)
    """Expert-level masking probability p (stochastic and mixed masking). 0.5 is the median of the paper's
    per-dataset choices (Table 10); p = 0 is the "decomposition only" ablation. "auto": learn p while
    training: one p per layer (or expert) with the default concrete learner and the variational one, one p for
    all layers with the heldout learner (see the module docstring)."""
    dropout_learner: str = option(LEARNERS[0], "with --dropout auto: concrete (binary masks, a p per layer "
                                  "learned by a straight-through gradient), heldout (one p for all layers, set each "
                                  "epoch from the gap between training and held-out loss; holds out "
                                  "--dropout-holdout of the training images) or variational (Gaussian noise)",
                                  choices=LEARNERS)
    """dropout="auto" only: how p is learned, "concrete" (the default, measured best on the paper-regime benchmark
    in docs/REPRODUCTION.md: binary masks as MLAE's, a p per layer or expert trained with the network), "heldout"
    (binary masks; one p set by a controller on the training/held-out loss gap, on training images held out of
    training: ``dropout_holdout``) or "variational" (Gaussian noise)."""
    dropout_init: float = option(0.1, "with --dropout auto: the initial p")
    """dropout="auto" only: the initial p (Gal et al.'s)."""
    dropout_per_expert: bool = option(False, "with --dropout auto: learn one p per expert instead of per layer")
    """dropout="auto" only: one p per expert instead of one per layer (not with the heldout learner)."""
    dropout_holdout: float = option(HOLDOUT, "with --dropout-learner heldout: the fraction of the training images "
                                    "held out of training for the controller, in (0, 0.5]")
    """dropout_learner="heldout" only: the fraction of the training split (stratified by class, seeded) that the
    engine holds out of training to measure the held-out loss on. The eval split is never used."""
    coeff_init: float = option(1.0, "initial expert coefficient c_i")
    """Initial value of every expert coefficient c_i."""
    adaptive: bool = option(True, "freeze the expert coefficients at --coeff-init (default: they train)")
    """Train the coefficients (False: frozen at coeff_init, the paper's ablation)."""
    masking: str = option("stochastic", "expert masking: stochastic (drop each expert with probability --dropout), "
                          "fixed (keep the --pattern's expert counts) or mixed (both)", choices=MASKINGS)
    """"stochastic", "fixed" or "mixed"."""
    pattern: str | list[float] = option("uniform", "per-layer pattern of expert dropout rates (stochastic masking) "
                                        "or expert counts (fixed, mixed; random only there); a per-layer list in a "
                                        "YAML recipe", choices=patterns.PATTERN_NAMES)
    """Per-layer pattern: "uniform", "incremental", "decremental", "hourglass", "protruding", "random" (fixed
    and mixed only), or an explicit per-layer list (dropout rates for stochastic, expert counts otherwise)."""
    mask_granularity: str = option("batch", "batch: one mask per forward, shared by the batch; sample: one per "
                                   "sample", choices=MASK_GRANULARITIES)
    """"batch": one mask per layer per forward, shared by the batch (official code); "sample": one per sample."""
    scale: float = option(1.0, "global scale s of the update")
    """Global scale s of the update (the official code has no α/r factor)."""
    seed: int = 0
    """Seed of the random fixed pattern."""

    @classmethod
    def canonical_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the settings of dropout="auto" at their defaults where p is fixed (see __post_init__):
        what compares two stored configurations of one run."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if options.get("dropout", defaults["dropout"]) == AUTO:
            return dict(options)
        return {**options, **{name: defaults[name] for name in AUTO_ONLY}}

    def __post_init__(self):
        super().__post_init__()
        self._require_positive_int("experts", "expert_rank")
        if self.dropout == AUTO:
            if self.dropout_learner not in LEARNERS:
                raise InputError(f"dropout_learner (--dropout-learner) must be one of {LEARNERS}, got {self.dropout_learner!r}")
            if not 0 < self.dropout_init < P_MAX:
                raise InputError(f"dropout_init (--dropout-init) must be in (0, {P_MAX}), got {self.dropout_init!r}")
            if self.dropout_learner == HELDOUT:
                if self.dropout_per_expert:
                    raise InputError("dropout_learner='heldout' sets one p for all layers from a "
                                     "whole-model signal: drop dropout_per_expert, or use dropout_learner='concrete' "
                                     "or 'variational'")
                if not isinstance(self.dropout_holdout, (int, float)) or not 0 < self.dropout_holdout <= HOLDOUT_MAX:
                    raise InputError(f"dropout_holdout (--dropout-holdout) must be in (0, {HOLDOUT_MAX}], got {self.dropout_holdout!r}")
            elif self.dropout_holdout != HOLDOUT:
                raise InputError("dropout_holdout applies to dropout_learner='heldout' only: add --dropout-learner "
                                 "heldout, or drop --dropout-holdout")
            if self.masking == "fixed":
                raise InputError("masking='fixed' has no stochastic masks to learn: use dropout='auto' with "
                                 "masking='stochastic' or 'mixed'")
            if self.masking == "stochastic" and self.pattern != "uniform":
                raise InputError(f"dropout='auto' learns the per-layer rates itself: it cannot follow pattern "
                                 f"{self.pattern!r} (use pattern='uniform')")
        elif isinstance(self.dropout, str) or not 0 <= self.dropout < 1:
            raise InputError(f"{self._label('dropout')} must be in [0, 1) or 'auto', got {self.dropout!r}")
        else:
            # The learner's settings mean nothing for a fixed p: they take their defaults, so that a fixed-p
            # configuration has one identity whatever they say (files written before a default changed keep
            # the old default, e.g. dropout_learner "variational" or "concrete").
            for name, value in self.canonical_options({"dropout": self.dropout}).items():
                setattr(self, name, value)
        self._require_scale("coeff_init", "scale")
        if self.masking not in MASKINGS:
            raise InputError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.mask_granularity not in MASK_GRANULARITIES:
            raise InputError(f"mask_granularity must be one of {MASK_GRANULARITIES}, got {self.mask_granularity!r}")
        if isinstance(self.pattern, tuple):
            self.pattern = list(self.pattern)
        if isinstance(self.pattern, str) and self.pattern not in patterns.PATTERN_NAMES:
            raise InputError(f"unknown pattern {self.pattern!r}; choose one of {patterns.PATTERN_NAMES} or a list")
        if self.masking == "fixed" and self.dropout not in (0, _DEFAULT_P):
            # Fixed masking keeps the pattern's expert counts and draws nothing: a p set with it is ignored.
            # A warning, not an error, so that files saved with such a config still load.
            warnings.warn(f"dropout={self.dropout!r} has no effect with masking='fixed' (it keeps the pattern's "
                          "expert counts and drops none at random); use masking='mixed' to add random masking",
                          MLAEWarning, stacklevel=3)
        if self.pattern == "random" and self.masking == "stochastic":
            raise InputError("the random pattern draws expert counts: use it with masking='fixed' or 'mixed'")

    def layer_plan(self, names: list[str]) -> list[dict[str, Any]]:
        def plan(depth: int) -> list[dict[str, Any]]:
            if self.masking == "stochastic":
                counts = [self.experts] * depth
                rates = [AUTO] * depth if self.dropout == AUTO else patterns.dropout_rates(self.pattern, depth,
                                                                                           self.dropout)
            else:
                counts = patterns.expert_counts(self.pattern, depth, self.experts, self.seed)
                rates = [self.dropout if self.masking == "mixed" else 0.0] * depth
            return [{"experts": n, "dropout": p} for n, p in zip(counts, rates)]

        return patterns.per_depth(names, plan)

    def create_layer(self, base: nn.Linear, experts: int, dropout: float | str) -> "MLAELinear":
        learned = None
        if dropout == AUTO and self.dropout_learner == HELDOUT:
            learned = ControlledDropout(experts, self.dropout_init)
        elif dropout == AUTO:
            learned = LearnedDropout(experts, self.dropout_learner, self.dropout_init, self.dropout_per_expert,
                                     base.weight.device)
        return MLAELinear(base, experts, self.expert_rank, dropout, self.coeff_init, self.adaptive,
                          self.scale, self.mask_granularity, learned)


class LearnedDropout(nn.Module):
    """The masking probability of one layer's experts, learned: ``p = P_MAX · σ(GAIN · θ)``."""

    has_kl = True  # its prior term is an aux loss (MLAELinear.collect_aux_losses)

    def __init__(self, experts: int, learner: str, init: float, per_expert: bool, device=None):
        super().__init__()
        if learner not in GRADIENT_LEARNERS:
            raise ValueError(f"LearnedDropout learns p by gradient ({GRADIENT_LEARNERS}), not {learner!r}")
        self.experts, self.learner = experts, learner
        self.train_size: int | None = None  # N of the KL term, from mlae.set_train_size
        self.theta = nn.Parameter(torch.full((experts if per_expert else 1,), self.theta_for(init), device=device))

    @staticmethod
    def theta_for(p: float) -> float:
        q = min(max(p / P_MAX, 1e-12), 1.0 - 1e-12)  # a p rounded to 0 or P_MAX still has a finite θ
        return math.log(q / (1.0 - q)) / GAIN

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p, log(1 − p))`` per expert, computed without ever taking the log of 0."""
        log_p = math.log(P_MAX) + F.logsigmoid(GAIN * self.theta).expand(self.experts)
        return log_p, torch.log1p(-log_p.exp())

    @property
    def p(self) -> torch.Tensor:
        return self.log_probs()[0].exp()

    def sample(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """A training mask of ``shape`` (last dimension: experts) with mean 1, differentiable in θ."""
        log_p, log_q = self.log_probs()
        if self.learner == "variational":
            return 1.0 + (0.5 * (log_p - log_q)).exp() * torch.randn(shape, device=device)
        u = torch.rand(shape, device=device).clamp(_EPS, 1.0 - _EPS)
        logits = (log_p - log_q + u.log() - torch.log1p(-u)) / TEMPERATURE
        soft = torch.sigmoid(logits)
        drop = (logits > 0).to(soft.dtype) + (soft - soft.detach())  # forward: the hard draw, exactly
        return (1.0 - drop) / log_q.exp()

    def kl(self) -> torch.Tensor:
        """KL(q(p) ‖ prior) of this layer's experts, up to a constant (see the module docstring)."""
        log_p, log_q = self.log_probs()
        if self.learner == "variational":
            log_alpha = log_p - log_q
            return (_K1 - _K1 * torch.sigmoid(_K2 + _K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)).sum()
        return (log_p.exp() * log_p + log_q.exp() * log_q).sum()  # −H(p) per expert

    def values(self) -> list[float]:
        """The learned p: one per layer, or one per expert (``per_expert``)."""
        return self.p.detach()[: self.theta.numel()].tolist()

    @torch.no_grad()
    def restore(self, p: list[float]) -> None:
        self.theta.copy_(torch.tensor([self.theta_for(float(v)) for v in p]))

    def extra_repr(self) -> str:
        p = ", ".join(f"{v:.3f}" for v in self.values())
        return f"learner={self.learner}, p=[{p}]"


class ControlledDropout(nn.Module):
    """The masking probability of one layer's experts when the ``heldout`` learner sets it: a plain float ``p``
    (no parameter, no gradient, no KL term), written by :class:`DropoutController`. Its masks are MLAE's fixed-p
    masks exactly: binary Bernoulli, ``{0, 1/(1 − p)}``, drawn by the same call."""

    learner = HELDOUT
    has_kl = False

    def __init__(self, experts: int, init: float):
        super().__init__()
        self.experts, self.value = experts, float(init)
        self.train_size: int | None = None  # set by mlae.set_train_size, unused: this learner has no KL term

    @property
    def p(self) -> torch.Tensor:
        return torch.full((self.experts,), self.value)

    def sample(self, shape: tuple[int, ...], device) -> torch.Tensor:
        keep = 1.0 - self.value
        return torch.empty(shape, device=device).bernoulli_(keep) / keep  # = MLAELinear._mask with a fixed p

    def values(self) -> list[float]:
        return [self.value]

    def restore(self, p: list[float]) -> None:
        self.value = float(p[0])

    def extra_repr(self) -> str:
        return f"learner={self.learner}, p={self.value:.3f}"


class DropoutController:
    """The ``heldout`` learner's rule: one p for every :class:`ControlledDropout` of ``model``, moved after every
    epoch (or every K steps) towards ``p* = clip(1 − L_t / L_h, 0, P_MAX)``, ``p ← p + beta · (p* − p)``, from
    the eval-mode mean cross-entropy ``L_t`` on training images and ``L_h`` on held-out images. ``p*`` is 0 while
    the adapter generalises (``L_t ≥ L_h``) and grows towards ``P_MAX`` as it memorises (``L_t ≪ L_h``)."""

    def __init__(self, model: nn.Module, beta: float = BETA):
        self.layers = [m for m in model.modules() if isinstance(m, ControlledDropout)]
        if not self.layers:
            raise InputError("no layer has a p for the held-out controller: apply MLAEConfig(dropout='auto', "
                             "dropout_learner='heldout')")
        if not 0 < beta <= 1:
            raise InputError(f"the controller's step beta must be in (0, 1], got {beta!r}")
        self.beta = beta
        self.p = self.layers[0].value

    @staticmethod
    def target(train_loss: float, held_out_loss: float) -> float:
        """``clip(1 − L_t / L_h, 0, P_MAX)``; 0 where ``L_h`` is 0 (nothing to close) or a loss is not a number."""
        if not held_out_loss > 0 or math.isnan(train_loss):
            return 0.0
        if math.isinf(held_out_loss):
            return P_MAX if math.isfinite(train_loss) else 0.0
        return min(max(1.0 - train_loss / held_out_loss, 0.0), P_MAX)

    def set(self, p: float) -> None:
        self.p = min(max(float(p), 0.0), P_MAX)  # also what a checkpoint's state may say
        for layer in self.layers:
            layer.value = self.p

    def update(self, train_loss: float, held_out_loss: float) -> float:
        """One step of the rule; returns the target p*."""
        target = self.target(train_loss, held_out_loss)
        self.set(self.p + self.beta * (target - self.p))
        return target


class MLAELinear(AdapterLayer):
    # A learned p matters only while training: checkpoints keep θ, adapter files keep p in their header instead.
    training_only = ("learned",)

    def __init__(self, base: nn.Linear, experts: int, expert_rank: int, dropout: float | str, coeff_init: float,
                 adaptive: bool, scale: float, granularity: str,
                 learned: LearnedDropout | ControlledDropout | None = None):
        super().__init__(base)
        dev = base.weight.device
        if (dropout == AUTO) != (learned is not None):
            raise ValueError("dropout='auto' comes with a LearnedDropout or ControlledDropout, and only it")
        self.experts, self.expert_rank, self.p = experts, expert_rank, dropout
        self.scale, self.granularity = scale, granularity
        self.init_factors(experts * expert_rank)  # every expert gets LoRA's init on its own slice
        coeff = torch.full((experts,), float(coeff_init), device=dev)
        if adaptive:
            self.coeff = nn.Parameter(coeff)
        else:
            self.register_buffer("coeff", coeff)
        self.learned = learned

    def _mask(self, shape: tuple[int, ...], device) -> torch.Tensor:
        if self.learned is not None:
            return self.learned.sample(shape, device)
        keep = 1.0 - self.p
        return torch.empty(shape, device=device).bernoulli_(keep) / keep

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeff * self.scale
        masked = self.training and (self.learned is not None or self.p > 0)
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

    # --- dropout="auto" --------------------------------------------------------------------------------------
    def set_train_size(self, n: int) -> None:
        if self.learned is not None:
            self.learned.train_size = n

    def learned_values(self) -> dict[str, Any]:
        if self.learned is None:
            return {}
        p = self.learned.values()
        return {"dropout": p if len(p) > 1 else p[0]}

    @torch.no_grad()
    def restore_learned_values(self, values: dict[str, Any]) -> None:
        if self.learned is not None and "dropout" in values:
            self.learned.restore(torch.as_tensor(values["dropout"], dtype=torch.float64).reshape(-1).tolist())

    @staticmethod
    def collect_aux_losses(layers: list["MLAELinear"]) -> dict[str, torch.Tensor]:
        """``(1/N) Σ_l KL_l``: the prior term of the learned masking probabilities (none for a fixed p, nor for the
        heldout learner's)."""
        learned = [layer for layer in layers if layer.learned is not None and layer.learned.has_kl]
        if not learned:
            return {}
        n = learned[0].learned.train_size
        if n is None:
            raise InputError("MLAE with dropout='auto' needs the training-set size for its KL term: call "
                             "mlae.set_train_size(model, N) before training")
        return {"dropout_kl": torch.stack([layer.learned.kl() for layer in learned]).sum() / n}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}, expert_rank={self.expert_rank}, p={self.p}"


class MLAETraining(TrainingHooks):
    """MLAE in the training loop: the distribution of its expert coefficients c_i, logged to TensorBoard; with the
    ``heldout`` learner, the held-out images it asks for and its controller (:class:`DropoutController`), run
    after every epoch on the engine's eval-mode losses, its p kept in checkpoints."""

    def __init__(self, model: nn.Module, options: dict[str, Any]):
        super().__init__(model, options)
        controlled = any(isinstance(m, ControlledDropout) for m in model.modules())
        self.controller = DropoutController(model) if controlled else None

    def distributions(self) -> dict[str, torch.Tensor]:
        coeffs = [layer.coeff.detach().float().cpu() for layer in self.model.modules() if isinstance(layer, MLAELinear)]
        return {"coeff": torch.cat(coeffs)} if coeffs else {}

    def held_out_fraction(self) -> float:
        return float(self.options.get("dropout_holdout", HOLDOUT)) if self.controller is not None else 0.0

    def end_epoch(self, epoch: int, losses) -> dict[str, Any]:
        if self.controller is None:
            return {}
        train_loss, held_out_loss = losses()
        target = self.controller.update(train_loss, held_out_loss)
        return {"controller_train_loss": train_loss, "controller_held_out_loss": held_out_loss,
                "dropout_target": target}

    def state(self) -> dict[str, Any]:
        return {"dropout_p": self.controller.p} if self.controller is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.controller is not None and "dropout_p" in state:
            self.controller.set(state["dropout_p"])
