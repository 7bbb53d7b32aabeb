"""Turning cached uint8 images into model inputs, batched on whatever device the images live on.

Two recipes, matching the benchmark protocols (VTAB-1k: resize, no augmentation; FGVC: as VPT):
- "none" (VTAB-1k and everything else): images are cached at the model's size; scale to [0, 1] and normalise.
- "fgvc" (VPT): images are cached at the "resize 256" size for a 224 model (`fgvc_cache_size`); training takes a
  random `image_size` crop and a random horizontal flip per sample, evaluation takes the centre crop.
"""
from __future__ import annotations

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD", "AUGMENTS", "prepare_batch", "cache_size", "fgvc_cache_size"]

# The same constants as timm.data.IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD (spelled out so that the data
# layer imports without timm).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm.data.IMAGENET_INCEPTION_MEAN / _STD: inputs in [-1, 1], how Google's ViT-B/16 (ImageNet-21k) was pretrained.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
AUGMENTS = ("none", "fgvc")


def fgvc_cache_size(image_size: int) -> int:
    """Side of the FGVC resize step: 256 for a 224 model, scaled proportionally for other sizes."""
    return int(round(image_size * 256 / 224))


def cache_size(augment: str, image_size: int) -> int:
    """Side at which a task's images are cached for a model that takes `image_size` inputs."""
    _check_augment(augment)
    return fgvc_cache_size(image_size) if augment == "fgvc" else image_size


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")


def prepare_batch(images: torch.Tensor, *, train: bool, augment: str, image_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float32 [B, 3, image_size, image_size].

    Random crops and flips draw from `generator` (default: torch's global RNG), so a seeded run is repeatable.
    """
    _check_augment(augment)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"prepare_batch expects uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if augment == "none":
        if (h, w) != (image_size, image_size):
            raise ValueError(f"augment='none' expects images cached at {image_size}x{image_size}, got {h}x{w}")
    else:
        if h < image_size or w < image_size:
            raise ValueError(f"augment='fgvc' needs images of at least {image_size} px, got {h}x{w}")
        if train:
            images = _random_crop_flip(images, image_size, generator)
        else:
            top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
            images = images[:, :, top:top + image_size, left:left + image_size]
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def _random_crop_flip(images: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """A different crop offset and flip per sample, gathered in one indexing op (no Python loop over the batch)."""
    b, _, h, w = images.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=gen_device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=gen_device)
    flip = torch.rand(b, generator=generator, device=gen_device) < 0.5
    top, left, flip = top.to(images.device), left.to(images.device), flip.to(images.device)
    ar = torch.arange(size, device=images.device)
    rows = top[:, None] + ar                                            # [B, S]
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # [B, S], reversed when flipped
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, S, S, 3]
    return out.permute(0, 3, 1, 2)
