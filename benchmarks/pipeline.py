"""`mlae train` next to the pipeline VTAB-1k users run today, on the same image folder, model, steps and recipe.

    .venv/bin/python benchmarks/pipeline.py --task digits --epochs 10

The folder is a suite task written out as JPEG files (``<dir>/train/<class>/*.jpg``, ``<dir>/test/...``). The
baseline trains the way the NOAH / SPT / VPT scripts do: a torchvision ``ImageFolder`` decoding every JPEG with
PIL in every epoch through ``Resize -> ToTensor -> Normalize`` transforms, a ``DataLoader`` with their
``num_workers`` (4), fp32, timm's default (fused) attention; rank-8 LoRA on qkv, AdamW, per-step cosine with
warmup, evaluated once at the end. ``mlae train --dataset folder:<dir> --method lora`` runs the same recipe
from a fresh process with its defaults (decoded-image cache built in the run, precision and attention picked
for the machine), evaluating the test split once at the end as well (``--eval-every 0`` keeps its default of
about four evaluations); it also measures the training images in eval mode once, which the baseline does not.
Prints wall times end to end, their ratio and both accuracies.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlae.data.base import CACHE_DIR_NAME

ROOT = Path(__file__).resolve().parents[1]


def write_folder(task_name: str, out: Path) -> None:
    """A suite task as JPEG files in the ImageFolder layout (quality 95, as VTAB-1k's exported JPEGs)."""
    from PIL import Image

    from mlae.data import load_task

    task = load_task(f"suite:{task_name}", image_size=32, split="test", seed=0)
    for split, data in (("train", task.train), ("test", task.eval)):
        for i, (img, label) in enumerate(zip(data.images.numpy(), data.labels.tolist())):
            folder = out / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:05d}.jpg", quality=95)


def baseline(folder: Path, epochs: int, lr: float, batch_size: int, loader_workers: int, threads: int,
             seed: int, backbone: str | None) -> tuple[float, float]:
    """(seconds, test top-1) of the NOAH-style loop, inside this process (see :func:`baseline_process`)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    import mlae
    from mlae.backbones import create_backbone
    from mlae.engine import lr_at

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tf = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train = ImageFolder(str(folder / "train"), transform=tf)
    test = ImageFolder(str(folder / "test"), transform=tf)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=loader_workers,
                                         drop_last=False, pin_memory=False)
    model = create_backbone(backbone, num_classes=len(train.classes))
    mlae.apply(model, mlae.LoRAConfig(rank=8, alpha=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    total = epochs * len(loader)
    warm = len(loader)  # one warmup epoch, as mlae train's default
    step = 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warm, lr)  # the schedule mlae train uses
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256, num_workers=loader_workers):
            correct += int((model(x).argmax(-1) == y).sum())
    return time.perf_counter() - t0, correct / len(test)


def baseline_process(folder: Path, epochs: int, lr: float, batch_size: int, loader_workers: int, threads: int,
                     seed: int, backbone: str | None) -> tuple[float, float]:
    """(seconds, test top-1) of the NOAH-style loop in a fresh Python process, start-up (imports) included, as
    the scripts are run."""
    cmd = [sys.executable, __file__, "--baseline-only", str(folder), "--epochs", str(epochs), "--lr", str(lr),
           "--batch-size", str(batch_size), "--loader-workers", str(loader_workers), "--threads", str(threads),
           "--seeds", str(seed)] + (["--backbone", backbone] if backbone else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])["top1"]


def ours(folder: Path, epochs: int, lr: float, batch_size: int, threads: int, seed: int, out: Path,
         backbone: str | None, eval_every: int) -> tuple[float, float]:
    """(seconds, test top-1) of `mlae train` in a fresh process: start-up, decoding and caching included."""
    cache = [p for p in folder.rglob("*") if p.is_dir() and p.name == CACHE_DIR_NAME]
    for c in cache:
        shutil.rmtree(c)
    cmd = [sys.executable, "-m", "mlae", "train", "--dataset", f"folder:{folder}", "--method", "lora",
           "--epochs", str(epochs), "--lr", str(lr), "--batch-size", str(batch_size), "--threads", str(threads),
           "--seed", str(seed), "--eval-every", str(eval_every), "--out", str(out), "--overwrite", "--quiet"] + (["--backbone", backbone] if backbone else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((out / "results.json").read_text())["test_top1"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits", help="suite task written out as JPEGs")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both pipelines")
    ap.add_argument("--loader-workers", type=int, default=4, help="the baseline's DataLoader workers (NOAH: 4)")
    ap.add_argument("--seeds", default="0", help="comma-separated; both pipelines run every seed")
    ap.add_argument("--backbone", default=None, help="both pipelines: an embedded version (embedded-v2, ...) or a "
                    "`mlae pretrain` folder (default: the default embedded backbone)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="mlae train's --eval-every (default: the number of epochs, i.e. one evaluation at the end "
                         "as the baseline does; 0 = mlae train's own default, about four)")
    ap.add_argument("--baseline-only", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_only:
        seconds, top1 = baseline(args.baseline_only, args.epochs, args.lr, args.batch_size, args.loader_workers,
                                 args.threads, int(args.seeds), args.backbone)
        print(json.dumps({"seconds": seconds, "top1": top1}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_folder(args.task, folder)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            b = baseline_process(folder, args.epochs, args.lr, args.batch_size, args.loader_workers, args.threads, seed,
                                 args.backbone)
            o = ours(folder, args.epochs, args.lr, args.batch_size, args.threads, seed, Path(tmp) / f"run{seed}",
                     args.backbone, args.epochs if args.eval_every is None else args.eval_every)
            rows.append((seed, b, o))
            print(f"seed {seed}: NOAH-style {b[0]:.0f} s, test {100 * b[1]:.1f} % | mlae train {o[0]:.0f} s, "
                  f"test {100 * o[1]:.1f} % | speed-up {b[0] / o[0]:.2f}x", flush=True)
    tb, to = sum(r[1][0] for r in rows), sum(r[2][0] for r in rows)
    evals = "its default evaluations" if args.eval_every == 0 else f"--eval-every {args.eval_every or args.epochs}"
    print(f"\n{args.backbone or 'embedded'} backbone, {args.task}, {args.epochs} epochs, LoRA r=8, batch {args.batch_size}, "
          f"{args.threads} threads, mlae train with {evals}: "
          f"end to end {tb:.0f} s (NOAH-style) vs {to:.0f} s (mlae train) = {tb / to:.2f}x; test top-1 "
          f"{100 * sum(r[1][1] for r in rows) / len(rows):.1f} vs {100 * sum(r[2][1] for r in rows) / len(rows):.1f} %")


if __name__ == "__main__":
    main()
