"""CLEVR-like scenes: 3–10 spheres, cubes and cylinders (two sizes, eight CLEVR colours, matte or shiny, random
yaw) resting without overlap on a grey ground plane, ray-cast under one fixed pinhole camera with a random light.
`clevr_count` labels the number of objects, `clevr_dist` the camera depth of the nearest one."""
from __future__ import annotations

import numpy as np

from .canvas import SUITE_SIZE, in_bin, normalize, pool
from .raycast import camera, cast

MIN_OBJECTS, MAX_OBJECTS = 3, 10
COUNT_CLASSES = MAX_OBJECTS - MIN_OBJECTS + 1  # clevr_count: label = number of objects - MIN_OBJECTS
DIST_BINS = 6  # clevr_dist: bins of the nearest object's depth over _DIST_RANGE

_CLEVR_COLOURS = np.array([[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20], [129, 74, 25],
                           [129, 38, 192], [41, 208, 208], [255, 238, 51]], np.float32) / 255.0
_CAM_HEIGHT, _CAM_PITCH, _CAM_FOV = 4.5, np.radians(34.0), 44.0
_CAM_ORIGIN = np.array([0.0, _CAM_HEIGHT, 0.0])
_CLEVR_SS = 2
_CLEVR_RAYS, _CLEVR_BASIS = camera(np.array([0.0, -np.sin(_CAM_PITCH), np.cos(_CAM_PITCH)]), _CAM_FOV, _CLEVR_SS)
# ground plane y = 0 (every ray looks down at it), a little darker with distance
_CLEVR_GROUND = np.clip(0.62 - 0.012 * _CAM_HEIGHT / -np.minimum(_CLEVR_RAYS[:, 1], -1e-6), 0.3, 0.62)
_DIST_RANGE = (5.0, 9.8)   # camera-space depth of the nearest object, split into DIST_BINS bins
_MAX_DEPTH = 12.5
_SIZES = (0.45, 0.75)      # object "radius": sphere radius, cylinder radius and half-height, cube half-side × 1.2


def _project(x: np.ndarray, y: float, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y) on the 32-px canvas and camera depth of world points."""
    rel = np.stack([x, np.full_like(x, y) - _CAM_HEIGHT, z], -1)
    right, up, forward = (rel @ axis for axis in _CLEVR_BASIS)
    f = SUITE_SIZE / 2 / np.tan(np.radians(_CAM_FOV) / 2)
    return SUITE_SIZE / 2 + f * right / forward, SUITE_SIZE / 2 - f * up / forward, forward


def _place_objects(rng: np.random.Generator, n: int, depth_range: tuple[float, float],
                   first_depth: float | None = None) -> list[tuple[float, float, float]]:
    """Up to `n` non-overlapping objects (x, z, size) on the ground, visible, with camera depths in `depth_range`.

    With `first_depth`, object 0 sits at exactly that depth and the others at least 0.25 deeper. Fewer than `n`
    objects come back only when the free space runs out (the far clevr_dist bins).
    """
    fwd = _CLEVR_BASIS[2]
    objs: list[tuple[float, float, float]] = []
    for k, r in enumerate(rng.choice(_SIZES, n)):
        foot = r * 1.2  # bounds a cube's rotated footprint (half-side r / 1.2 × √2)
        for _ in range(10):  # rounds of 64 candidates
            if k == 0 and first_depth is not None:
                depth = np.full(64, first_depth)
            else:
                lo = depth_range[0] if first_depth is None else first_depth + 0.25
                depth = rng.uniform(lo, depth_range[1], 64)
            z = (depth - (r - _CAM_HEIGHT) * fwd[1]) / fwd[2]   # camera depth of the centre (x, r, z) = depth
            x = rng.uniform(-5.0, 5.0, 64)
            px, py, _ = _project(x, r, z)
            ok = (px >= 3) & (px <= SUITE_SIZE - 3) & (py >= 3) & (py <= SUITE_SIZE - 2)
            if objs:
                ox, oz, ofoot = np.array(objs).T
                ofoot = ofoot * 1.2
                ok &= (((x[:, None] - ox) ** 2 + (z[:, None] - oz) ** 2) >= (foot + ofoot + 0.15) ** 2).all(1)
            good = np.flatnonzero(ok)
            if len(good):
                objs.append((float(x[good[0]]), float(z[good[0]]), float(r)))
                break
        else:
            if k == 0:
                raise RuntimeError("could not place the first object")  # not reachable with these ranges
            break
    return objs


def _render_clevr(objs: list[tuple[float, float, float]], rng: np.random.Generator) -> np.ndarray:
    kinds = rng.choice(["sphere", "box", "cylinder"], len(objs))
    solids = []
    for (x, z, r), kind in zip(objs, kinds):
        half = np.full(3, r / 1.2) if kind == "box" else np.array([r, r, r])
        solids.append((kind, np.array([x, half[1], z]), half, rng.uniform(0, np.pi / 2)))
    colours = _CLEVR_COLOURS[rng.integers(0, len(_CLEVR_COLOURS), len(objs))]
    colours = np.clip(colours + rng.uniform(-0.04, 0.04, colours.shape), 0, 1)
    metal = rng.random(len(objs)) < 0.4
    light = normalize(np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.9, 1.4), rng.uniform(-0.6, 0.2)]))
    ambient = rng.uniform(0.3, 0.42)
    _, owner, normal = cast(_CAM_ORIGIN, _CLEVR_RAYS, solids)
    ground = _CLEVR_GROUND * (ambient + 0.6 * light[1]) + rng.uniform(-0.04, 0.04)
    img = np.repeat(ground[:, None], 3, 1)
    hit = np.flatnonzero(owner >= 0)
    obj, n = owner[hit], normal[hit]
    lam = np.clip(n @ light, 0, None)
    spec = np.where(metal[obj], np.clip((n * normalize(light - _CLEVR_RAYS[hit])).sum(1), 0, None) ** 24 * 0.8, 0)
    img[hit] = colours[obj] * (ambient + 0.75 * lam)[:, None] + spec[:, None]
    side = SUITE_SIZE * _CLEVR_SS
    return np.clip(pool(img.reshape(side, side, 3), _CLEVR_SS), 0, 1).astype(np.float32)


def render_clevr_count(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`clevr_count`: label = number of objects − 3 (3–10 objects, 8 classes).

    CLEVR-like scenes: spheres, cubes and cylinders (two sizes, eight CLEVR colours, matte or shiny, random yaw)
    resting without overlap on a grey ground plane, ray-cast under a fixed pinhole camera with a random light.
    """
    # a generator: each scene is placed, then rendered, before the next (the order of the draws from rng)
    scenes = (_place_objects(rng, int(y) + MIN_OBJECTS, (4.6, _MAX_DEPTH)) for y in labels)
    return np.stack([_render_clevr(objs, rng) for objs in scenes])


def render_clevr_dist(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`clevr_dist`: label = which of 6 equal bins of [5.0, 9.8) holds the camera-space depth (distance along the
    viewing axis) of the nearest object's centre.

    Same scenes as clevr_count with 3–10 objects (fewer when a far bin leaves no room); every other object is at
    least 0.25 units deeper than the nearest one.
    """
    depths = in_bin(labels, *_DIST_RANGE, DIST_BINS, rng)
    scenes = (_place_objects(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)), (0.0, _MAX_DEPTH), float(d))
              for d in depths)
    return np.stack([_render_clevr(objs, rng) for objs in scenes])
