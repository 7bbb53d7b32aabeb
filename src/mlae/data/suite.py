"""The embedded suite: small VTAB-like tasks generated on the fly, so that everything runs without a download.

Every task is 800 train / 200 val / >= 1000 test images of 32×32 RGB (bicubic-resized when another size is asked
for), class-balanced (equal counts per class, or as equal as the split size allows), deterministic in `seed`.
The three splits are drawn from independent random streams derived from (seed, task, split), so a test image is
never a training image. Renders are numpy, vectorised over pixels, anti-aliased by supersampling.

Each generator documents how its labels are defined; `SUITE_TASKS` repeats the definitions in one line.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import DatasetError, Split, Task, check_split

__all__ = ["SUITE_TASKS", "SUITE_SIZE", "make_suite_task", "generate_split", "split_sizes", "suite_class_names"]

SUITE_SIZE = 32  # native resolution
N_TRAIN, N_VAL, MIN_TEST = 800, 200, 1000

Renderer = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # labels [N] -> float images [N, 32, 32, 3]


# --------------------------------------------------------------------------------------------- helpers

def _grid(ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a 32-px canvas supersampled `ss` times, in 32-px units."""
    c = (np.arange(SUITE_SIZE * ss, dtype=np.float32) + 0.5) / ss
    return np.meshgrid(c, c)  # x varies along columns, y (downwards) along rows


def _pool(img: np.ndarray, ss: int) -> np.ndarray:
    """Box-filter a supersampled [..., H*ss, W*ss, C] image down to [..., H, W, C] (the anti-aliasing step)."""
    if ss == 1:
        return img
    *lead, h, w, c = img.shape
    return img.reshape(*lead, h // ss, ss, w // ss, ss, c).mean(axis=(-4, -2))


def _in_bin(labels: np.ndarray, lo: float, hi: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A value drawn uniformly inside bin `label` of `n` equal bins over [lo, hi)."""
    width = (hi - lo) / n
    return lo + (labels + rng.uniform(0.02, 0.98, size=labels.shape)) * width


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------- digits

@lru_cache(maxsize=1)
def _digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 [N, 3, 32, 32] (bicubic 8 -> 32 px, grey copied to RGB) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetError("suite:digits needs scikit-learn (pip install 'mlae[train]')") from err
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(SUITE_SIZE, SUITE_SIZE), mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(data.target.astype(np.int64))


def _digits_splits(seed: int) -> tuple[Split, Split, Split]:
    """`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 real images), label = the digit 0–9.

    Upsampled bicubically to 32×32, grey copied to RGB (bright ink on black). Per class, a seeded permutation gives
    80 train and 20 val images; the remaining 797 images (74–83 per class, so the test split is only roughly
    balanced) are the test split.
    """
    images, labels = _digits_data()
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"digits")]))
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(10):
        idx = np.flatnonzero(labels.numpy() == c)
        idx = idx[rng.permutation(len(idx))]
        parts[0].append(idx[:80])
        parts[1].append(idx[80:100])
        parts[2].append(idx[100:])
    out = []
    for k, p in enumerate(parts):
        idx = np.concatenate(p)
        idx = idx[np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"digits"), k])).permutation(len(idx))]
        out.append(Split(images[idx], labels[idx]))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------- dSprites-like

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
    gx, gy = _grid(_SPRITE_SS)
    out = np.empty((len(xs), SUITE_SIZE, SUITE_SIZE, 3), np.float32)
    for i in range(len(xs)):
        dx, dy = (gx - xs[i]) / scales[i], (ys[i] - gy) / scales[i]  # dy points up
        c, s = np.cos(angles[i]), np.sin(angles[i])
        mask = shapes[i](c * dx + s * dy, -s * dx + c * dy).astype(np.float32)
        colour = np.clip(rng.uniform(0.8, 1.0) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
        out[i] = _pool(mask[..., None], _SPRITE_SS) * colour
    return out


_LOC_RANGE = (6.0, 26.0)


def _render_dsprites_loc(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`dsprites_loc`: label = which of 16 equal bins of [6, 26) px holds the sprite centre's x coordinate.

    A white-ish square, ellipse or heart on black, radius 3–6 px, any orientation, y centre uniform in [6, 26) px.
    """
    n = len(labels)
    xs = _in_bin(labels, *_LOC_RANGE, 16, rng)
    ys = rng.uniform(*_LOC_RANGE, n)
    shapes = [_LOC_SHAPES[k] for k in rng.integers(0, 3, n)]
    return _sprites(xs, ys, rng.uniform(3.0, 6.0, n), rng.uniform(0, 2 * np.pi, n), shapes, rng)


def _render_dsprites_ori(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`dsprites_ori`: label = which of 16 equal bins of [0, 360°) holds the sprite's counter-clockwise rotation.

    Shapes without rotational symmetry (heart: tip down at 0°; arrow and teardrop: pointing right at 0°), white-ish
    on black, radius 4–7 px, position uniform (the sprite stays inside the canvas).
    """
    n = len(labels)
    scales = rng.uniform(4.0, 7.0, n)
    xs, ys = rng.uniform(scales, SUITE_SIZE - scales), rng.uniform(scales, SUITE_SIZE - scales)
    shapes = [_ORI_SHAPES[k] for k in rng.integers(0, 3, n)]
    return _sprites(xs, ys, scales, _in_bin(labels, 0.0, 2 * np.pi, 16, rng), shapes, rng)


# --------------------------------------------------------------------------------------------- ray casting

_UP = np.array([0.0, 1.0, 0.0])


@lru_cache(maxsize=None)
def _pixel_rays(fov_deg: float, ss: int) -> np.ndarray:
    """Unit ray directions [P, 3] in the camera frame (right, up, forward), row-major, supersampled `ss` times."""
    gx, gy = _grid(ss)
    t = np.tan(np.radians(fov_deg) / 2)
    xn = (gx / SUITE_SIZE * 2 - 1).ravel() * t
    yn = (1 - gy / SUITE_SIZE * 2).ravel() * t
    return _normalize(np.stack([xn, yn, np.ones_like(xn)], 1).astype(np.float64))


def _camera(forward: np.ndarray, fov_deg: float, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """World ray directions [P, 3] of a square pinhole camera looking along `forward`, and its basis rows
    (right, up, forward). x right, y up; a camera looking along +z sees +x on its right."""
    forward = _normalize(forward)
    right = _normalize(np.cross(_UP, forward))
    basis = np.stack([right, np.cross(forward, right), forward])
    return _pixel_rays(fov_deg, ss) @ basis, basis


def _yaw(angle: float) -> np.ndarray:
    """World -> object rotation about the vertical axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _intersect(kind: str, o: np.ndarray, d: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Distance along rays (object frame: origin o [3], directions d [n, 3]) to a centred solid; inf if missed.

    box: half-sizes `half`; sphere: radius half[0]; cylinder: vertical axis, radius half[0], half-height half[1].
    """
    if kind == "sphere":
        b = d @ o
        disc = b * b - (o @ o - half[0] ** 2)
        t = -b - np.sqrt(np.maximum(disc, 0))
        return np.where((disc > 0) & (t > 0), t, np.inf)
    dd = np.where(np.abs(d) < 1e-9, 1e-9, d)
    if kind == "box":
        t1, t2 = (-half - o) / dd, (half - o) / dd
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        near = np.maximum(np.maximum(tmin[:, 0], tmin[:, 1]), tmin[:, 2])
        far = np.minimum(np.minimum(tmax[:, 0], tmax[:, 1]), tmax[:, 2])
        return np.where((near <= far) & (near > 0), near, np.inf)
    r, hh = half[0], half[1]
    a = dd[:, 0] ** 2 + dd[:, 2] ** 2
    b = dd[:, 0] * o[0] + dd[:, 2] * o[2]
    disc = b * b - a * (o[0] ** 2 + o[2] ** 2 - r * r)
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, 1e-12)
    ts = np.where((disc > 0) & (ts > 0) & (np.abs(o[1] + ts * dd[:, 1]) <= hh), ts, np.inf)
    tc = (-np.sign(dd[:, 1]) * hh - o[1]) / dd[:, 1]  # the cap facing the ray
    cap = (tc > 0) & ((o[0] + tc * dd[:, 0]) ** 2 + (o[2] + tc * dd[:, 2]) ** 2 <= r * r)
    return np.minimum(ts, np.where(cap, tc, np.inf))


def _surface_normal(kind: str, q: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Outward normals [n, 3] at object-frame surface points q [n, 3]."""
    if kind == "sphere":
        return q / half[0]
    if kind == "box":
        rel = np.abs(q / half)
        n = np.zeros_like(q)
        axis = rel.argmax(1)
        rows = np.arange(len(q))
        n[rows, axis] = np.sign(q[rows, axis])
        return n
    on_cap = np.abs(q[:, 1]) >= half[1] * 0.999
    side = q * np.array([1.0, 0.0, 1.0]) / half[0]
    return np.where(on_cap[:, None], np.array([0.0, 1.0, 0.0]) * np.sign(q[:, 1:2]), side)


def _cast(origin: np.ndarray, dirs: np.ndarray, objects: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffered ray cast of solids (kind, centre, half, yaw): nearest distance [P], owner [P] (-1 = none), normal.

    Each solid is only tested against the rays that hit its bounding sphere (one [P, K] product), which keeps
    the per-solid work to the few hundred rays it covers.
    """
    centres = np.array([ob[1] for ob in objects])
    bound = np.array([np.linalg.norm(ob[2]) if ob[0] == "box" else np.hypot(ob[2][0], ob[2][1]) for ob in objects])
    oc = origin - centres
    b = dirs @ oc.T
    candidate = b * b - ((oc * oc).sum(1) - bound ** 2) > 0          # [P, K]
    t_best = np.full(len(dirs), np.inf)
    owner = np.full(len(dirs), -1)
    frames = []
    for k, (kind, centre, half, yaw) in enumerate(objects):
        rot = _yaw(yaw)
        frames.append(rot)
        idx = np.flatnonzero(candidate[:, k])
        if not len(idx):
            continue
        t = _intersect(kind, rot @ (origin - centre), dirs[idx] @ rot.T, half)
        closer = t < t_best[idx]
        t_best[idx[closer]] = t[closer]
        owner[idx[closer]] = k
    normal = np.zeros_like(dirs)
    for k, (kind, centre, half, yaw) in enumerate(objects):
        idx = np.flatnonzero(owner == k)
        if len(idx):
            q = (origin + dirs[idx] * t_best[idx, None] - centre) @ frames[k].T
            normal[idx] = _surface_normal(kind, q, half) @ frames[k]
    return t_best, owner, normal


# --------------------------------------------------------------------------------------------- CLEVR-like

_CLEVR_COLOURS = np.array([[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20], [129, 74, 25],
                           [129, 38, 192], [41, 208, 208], [255, 238, 51]], np.float32) / 255.0
_CAM_HEIGHT, _CAM_PITCH, _CAM_FOV = 4.5, np.radians(34.0), 44.0
_CAM_ORIGIN = np.array([0.0, _CAM_HEIGHT, 0.0])
_CLEVR_SS = 2
_CLEVR_RAYS, _CLEVR_BASIS = _camera(np.array([0.0, -np.sin(_CAM_PITCH), np.cos(_CAM_PITCH)]), _CAM_FOV, _CLEVR_SS)
# ground plane y = 0 (every ray looks down at it), a little darker with distance
_CLEVR_GROUND = np.clip(0.62 - 0.012 * _CAM_HEIGHT / -np.minimum(_CLEVR_RAYS[:, 1], -1e-6), 0.3, 0.62)
_DIST_RANGE = (5.0, 9.8)   # camera-space depth of the nearest object, split into 6 bins
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
    light = _normalize(np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.9, 1.4), rng.uniform(-0.6, 0.2)]))
    ambient = rng.uniform(0.3, 0.42)
    _, owner, normal = _cast(_CAM_ORIGIN, _CLEVR_RAYS, solids)
    ground = _CLEVR_GROUND * (ambient + 0.6 * light[1]) + rng.uniform(-0.04, 0.04)
    img = np.repeat(ground[:, None], 3, 1)
    hit = np.flatnonzero(owner >= 0)
    obj, n = owner[hit], normal[hit]
    lam = np.clip(n @ light, 0, None)
    spec = np.where(metal[obj], np.clip((n * _normalize(light - _CLEVR_RAYS[hit])).sum(1), 0, None) ** 24 * 0.8, 0)
    img[hit] = colours[obj] * (ambient + 0.75 * lam)[:, None] + spec[:, None]
    side = SUITE_SIZE * _CLEVR_SS
    return np.clip(_pool(img.reshape(side, side, 3), _CLEVR_SS), 0, 1).astype(np.float32)


def _render_clevr_count(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`clevr_count`: label = number of objects − 3 (3–10 objects, 8 classes).

    CLEVR-like scenes: spheres, cubes and cylinders (two sizes, eight CLEVR colours, matte or shiny, random yaw)
    resting without overlap on a grey ground plane, ray-cast under a fixed pinhole camera with a random light.
    """
    return np.stack([_render_clevr(_place_objects(rng, int(y) + 3, (4.6, _MAX_DEPTH)), rng) for y in labels])


def _render_clevr_dist(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`clevr_dist`: label = which of 6 equal bins of [5.0, 9.8) holds the camera-space depth (distance along the
    viewing axis) of the nearest object's centre.

    Same scenes as clevr_count with 3–10 objects (fewer when a far bin leaves no room); every other object is at
    least 0.25 units deeper than the nearest one.
    """
    depths = _in_bin(labels, *_DIST_RANGE, 6, rng)
    return np.stack([_render_clevr(_place_objects(rng, int(rng.integers(3, 11)), (0.0, _MAX_DEPTH), float(d)), rng)
                     for d in depths])


# --------------------------------------------------------------------------------------------- smallNORB-like

# Toy objects as unions of axis-aligned boxes (centre, half-size), front along +x, up +y, in ~unit size.
_NORB_OBJECTS = {
    "car": [((0, .35, 0), (1.0, .2, .45)), ((-.2, .7, 0), (.5, .18, .4)),
            ((.6, .15, .45), (.17, .15, .06)), ((.6, .15, -.45), (.17, .15, .06)),
            ((-.6, .15, .45), (.17, .15, .06)), ((-.6, .15, -.45), (.17, .15, .06))],
    "truck": [((.75, .6, 0), (.3, .4, .45)), ((-.3, .7, 0), (.75, .5, .48)), ((0, .25, 0), (1.05, .08, .4)),
              ((.75, .15, .45), (.15, .15, .06)), ((.75, .15, -.45), (.15, .15, .06)),
              ((-.6, .15, .45), (.15, .15, .06)), ((-.6, .15, -.45), (.15, .15, .06))],
    "airplane": [((0, .5, 0), (1.0, .12, .12)), ((.15, .5, 0), (.22, .03, 1.0)), ((-.9, .75, 0), (.12, .22, .03)),
                 ((-.9, .55, 0), (.1, .03, .35)), ((1.05, .5, 0), (.08, .08, .08))],
    "animal": [((0, .6, 0), (.6, .2, .22)), ((.75, .85, 0), (.2, .15, .14)), ((.45, .2, .15), (.07, .2, .07)),
               ((.45, .2, -.15), (.07, .2, .07)), ((-.45, .2, .15), (.07, .2, .07)), ((-.45, .2, -.15), (.07, .2, .07)),
               ((-.75, .7, 0), (.2, .04, .04))],
    "human": [((0, 1.0, 0), (.12, .3, .25)), ((0, 1.45, 0), (.12, .13, .12)), ((.15, 1.45, 0), (.05, .03, .03)),
              ((0, .35, .12), (.08, .35, .08)), ((0, .35, -.12), (.08, .35, .08)), ((0, 1.0, .33), (.06, .28, .06)),
              ((.3, 1.25, -.33), (.3, .06, .06))],
}
_NORB_KINDS = list(_NORB_OBJECTS)
_NORB_SS = 2


def _render_norb(azimuth: float, elevation: float, rng: np.random.Generator) -> np.ndarray:
    boxes = _NORB_OBJECTS[_NORB_KINDS[rng.integers(len(_NORB_KINDS))]]
    centre = np.array([b[0] for b in boxes], float)
    half = np.array([b[1] for b in boxes], float) * rng.uniform(0.85, 1.15, (len(boxes), 3))
    lo, hi = (centre - half).min(0), (centre + half).max(0)
    extent = np.linalg.norm(hi - lo) / 2  # centre the toy and scale its bounding sphere to radius 1
    centre, half = (centre - (lo + hi) / 2) / extent, half / extent
    # camera on a sphere around the toy: azimuth about +y (0 = facing its front), elevation above the ground
    cam = 3.6 * np.array([np.cos(elevation) * np.cos(azimuth), np.sin(elevation), np.cos(elevation) * np.sin(azimuth)])
    dirs, (right, up, forward) = _camera(-cam, 36.0, _NORB_SS)
    _, owner, normal = _cast(cam, dirs, [("box", c, h, 0.0) for c, h in zip(centre, half)])
    # light from a random direction on the camera's side, drawn relative to the camera so it does not leak the pose
    lc = _normalize(np.array([rng.uniform(-1, 1), rng.uniform(0.0, 1), rng.uniform(0.3, 1)]))
    light = lc[0] * right + lc[1] * up - lc[2] * forward
    albedo, ambient, background = rng.uniform(0.6, 0.9), rng.uniform(0.12, 0.3), rng.uniform(0.05, 0.35)
    shade = albedo * (ambient + (1 - ambient) * np.clip(normal @ light, 0, None))
    img = np.where(owner >= 0, shade, background)
    side = SUITE_SIZE * _NORB_SS
    grey = _pool(img.reshape(side, side, 1), _NORB_SS) + rng.normal(0, 0.015, (SUITE_SIZE, SUITE_SIZE, 1))
    return np.repeat(np.clip(grey, 0, 1), 3, -1).astype(np.float32)


def _render_smallnorb_azi(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`smallnorb_azi`: label = which of 18 bins of 20° holds the camera azimuth (bin k centred on 20k°).

    smallNORB-like: one of five box-built toys (car, truck, airplane, four-legged animal, human figure) with
    jittered proportions, grey Lambert shading, random light, background level and elevation (27.5°–72.5°).
    """
    az = np.radians(_in_bin(labels, -10.0, 350.0, 18, rng))
    el = np.radians(rng.uniform(27.5, 72.5, len(labels)))
    return np.stack([_render_norb(a, e, rng) for a, e in zip(az, el)])


def _render_smallnorb_ele(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`smallnorb_ele`: label = which of 9 bins of 5° holds the camera elevation (bin k centred on 30° + 5k°).

    Same toys and nuisances as smallnorb_azi, azimuth uniform over 360°.
    """
    el = np.radians(_in_bin(labels, 27.5, 72.5, 9, rng))
    az = rng.uniform(0, 2 * np.pi, len(labels))
    return np.stack([_render_norb(a, e, rng) for a, e in zip(az, el)])


# --------------------------------------------------------------------------------------------- textures

_TEXTURE_FAMILIES = ("stripes", "checkers", "dots", "grid", "waves", "bricks", "rings", "zigzag", "cells", "noise")
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


def _render_textures(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`textures`: label = the procedural texture family — stripes, checkers, dots, grid, waves, bricks, rings,
    zigzag, cells (Voronoi), noise (1/f plane waves) — each drawn with a random period (3.5–8 px), rotation,
    phase and pair of colours, plus slight pixel noise.
    """
    x, y = _grid(_TEX_SS)
    out = np.empty((len(labels), SUITE_SIZE, SUITE_SIZE, 3), np.float32)
    for i, label in enumerate(labels):
        t = _texture_value(_TEXTURE_FAMILIES[label], x, y, rng)[..., None]
        while True:  # two colours far enough apart to see the pattern
            c0, c1 = rng.random(3), rng.random(3)
            if np.abs(c0 - c1).sum() > 0.6:
                break
        img = _pool(c0 * (1 - t) + c1 * t, _TEX_SS) + rng.normal(0, 0.02, (SUITE_SIZE, SUITE_SIZE, 3))
        out[i] = np.clip(img, 0, 1)
    return out


# --------------------------------------------------------------------------------------------- registry

_RENDERERS: dict[str, tuple[int, str, Renderer | None]] = {
    "digits": (10, "natural", None),
    "dsprites_loc": (16, "structured", _render_dsprites_loc),
    "dsprites_ori": (16, "structured", _render_dsprites_ori),
    "clevr_count": (8, "structured", _render_clevr_count),
    "clevr_dist": (6, "structured", _render_clevr_dist),
    "smallnorb_azi": (18, "structured", _render_smallnorb_azi),
    "smallnorb_ele": (9, "structured", _render_smallnorb_ele),
    "textures": (len(_TEXTURE_FAMILIES), "natural", _render_textures),
}

# name -> (number of classes, VTAB-like group, how the label is defined)
SUITE_TASKS: dict[str, tuple[int, str, str]] = {
    "digits": (10, "natural",
               "the digit 0-9 of scikit-learn's 8x8 handwritten digits (1,797 real images; test = the 797 left)"),
    "dsprites_loc": (16, "structured", "16 equal bins of a white-ish sprite's x centre over [6, 26) px"),
    "dsprites_ori": (16, "structured", "16 equal bins of an asymmetric sprite's rotation over [0, 360)"),
    "clevr_count": (8, "structured", "number of CLEVR-like objects minus 3 (3-10 objects)"),
    "clevr_dist": (6, "structured", "6 equal bins of the nearest object's camera depth over [5.0, 9.8)"),
    "smallnorb_azi": (18, "structured", "18 bins of 20 deg of the camera azimuth around a box-built toy"),
    "smallnorb_ele": (9, "structured", "9 bins of 5 deg of the camera elevation (30-70 deg) above a box-built toy"),
    "textures": (10, "natural", "procedural texture family: " + ", ".join(_TEXTURE_FAMILIES)),
}


# name -> (class name template, value of class 0, step per class); `{v:g}` is the class's value (bin start or
# centre, count), `{w:g}` its end for range bins. Read off the label definitions above.
_CLASS_NAMES: dict[str, tuple[str, float, float]] = {
    "digits": ("{v:g}", 0, 1),
    "dsprites_loc": ("x {v:g}-{w:g} px", 6, 1.25),
    "dsprites_ori": ("rotation {v:g}-{w:g} deg", 0, 22.5),
    "clevr_count": ("{v:g} objects", 3, 1),
    "clevr_dist": ("depth {v:g}-{w:g}", 5.0, 0.8),
    "smallnorb_azi": ("azimuth {v:g} deg", 0, 20),
    "smallnorb_ele": ("elevation {v:g} deg", 30, 5),
}


def suite_class_names(name: str) -> list[str]:
    """What each label of a suite task means, e.g. "3 objects" or "azimuth 40 deg"."""
    if name == "textures":
        return list(_TEXTURE_FAMILIES)
    template, start, step = _CLASS_NAMES[name]
    return [template.format(v=start + k * step, w=start + (k + 1) * step) for k in range(SUITE_TASKS[name][0])]


def split_sizes(name: str) -> tuple[int, int, int]:
    """(train, val, test) sizes of a suite task; test is the smallest multiple of the class count >= 1000."""
    if name == "digits":
        return N_TRAIN, N_VAL, 797
    num_classes = SUITE_TASKS[name][0]
    return N_TRAIN, N_VAL, -(-MIN_TEST // num_classes) * num_classes


def generate_split(name: str, part: int, seed: int = 0, n: int | None = None) -> Split:
    """Part 0 (train), 1 (val) or 2 (test) of a rendered suite task at the native 32 px (`n` overrides the size)."""
    num_classes, _, render = _RENDERERS[name]
    if render is None:
        raise ValueError(f"{name} is not rendered (see make_suite_task)")
    n = split_sizes(name)[part] if n is None else n
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2 ** 63, zlib.crc32(name.encode()), part]))
    labels = np.arange(n) % num_classes
    labels = labels[rng.permutation(n)]
    images = render(labels, rng)
    images = torch.from_numpy(np.rint(images * 255).clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def _resize(split: Split, size: int) -> Split:
    if size == SUITE_SIZE:
        return split
    x = F.interpolate(split.images.float(), size=(size, size), mode="bicubic", align_corners=False,
                      antialias=size < SUITE_SIZE)
    return Split(x.round().clamp(0, 255).to(torch.uint8), split.labels)


_generated: "OrderedDict[tuple[str, int, int], tuple[Split, Split, Split]]" = OrderedDict()


def _splits(name: str, seed: int, image_size: int) -> tuple[Split, Split, Split]:
    key = (name, int(seed), int(image_size))
    if key not in _generated:
        if image_size != SUITE_SIZE:
            parts = tuple(_resize(s, image_size) for s in _splits(name, seed, SUITE_SIZE))
        elif name == "digits":
            parts = _digits_splits(seed)
        else:
            parts = tuple(generate_split(name, k, seed) for k in range(3))
        _generated[key] = parts
        while len(_generated) > 48:
            _generated.popitem(last=False)
    _generated.move_to_end(key)
    return _generated[key]


def make_suite_task(name: str, *, image_size: int = 32, split: str = "test", seed: int = 0) -> Task:
    """An embedded task; split="test": train on train+val (1,000 images), evaluate on test; "val": 800 / 200."""
    if name not in SUITE_TASKS:
        raise DatasetError(f"unknown suite task {name!r}; known: {', '.join(SUITE_TASKS)} (or suite:all)")
    check_split(split)
    num_classes, domain, _ = SUITE_TASKS[name]
    train, val, test = _splits(name, seed, image_size)
    if split == "test":
        train, evaluation = Split.concat([train, val]), test
    else:
        evaluation = val
    return Task(name=name, num_classes=num_classes, domain=domain, train=train, eval=evaluation, eval_name=split,
                augment="none", image_size=image_size, classes=suite_class_names(name))
