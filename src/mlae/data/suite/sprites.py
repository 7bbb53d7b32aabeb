"""dSprites-like tasks: one white-ish sprite (square, ellipse, heart, arrow or teardrop) on black, drawn as a
supersampled mask of an implicit shape. `dsprites_loc` labels the sprite's x position, `dsprites_ori` its rotation."""
from __future__ import annotations

import numpy as np

from .canvas import SUITE_SIZE, grid, in_bin, pool

LOC_BINS = 16  # dsprites_loc: bins of the x centre over [6, 26) px
ORI_BINS = 16  # dsprites_ori: bins of the rotation over the full turn
_LOC_RANGE = (6.0, 26.0)


# Shapes in unit coordinates (u right, v up), each inside the unit disc, so "scale" is the radius in pixels.
def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.68


def _ellipse(u, v):
    return (u / 0.95) ** 2 + (v / 0.5) ** 2 <= 1.0


def _heart(u, v):  # (x²+y²−1)³ − x²y³ ≤ 0, tip pointing down at orientation 0
    a, b = u / 0.8, v / 0.8 + 0.1
    return (a * a + b * b - 1) ** 3 - a * a * b ** 3 <= 0


def _arrow(u, v):  # points along +u at orientation 0
    shaft = (u >= -0.9) & (u <= 0.2) & (np.abs(v) <= 0.17)
    head = (u >= 0.15) & (u <= 0.95) & (np.abs(v) <= 0.55 * (0.95 - u) / 0.8)
    return shaft | head


def _teardrop(u, v):  # round end at -u, point at +u
    body = (u + 0.35) ** 2 + v * v <= 0.55 ** 2
    return body | ((u >= -0.35) & (u <= 0.95) & (np.abs(v) <= 0.55 * (0.95 - u) / 1.3))


_LOC_SHAPES = (_square, _ellipse, _heart)
_ORI_SHAPES = (_heart, _arrow, _teardrop)  # no rotational symmetry: orientation is defined over the full turn
_SPRITE_SS = 3


def _sprites(xs, ys, scales, angles, shapes, rng) -> np.ndarray:
    gx, gy = grid(_SPRITE_SS)
    out = np.empty((len(xs), SUITE_SIZE, SUITE_SIZE, 3), np.float32)
    for i in range(len(xs)):
        dx, dy = (gx - xs[i]) / scales[i], (ys[i] - gy) / scales[i]  # dy points up
        c, s = np.cos(angles[i]), np.sin(angles[i])
        mask = shapes[i](c * dx + s * dy, -s * dx + c * dy).astype(np.float32)
        colour = np.clip(rng.uniform(0.8, 1.0) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
        out[i] = pool(mask[..., None], _SPRITE_SS) * colour
    return out


def render_dsprites_loc(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`dsprites_loc`: label = which of 16 equal bins of [6, 26) px holds the sprite centre's x coordinate.

    A white-ish square, ellipse or heart on black, radius 3–6 px, any orientation, y centre uniform in [6, 26) px.
    """
    n = len(labels)
    xs = in_bin(labels, *_LOC_RANGE, LOC_BINS, rng)
    ys = rng.uniform(*_LOC_RANGE, n)
    shapes = [_LOC_SHAPES[k] for k in rng.integers(0, 3, n)]
    return _sprites(xs, ys, rng.uniform(3.0, 6.0, n), rng.uniform(0, 2 * np.pi, n), shapes, rng)


def render_dsprites_ori(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`dsprites_ori`: label = which of 16 equal bins of [0, 360°) holds the sprite's counter-clockwise rotation.

    Shapes without rotational symmetry (heart: tip down at 0°; arrow and teardrop: pointing right at 0°), white-ish
    on black, radius 4–7 px, position uniform (the sprite stays inside the canvas).
    """
    n = len(labels)
    scales = rng.uniform(4.0, 7.0, n)
    xs, ys = rng.uniform(scales, SUITE_SIZE - scales), rng.uniform(scales, SUITE_SIZE - scales)
    shapes = [_ORI_SHAPES[k] for k in rng.integers(0, 3, n)]
    return _sprites(xs, ys, scales, in_bin(labels, 0.0, 2 * np.pi, ORI_BINS, rng), shapes, rng)
