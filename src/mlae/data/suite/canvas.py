"""The 32×32 canvas every suite renderer draws on, and the small helpers they share: supersampled pixel grids,
the box filter that anti-aliases them, and drawing a value inside a label's bin."""
from __future__ import annotations

import numpy as np

SUITE_SIZE = 32  # native resolution


def grid(ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a 32-px canvas supersampled `ss` times, in 32-px units."""
    c = (np.arange(SUITE_SIZE * ss, dtype=np.float32) + 0.5) / ss
    return np.meshgrid(c, c)  # x varies along columns, y (downwards) along rows


def pool(img: np.ndarray, ss: int) -> np.ndarray:
    """Box-filter a supersampled [..., H*ss, W*ss, C] image down to [..., H, W, C] (the anti-aliasing step)."""
    if ss == 1:
        return img
    *lead, h, w, c = img.shape
    return img.reshape(*lead, h // ss, ss, w // ss, ss, c).mean(axis=(-4, -2))


def in_bin(labels: np.ndarray, lo: float, hi: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A value drawn uniformly inside bin `label` of `n` equal bins over [lo, hi)."""
    width = (hi - lo) / n
    return lo + (labels + rng.uniform(0.02, 0.98, size=labels.shape)) * width


def normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
