"""Per-layer masking patterns of the MLAE paper (appendix A.5), resampled to any depth.

The paper gives them for the 12 blocks of ViT-B. For another depth the curve is linearly interpolated over
relative depth (0 = first adapted layer, 1 = last), so a pattern keeps its shape.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["EXPERT_COUNT_PATTERNS", "DROPOUT_PATTERNS", "PATTERN_NAMES", "resample", "expert_counts", "dropout_rates",
           "layer_index", "per_depth"]

# Fixed masking: experts kept per layer (mean 8 = the default number of experts). The paper prints 11
# numbers for hourglass/protruding; these 12-number versions keep the mean of 8.
EXPERT_COUNT_PATTERNS: dict[str, list[float]] = {
    "incremental": [2, 2, 2, 6, 6, 6, 10, 10, 10, 14, 14, 14],
    "decremental": [14, 14, 14, 10, 10, 10, 6, 6, 6, 2, 2, 2],
    "hourglass": [14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14],
    "protruding": [2, 2, 2, 14, 14, 14, 14, 14, 14, 2, 2, 2],
}
# Stochastic masking: expert dropout probability per layer.
DROPOUT_PATTERNS: dict[str, list[float]] = {
    "incremental": [.8, .8, .7, .7, .6, .6, .5, .4, .3, .2, .1, 0],
    "decremental": [0, .1, .2, .3, .4, .5, .6, .6, .7, .7, .8, .8],
    "hourglass": [0, .1, .3, .5, .6, .8, .8, .6, .5, .3, .1, 0],
    "protruding": [.8, .6, .5, .3, .1, 0, 0, .1, .3, .5, .6, .8],
}
PATTERN_NAMES = ("uniform", "incremental", "decremental", "hourglass", "protruding", "random")


def resample(values: list[float], depth: int) -> list[float]:
    """Linear interpolation of a per-layer curve onto ``depth`` layers."""
    if depth < 1:
        raise InputError(f"depth must be >= 1, got {depth}")
    if depth == len(values):
        return [float(v) for v in values]
    if depth == 1:
        return [float(np.mean(values))]
    src = np.linspace(0.0, 1.0, len(values))
    return np.interp(np.linspace(0.0, 1.0, depth), src, np.asarray(values, dtype=float)).tolist()


def expert_counts(pattern: str | list[int], depth: int, experts: int = 8, seed: int = 0) -> list[int]:
    """Experts kept per layer under fixed masking. Named patterns are scaled from the paper's mean of 8 to
    ``experts`` and resampled to ``depth``; ``random`` draws integers in [1, 14·experts/8] with mean ``experts``."""
    if isinstance(pattern, (list, tuple)):
        counts = [int(v) for v in pattern]
        if len(counts) != depth:
            raise InputError(f"explicit expert-count pattern has {len(counts)} entries but {depth} layers are adapted")
        if min(counts) < 1 or any(int(v) != v for v in pattern):
            raise InputError(f"expert counts must be positive integers, got {list(pattern)}")
        return counts
    if pattern == "uniform":
        return [experts] * depth
    if pattern == "random":
        hi = max(1, round(14 * experts / 8))
        rng = np.random.default_rng(seed)
        counts = rng.integers(1, hi + 1, depth)
        # Nudge random entries until the mean is exactly `experts` (the paper's budget-matched random pattern).
        while counts.sum() != experts * depth:
            i = rng.integers(depth)
            step = 1 if counts.sum() < experts * depth else -1
            if 1 <= counts[i] + step <= hi:
                counts[i] += step
        return counts.tolist()
    if pattern not in EXPERT_COUNT_PATTERNS:
        raise InputError(f"unknown pattern {pattern!r}; choose one of {PATTERN_NAMES} or give a per-layer list")
    curve = resample([v * experts / 8 for v in EXPERT_COUNT_PATTERNS[pattern]], depth)
    return [max(1, int(round(v))) for v in curve]


def dropout_rates(pattern: str | list[float], depth: int, p: float) -> list[float]:
    """Expert dropout probability per layer under stochastic masking (``uniform``: ``p`` everywhere)."""
    if isinstance(pattern, (list, tuple)):
        rates = [float(v) for v in pattern]
        if len(rates) != depth:
            raise InputError(f"explicit dropout pattern has {len(rates)} entries but {depth} layers are adapted")
    elif pattern == "uniform":
        rates = [float(p)] * depth
    elif pattern in DROPOUT_PATTERNS:
        rates = resample(DROPOUT_PATTERNS[pattern], depth)
    elif pattern == "random":
        raise InputError("the random pattern exists for fixed masking (expert counts) only")
    else:
        raise InputError(f"unknown pattern {pattern!r}; choose one of {PATTERN_NAMES} or give a per-layer list")
    if not all(0 <= r < 1 for r in rates):
        raise InputError(f"dropout rates must be in [0, 1), got {rates}")
    return rates


def layer_index(name: str) -> int:
    """Depth of a module from its qualified name: the first integer component (``blocks.3.attn.qkv`` -> 3,
    ``encoder.layer.3.attention.query`` -> 3); 0 when there is none."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def per_depth(names: list[str], values_for_depth) -> list:
    """Spread a per-depth list over module names: modules of one block (e.g. q and v) share an entry.
    ``values_for_depth(depth)`` returns one value per distinct depth, shallowest first."""
    depths = sorted({layer_index(n) for n in names})
    values = values_for_depth(len(depths))
    return [values[depths.index(layer_index(n))] for n in names]
