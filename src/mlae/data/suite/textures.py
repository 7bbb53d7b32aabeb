"""`textures`: ten procedural texture families (stripes, checkers, dots, grid, waves, bricks, rings, zigzag,
Voronoi cells, 1/f noise), each a two-colour pattern with a random period, rotation and phase; the label is the
family."""
from __future__ import annotations

import numpy as np

from .canvas import SUITE_SIZE, grid, pool

# the classes, in label order
FAMILIES = ("stripes", "checkers", "dots", "grid", "waves", "bricks", "rings", "zigzag", "cells", "noise")
_TEX_SS = 2


def _texture_value(family: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern in [0, 1] over pixel coordinates; every family has a random period, rotation and phase."""
    p = rng.uniform(3.5, 8.0)
    th = rng.uniform(0, np.pi)
    u = np.cos(th) * x + np.sin(th) * y + rng.uniform(0, 100)
    v = -np.sin(th) * x + np.cos(th) * y + rng.uniform(0, 100)
    frac = lambda a: a / p - np.floor(a / p)  # noqa: E731 - position inside the period
    if family == "stripes":
        return (frac(u) < rng.uniform(0.3, 0.6)).astype(np.float32)
    if family == "checkers":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if family == "dots":
        r = rng.uniform(0.18, 0.32)
        return (((frac(u) - 0.5) ** 2 + (frac(v) - 0.5) ** 2) <= r * r).astype(np.float32)
    if family == "grid":
        w = rng.uniform(0.15, 0.28)
        return ((frac(u) < w) | (frac(v) < w)).astype(np.float32)
    if family == "waves":
        amp, lam = rng.uniform(0.5, 1.0) * p, rng.uniform(1.6, 3.0) * p
        return (frac(u + amp * np.sin(2 * np.pi * v / lam)) < 0.5).astype(np.float32)
    if family == "bricks":
        h = p / 2
        row = np.floor(v / h)
        uu = u + (row % 2) * p / 2
        mortar = rng.uniform(0.1, 0.2)
        return ((frac(uu) > mortar / 2) & (v / h - row > mortar)).astype(np.float32)
    if family == "rings":
        cx, cy = rng.uniform(-16, 48, 2)
        return (frac(np.hypot(x - cx, y - cy)) < 0.5).astype(np.float32)
    if family == "zigzag":
        amp, lam = rng.uniform(0.5, 1.0) * p, rng.uniform(1.6, 3.0) * p
        tri = 2 * np.abs(v / lam - np.floor(v / lam + 0.5))  # triangle wave in [0, 1]
        return (frac(u + amp * tri) < 0.5).astype(np.float32)
    if family == "cells":  # Voronoi cells, each a random mix of the two colours
        k = int(np.clip((SUITE_SIZE / p) ** 2 * 1.5, 6, 80))
        seeds = rng.uniform(-2, SUITE_SIZE + 2, (k, 2))
        d2 = (x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2
        return rng.random(k).astype(np.float32)[d2.argmin(-1)]
    if family == "noise":  # sum of random plane waves with a 1/f spectrum: smooth, blobby
        k = 12
        freq = rng.uniform(0.5, 2.5, k) / p
        ang = rng.uniform(0, 2 * np.pi, k)
        phase = rng.uniform(0, 2 * np.pi, k)
        val = sum(np.sin(2 * np.pi * f * (np.cos(a) * x + np.sin(a) * y) + ph) / (f * p)
                  for f, a, ph in zip(freq, ang, phase))
        val = (val - val.min()) / max(val.max() - val.min(), 1e-6)
        return val.astype(np.float32)
    raise AssertionError(family)


def render_textures(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`textures`: label = the procedural texture family — stripes, checkers, dots, grid, waves, bricks, rings,
    zigzag, cells (Voronoi), noise (1/f plane waves) — each drawn with a random period (3.5–8 px), rotation,
    phase and pair of colours, plus slight pixel noise.
    """
    x, y = grid(_TEX_SS)
    out = np.empty((len(labels), SUITE_SIZE, SUITE_SIZE, 3), np.float32)
    for i, label in enumerate(labels):
        t = _texture_value(FAMILIES[label], x, y, rng)[..., None]
        while True:  # two colours far enough apart to see the pattern
            c0, c1 = rng.random(3), rng.random(3)
            if np.abs(c0 - c1).sum() > 0.6:
                break
        img = pool(c0 * (1 - t) + c1 * t, _TEX_SS) + rng.normal(0, 0.02, (SUITE_SIZE, SUITE_SIZE, 3))
        out[i] = np.clip(img, 0, 1)
    return out
