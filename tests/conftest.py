"""Shared test fixtures: tiny real models (timm ViTs and a plain MLP) that build in milliseconds."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
# The per-user cache (the bf16 measurement behind --precision auto, data caches beside unwritable folders) goes to
# one folder of this test session, inherited by the `mlae` subprocesses: tests neither read nor write the user's.
os.environ["MLAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlae-test-cache-")
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


def run_on_tmpfs(mountpoint: Path, command: list[str], *, size: str = "1m", read_only: bool = False,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` where ``mountpoint`` is a fresh tmpfs of ``size`` (read-only if asked): a really full disk
    or a really read-only folder, without root, in private user + mount namespaces (``unshare -rm``). Being
    root is no substitute: permission bits do not stop root. Skips where such namespaces are not allowed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) for a small or read-only tmpfs")
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "size=$2$3" tmpfs "$1" && shift 3 && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mountpoint), size,
                           ",ro" if read_only else "", *command], capture_output=True, text=True, timeout=600,
                          env=env)
