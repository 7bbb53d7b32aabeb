"""Formula-driven images: FractalDB-style iterated function systems (IFS).

The recipe follows FractalDB (Kataoka et al., ACCV 2020; for ViTs Nakashima et al., AAAI 2022) with the
σ-factor sampling of Anderson & Farrell (2022):

* a *class* is an IFS of ``N`` (2–4) contractive affine maps ``x -> A_i x + b_i``. Each ``A_i`` is
  ``R(θ) diag(σ1, d·σ2) R(φ)`` with singular values drawn so that the class's σ-factor
  ``Σ_i (σ1_i + 2 σ2_i)`` lies in ``[(5+N)/2, (6+N)/2]`` — the band in which attractors are neither dust nor
  blobs. Maps are picked with probability proportional to ``|det A_i|``.
* classes whose attractor covers less than ``min_fill`` of the canvas are rejected and redrawn;
* an *instance* jitters every parameter of its class a little (``jitter``), is rendered by the chaos game
  (vectorised over many chains in numpy) at twice the output size, and box-filtered down (anti-aliasing);
* colour: greyscale on black, or one colour per map on a random dark background (half of the instances each).

Everything is a pure function of the seed: ``FractalDataset(classes, per_class, seed)`` renders the same
images on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IFSClass", "sample_ifs_classes", "render_instance", "render_dataset"]


@dataclass(frozen=True)
class IFSClass:
    """One fractal category: ``A`` is ``[N, 2, 2]``, ``b`` is ``[N, 2]``, ``p`` the map probabilities."""

    A: np.ndarray
    b: np.ndarray
    p: np.ndarray


def _rotation(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _sample_sigma_factor(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (σ2 ≤ σ1 < 1) of ``n`` maps whose σ-factor falls in the band for ``n``."""
    target = rng.uniform((5 + n) / 2, (6 + n) / 2)
    while True:  # split the σ-factor into per-map shares σ1 + 2σ2 < 3, uniformly over the simplex
        share = target * rng.dirichlet(np.ones(n))
        if np.all(share < 3.0):
            break
    # σ1 ∈ [share/3, share] (σ2 ≤ σ1) and σ1 < 1, σ2 = (share - σ1)/2 ≥ 0
    lo, hi = np.maximum(share / 3.0, share - 2.0), np.minimum(1.0, share)
    sigma1 = rng.uniform(lo, hi)
    return sigma1, (share - sigma1) / 2.0


def _random_ifs(rng: np.random.Generator) -> IFSClass:
    n = int(rng.integers(2, 5))
    s1, s2 = _sample_sigma_factor(rng, n)
    d = rng.choice([-1.0, 1.0], size=n)
    diag = np.zeros((n, 2, 2))
    diag[:, 0, 0], diag[:, 1, 1] = s1, d * s2
    A = _rotation(rng.uniform(-np.pi, np.pi, n)) @ diag @ _rotation(rng.uniform(-np.pi, np.pi, n))
    b = rng.uniform(-1.0, 1.0, (n, 2))
    return IFSClass(A=A, b=b, p=_probabilities(A))


def _probabilities(A: np.ndarray) -> np.ndarray:
    det = np.abs(np.linalg.det(A)) + 1e-3  # keep degenerate (line-like) maps reachable
    return det / det.sum()


def _chaos_game(ifs: IFSClass, rng: np.random.Generator, chains: int = 512, steps: int = 20,
                burn_in: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Points on the attractor (``[M, 2]``) and the index of the map that produced each point.

    Many short chains in parallel: after ``burn_in`` contractions a chain sits on the attractor.
    """
    a00, a01, a10, a11 = (ifs.A[:, i, j] for i in (0, 1) for j in (0, 1))
    b0, b1 = ifs.b[:, 0], ifs.b[:, 1]
    ks = rng.choice(len(ifs.p), size=(steps, chains), p=ifs.p)
    x0, x1 = rng.uniform(-1, 1, chains), rng.uniform(-1, 1, chains)
    keep = steps - burn_in
    pts = np.empty((keep, chains, 2))
    for t in range(steps):
        k = ks[t]
        x0, x1 = a00[k] * x0 + a01[k] * x1 + b0[k], a10[k] * x0 + a11[k] * x1 + b1[k]
        if t >= burn_in:
            pts[t - burn_in, :, 0], pts[t - burn_in, :, 1] = x0, x1
    return pts.reshape(-1, 2), ks[burn_in:].reshape(-1)


def _to_pixels(pts: np.ndarray, size: int, margin: float = 0.06) -> np.ndarray | None:
    """Fit points into a ``size``² canvas (bounding box, aspect kept); flat pixel indices (-1 = outside)."""
    if not np.all(np.isfinite(pts)):
        return None
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float(np.max(hi - lo))
    if extent < 1e-6:
        return None
    centre = (lo + hi) / 2
    scale = size * (1 - 2 * margin) / extent
    pix = np.floor((pts - centre) * scale + size / 2).astype(np.int64)
    inside = np.all((pix >= 0) & (pix < size), axis=1)
    return np.where(inside, pix[:, 1] * size + pix[:, 0], -1)


def fill_ratio(ifs: IFSClass, rng: np.random.Generator, size: int = 64) -> float:
    """Fraction of a ``size``² canvas the attractor covers."""
    pts, _ = _chaos_game(ifs, rng, chains=1024, steps=24)
    flat = _to_pixels(pts, size)
    if flat is None:
        return 0.0
    return float(np.unique(flat[flat >= 0]).size) / (size * size)


def sample_ifs_classes(num_classes: int, seed: int, min_fill: float = 0.10) -> list[IFSClass]:
    """Draw ``num_classes`` IFS categories; those filling less than ``min_fill`` of the canvas are redrawn."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF4AC]))
    classes: list[IFSClass] = []
    while len(classes) < num_classes:
        ifs = _random_ifs(rng)
        if fill_ratio(ifs, rng) >= min_fill:
            classes.append(ifs)
    return classes


def render_instance(ifs: IFSClass, rng: np.random.Generator, size: int = 32, jitter: float = 0.05,
                    colour: bool | None = None) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 image of a jittered instance of ``ifs``."""
    for _ in range(20):  # a jitter can rarely push a map out of the contractive regime: redraw it
        A = ifs.A * (1 + jitter * rng.standard_normal(ifs.A.shape))
        b = ifs.b + jitter * rng.standard_normal(ifs.b.shape)
        if np.all(np.linalg.norm(A, ord=2, axis=(1, 2)) < 1.0):
            break
    else:
        A, b = ifs.A, ifs.b
    inst = IFSClass(A=A, b=b, p=_probabilities(A))
    pts, k = _chaos_game(inst, rng)
    big = 2 * size
    flat = _to_pixels(pts, big)
    img = np.zeros((big * big, 3), np.float32)
    if flat is not None:
        keep = flat >= 0
        flat, k = flat[keep], k[keep]
        if colour is None:
            colour = bool(rng.random() < 0.5)
        if colour:
            palette = rng.uniform(0.25, 1.0, (len(A), 3)).astype(np.float32)
            ink = palette[k]
        else:
            ink = np.full((len(k), 3), rng.uniform(0.7, 1.0), np.float32)
        img[flat] = ink  # last writer wins: cheap, and keeps each map's colour region visible
        if colour:
            hit = np.zeros(big * big, bool)
            hit[flat] = True
            img[~hit] = rng.uniform(0.0, 0.35, 3).astype(np.float32)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def render_dataset(classes: list[IFSClass], per_class: int, seed: int, size: int = 32,
                   jitter: float = 0.05, split: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` instances of every class: images ``[C·per_class, size, size, 3]`` uint8 and labels.

    ``split`` separates independent draws of instances (0 = training, 1 = held-out evaluation).
    """
    images = np.empty((len(classes) * per_class, size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), per_class)
    it = range(len(classes))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"rendering {len(images)} fractals", unit="class")
    for c in it:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A57, split, c]))
        for j in range(per_class):
            images[c * per_class + j] = render_instance(classes[c], rng, size=size, jitter=jitter)
    return images, labels
