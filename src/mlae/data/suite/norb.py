"""smallNORB-like views: one of five toys built from boxes (car, truck, airplane, four-legged animal, human
figure), its proportions jittered, seen from a camera on a sphere around it and Lambert-shaded in grey by the
ray caster. `smallnorb_azi` labels the camera azimuth, `smallnorb_ele` its elevation."""
from __future__ import annotations

import numpy as np

from .canvas import SUITE_SIZE, in_bin, normalize, pool
from .raycast import camera, cast

AZI_BINS = 18  # smallnorb_azi: 20° bins of the azimuth, bin k centred on 20k°
ELE_BINS = 9  # smallnorb_ele: 5° bins of the elevation over [27.5°, 72.5°), bin k centred on 30° + 5k°

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
    dirs, (right, up, forward) = camera(-cam, 36.0, _NORB_SS)
    _, owner, normal = cast(cam, dirs, [("box", c, h, 0.0) for c, h in zip(centre, half)])
    # light from a random direction on the camera's side, drawn relative to the camera so it does not leak the pose
    lc = normalize(np.array([rng.uniform(-1, 1), rng.uniform(0.0, 1), rng.uniform(0.3, 1)]))
    light = lc[0] * right + lc[1] * up - lc[2] * forward
    albedo, ambient, background = rng.uniform(0.6, 0.9), rng.uniform(0.12, 0.3), rng.uniform(0.05, 0.35)
    shade = albedo * (ambient + (1 - ambient) * np.clip(normal @ light, 0, None))
    img = np.where(owner >= 0, shade, background)
    side = SUITE_SIZE * _NORB_SS
    grey = pool(img.reshape(side, side, 1), _NORB_SS) + rng.normal(0, 0.015, (SUITE_SIZE, SUITE_SIZE, 1))
    return np.repeat(np.clip(grey, 0, 1), 3, -1).astype(np.float32)


def render_smallnorb_azi(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`smallnorb_azi`: label = which of 18 bins of 20° holds the camera azimuth (bin k centred on 20k°).

    smallNORB-like: one of five box-built toys (car, truck, airplane, four-legged animal, human figure) with
    jittered proportions, grey Lambert shading, random light, background level and elevation (27.5°–72.5°).
    """
    az = np.radians(in_bin(labels, -10.0, 350.0, AZI_BINS, rng))
    el = np.radians(rng.uniform(27.5, 72.5, len(labels)))
    return np.stack([_render_norb(a, e, rng) for a, e in zip(az, el)])


def render_smallnorb_ele(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`smallnorb_ele`: label = which of 9 bins of 5° holds the camera elevation (bin k centred on 30° + 5k°).

    Same toys and nuisances as smallnorb_azi, azimuth uniform over 360°.
    """
    el = np.radians(in_bin(labels, 27.5, 72.5, ELE_BINS, rng))
    az = rng.uniform(0, 2 * np.pi, len(labels))
    return np.stack([_render_norb(a, e, rng) for a, e in zip(az, el)])
