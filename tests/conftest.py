"""Shared test fixtures: tiny real models (timm ViTs and a plain MLP) that build in milliseconds."""
import os

import pytest
import timm
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_vit(num_classes: int = 5, depth: int = 2, dim: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             embed_dim=dim, num_heads=2, num_classes=num_classes)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 3))


@pytest.fixture
def tiny_vit():
    return make_tiny_vit
