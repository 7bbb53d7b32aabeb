"""`digits`: the one suite task of real images, scikit-learn's bundled 8×8 handwritten digits (1,797 of them),
upsampled to the 32-px canvas. Nothing is rendered: the images are split, per class, by a seeded permutation."""
from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..base import DatasetError, Split
from .canvas import SUITE_SIZE

CLASSES = 10  # the digits 0-9
TEST_SIZE = 797  # what is left of the 1,797 images after 80 train + 20 val per class


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


def splits(seed: int) -> tuple[Split, Split, Split]:
    """`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 real images), label = the digit 0–9.

    Upsampled bicubically to 32×32, grey copied to RGB (bright ink on black). Per class, a seeded permutation gives
    80 train and 20 val images; the remaining 797 images (74–83 per class, so the test split is only roughly
    balanced) are the test split.
    """
    images, labels = _digits_data()
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"digits")]))
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(CLASSES):
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
