"""Per-expert attention maps (the MLAE paper's Fig. 6): the CLS token's attention in one block with only expert
``i``'s update active, next to the backbone without adapters and the fine-tuned model. The attention weights are
computed here from the block's qkv output (timm's fused attention never materialises them)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputError, MLAEWarning
from ..utils import pyplot

__all__ = ["attention_maps", "plot_attention", "sample_images"]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the block's input is known."""


@contextmanager
def _adapters_off(model: nn.Module):
    """Put every adapter layer's frozen base ``nn.Linear`` back in its place for the duration."""
    import mlae

    swapped = []
    for name, layer in list(mlae.adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
        swapped.append((parent, child, layer))
    try:
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def _attention_input(model: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens ``block.attn`` receives for images ``x`` (the forward stops there)."""
    seen = []

    def hook(module, args):
        seen.append(args[0])
        raise _Captured

    handle = block.attn.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise InputError("the model's forward never reached the chosen block's attention")
    return seen[0]


def _cls_attention(attn: nn.Module, qkv: torch.Tensor, prefix: int, grid: tuple[int, int],
                   has_cls: bool) -> torch.Tensor:
    """Softmax(q·kᵀ) from a qkv output ``[B, N, 3·C]`` as timm's Attention computes it, averaged over heads;
    the CLS query's row over the patch tokens (mean over queries without a class token), as ``[B, *grid]``."""
    b, n, _ = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1).mean(1)  # [B, N, N]
    rows = weights[:, 0] if has_cls else weights[:, prefix:].mean(1)
    return rows[:, prefix:].reshape(b, *grid)


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, block: int,
                   other_blocks: str = "adapted") -> tuple[list[str], torch.Tensor]:
    """CLS attention maps of ``model.blocks[block]`` for input images ``x``: columns ``base`` (the backbone
    without any adapter), ``all experts`` (the fine-tuned model) and ``expert i`` (the block's qkv update cut to
    expert ``i``; LoRA: rank-1 component ``i``). ``other_blocks``: "adapted" keeps the other blocks' adapters
    (``all experts`` is then exactly the fine-tuned model), "base" turns them off so that only the chosen block
    differs from the backbone. Returns (column names, maps ``[images, columns, *patch grid]``)."""
    from ..adapters.base import AdapterLayer

    if other_blocks not in ("adapted", "base"):
        raise InputError(f"other_blocks must be 'adapted' or 'base', got {other_blocks!r}")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise InputError(f"attention maps need a timm VisionTransformer, got {type(model).__name__}")
    if not -len(blocks) <= block < len(blocks):
        raise InputError(f"--block {block} is out of range: the model has {len(blocks)} blocks")
    blk = blocks[block]
    layer = blk.attn.qkv
    if not isinstance(layer, AdapterLayer):
        raise InputError(f"block {block}'s attn.qkv is not adapted in this run (no experts to show)")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_cls = getattr(model, "cls_token", None) is not None
    grid = tuple(model.patch_embed.grid_size)
    model.eval()

    with _adapters_off(model):
        x_base = _attention_input(model, blk, x)
    x_up = _attention_input(model, blk, x) if other_blocks == "adapted" else x_base
    try:
        a, b = (t.detach() for t in layer.factors())
    except TypeError as err:  # e.g. MoLE
        raise InputError(f"no per-expert updates in {type(layer).__name__}: {err}") from None
    base_up = layer.base(x_up)
    columns = ["base", "all experts"]
    outputs = [layer.base(x_base), layer(x_up)]
    start = 0
    for i, size in enumerate(layer.expert_sizes()):
        rows = slice(start, start + size)
        outputs.append(base_up + (x_up @ a[rows].T.to(x_up.dtype)) @ b[:, rows].T.to(x_up.dtype))
        columns.append(f"expert {i + 1}")
        start += size
    maps = torch.stack([_cls_attention(blk.attn, qkv, prefix, grid, has_cls) for qkv in outputs], dim=1)
    return columns, maps


def plot_attention(images: torch.Tensor, columns: list[str], maps: torch.Tensor, title: str = "",
                   relative: bool = False):
    """Grid: one row per image; columns: the image, then each map over the image, min-max scaled per panel.
    ``relative``: every map after the first (``base``) is shown as its difference to it, scaled by its largest
    magnitude (red: more attention than the backbone, blue: less) -- small updates are invisible otherwise."""
    import torch.nn.functional as F

    plt = pyplot()
    n, c = maps.shape[:2]
    size = images.shape[-2:]
    fig, axes = plt.subplots(n, c + 1, figsize=(1.5 * (c + 1), 1.5 * n + (0.4 if title else 0.2)), squeeze=False)
    up = F.interpolate(maps.reshape(n * c, 1, *maps.shape[2:]).float(), size=size, mode="bilinear",
                       align_corners=False).reshape(n, c, *size)
    lo, hi = up.amin((-2, -1), keepdim=True), up.amax((-2, -1), keepdim=True)
    scaled = (up - lo) / (hi - lo).clamp_min(1e-12)
    if relative:
        diff = up[:, 1:] - up[:, :1]
        scaled[:, 1:] = diff / diff.abs().amax((-2, -1), keepdim=True).clamp_min(1e-12)
    for r in range(n):
        img = images[r].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[r, 0].imshow(img)
        for j in range(c):
            axes[r, j + 1].imshow(img)
            style = {"cmap": "RdBu_r", "vmin": -1, "vmax": 1} if relative and j else {"cmap": "jet", "vmin": 0,
                                                                                       "vmax": 1}
            axes[r, j + 1].imshow(scaled[r, j].cpu().numpy(), alpha=0.6 if relative and j else 0.5, **style)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    names = ["image", columns[0], *(f"{name} − {columns[0]}" if relative else name for name in columns[1:])]
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def sample_images(meta: dict, n: int, dataset: str | None, data_root: str | None, split: str):
    """``n`` evaluation images of the run's task: (model inputs, images in [0, 1] for display)."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD, load_task, prepare_batch
    from ..engine import Inputs

    if n < 1:
        raise InputError(f"--images must be >= 1, got {n}")
    size = int(meta["image_size"])
    task = load_task(dataset or meta.get("dataset_spec") or meta["dataset"],
                     data_root=data_root if data_root is not None else meta.get("data_root"),
                     image_size=size, split=split, seed=int(meta.get("seed", 0)))
    pool = task.eval.images
    if n > len(pool):
        warnings.warn(f"--images {n}: the {split} split has {len(pool)} images; showing all of them", MLAEWarning,
                      stacklevel=2)
    index = torch.linspace(0, len(pool) - 1, min(n, len(pool))).round().long().unique()
    raw = pool[index]
    x = Inputs(task.augment, size, torch.device("cpu"), meta.get("input_mean"), meta.get("input_std"))(raw,
                                                                                                       train=False)
    shown = prepare_batch(raw, train=False, augment=task.augment, image_size=size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return x, shown * std + mean

