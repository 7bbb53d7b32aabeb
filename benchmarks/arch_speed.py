"""Training speed of candidate embedded-ViT shapes (depth × width × heads, 32×32, patch 4), randomly initialised:
an MLAE fine-tuning step (batch 64) and a full-training step as `mlae pretrain` takes it (batch 128).

    .venv/bin/python benchmarks/arch_speed.py              # 1 thread, fp32 unless --bf16

Median images per second over the last 6 of 8 steps, both attention paths for MLAE. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

import mlae
from mlae.attention import set_attention

SHAPES = [(4, 192, 3), (12, 128, 2), (12, 128, 4), (12, 192, 3)]  # v2 first


def img_per_s(depth: int, dim: int, heads: int, attention: str, full: bool, bf16: bool, steps: int = 8) -> float:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, img_size=32, patch_size=4,
                              embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=0.1)
    if not full:
        mlae.apply(model, mlae.MLAEConfig())
    set_attention(model, attention)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = 128 if full else 64
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    rest = sorted(times[2:])
    return batch / rest[len(rest) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the CPU has native bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| depth × width (heads) | MLAE, math attention | MLAE, fused attention | full training, math |")
    print("|---|---|---|---|")
    for depth, dim, heads in SHAPES:
        cells = [img_per_s(depth, dim, heads, a, False, args.bf16) for a in ("math", "fused")]
        cells.append(img_per_s(depth, dim, heads, "math", True, args.bf16))
        print(f"| {depth} × {dim} ({heads}) | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
