"""A small numpy ray caster for the 3-D suite scenes (CLEVR-like and smallNORB-like): pinhole cameras, and
boxes, spheres and vertical cylinders turned about the vertical axis, hit-tested and z-buffered per pixel ray.
It returns which solid each ray hits and the surface normal there; shading is left to the scene."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .canvas import SUITE_SIZE, grid, normalize

_UP = np.array([0.0, 1.0, 0.0])


@lru_cache(maxsize=None)
def _pixel_rays(fov_deg: float, ss: int) -> np.ndarray:
    """Unit ray directions [P, 3] in the camera frame (right, up, forward), row-major, supersampled `ss` times."""
    gx, gy = grid(ss)
    t = np.tan(np.radians(fov_deg) / 2)
    xn = (gx / SUITE_SIZE * 2 - 1).ravel() * t
    yn = (1 - gy / SUITE_SIZE * 2).ravel() * t
    return normalize(np.stack([xn, yn, np.ones_like(xn)], 1).astype(np.float64))


def camera(forward: np.ndarray, fov_deg: float, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """World ray directions [P, 3] of a square pinhole camera looking along `forward`, and its basis rows
    (right, up, forward). x right, y up; a camera looking along +z sees +x on its right."""
    forward = normalize(forward)
    right = normalize(np.cross(_UP, forward))
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


def cast(origin: np.ndarray, dirs: np.ndarray, objects: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
