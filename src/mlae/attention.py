"""Which attention kernel a ViT runs: PyTorch's fused ``scaled_dot_product_attention`` or the plain math path.

timm's ``Attention`` modules carry a ``fused_attn`` switch read at every forward. The two paths compute the
same function; their speed is not the same everywhere. Measured on a 2-core AVX-512/AMX CPU (embedded ViT,
batch 64, MLAE on qkv): in a bf16-autocast training step the fused kernel's backward
(``_scaled_dot_product_flash_attention_for_cpu_backward``) took about half of the step, and the math path ran
the whole step 1.8-1.9x faster; in fp32, and for inference, the two were within a few percent. On CUDA the
fused kernels (flash / memory-efficient attention) are the fast path; that could not be measured here, so
``auto`` keeps them there.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError

__all__ = ["ATTENTION_CHOICES", "resolve_attention", "set_attention"]

ATTENTION_CHOICES = ("auto", "fused", "math")


def resolve_attention(choice: str, device: torch.device | str, precision: str) -> str:
    """``auto`` -> ``math`` on the CPU under bf16 autocast (the fused CPU backward is slow there), else ``fused``."""
    if choice not in ATTENTION_CHOICES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {choice!r}")
    if precision not in ("bf16", "fp32"):  # "bfloat16" would otherwise quietly pick the slow fused path
        raise InputError(f"precision must be bf16 or fp32 (what the model trains or runs under), not {precision!r}")
    if choice != "auto":
        return choice
    return "math" if torch.device(device).type == "cpu" and precision == "bf16" else "fused"


def set_attention(model: nn.Module, choice: str = "auto", *, device: torch.device | str | None = None,
                  precision: str = "fp32") -> str | None:
    """Switch every timm attention module of ``model`` to the fused or the math path; returns the path chosen.

    ``choice="auto"`` decides from ``device`` (default: where the model's parameters are) and ``precision``
    (``bf16`` when training under bf16 autocast). Works on any model whose attention modules have timm's
    ``fused_attn`` attribute; a model without one is left as it is and ``None`` is returned.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    path = resolve_attention(choice, device, precision)
    found = False
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = path == "fused"
            found = True
    return path if found else None
