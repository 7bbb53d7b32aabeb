"""`mlae pretrain`: pretrain the embedded ViT from scratch on formula-driven fractal images (:mod:`mlae.pretrain`).

With its defaults (and ``--threads 2``) this command reproduces the v2 weights; docs/BACKBONES.md has the exact
command lines of each shipped backbone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..attention import ATTENTION_CHOICES
from ..hardware import CPU_AUTO_PRECISION
from .train import _fail, threads_count

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from ..pretrain import DEFAULTS

    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the embedded ViT from scratch on fractal images (FractalDB-style)",
        description="Pretrain a small ViT from scratch on formula-driven images: IFS fractal classes "
        "(FractalDB, Kataoka et al. 2020; Nakashima et al. 2022), rendered with numpy, classified with "
        "cross-entropy. The defaults reproduce the weights shipped as embedded-v2 (39 min on 2 quiet CPU "
        "cores); the default embedded backbone, embedded-v3, is --classes 1000 --per-class 120 --epochs 6 "
        "--depth 12 --dim 128 --heads 4 (101 min on 1 thread). Writes <out>/embedded_vit.safetensors (fp16, "
        "head removed) and "
        "<out>/embedded_vit.json (architecture, recipe, data size, wall time, accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    g = p.add_argument_group("data (fractal classes)")
    g.add_argument("--classes", type=int, default=d["classes"], help="number of IFS fractal classes (>= 2)")
    g.add_argument("--per-class", type=int, default=d["per_class"],
                   help="training images per class (--classes x --per-class must be at least --batch-size)")
    g.add_argument("--eval-per-class", type=int, default=d["eval_per_class"],
                   help="held-out images per class (fresh renders) for the final accuracy (>= 1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (>= 1)")
    g.add_argument("--steps", type=int, default=None,
                   help="stop after this many optimiser steps (smoke tests / CI); the schedule still "
                   "spans --epochs")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="images per optimiser step (an epoch's last partial batch is dropped)")
    g.add_argument("--lr", type=float, default=d["lr"], help="AdamW peak learning rate (> 0; cosine decay)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay (>= 0)")
    g.add_argument("--warmup", type=float, default=d["warmup"],
                   help="fraction of the steps spent in linear warmup, in [0, 1)")
    g.add_argument("--label-smoothing", type=float, default=d["label_smoothing"],
                   help="label smoothing of the cross-entropy, in [0, 1)")
    g.add_argument("--drop-path", type=float, default=d["drop_path"], help="stochastic depth rate, in [0, 1)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of the fractal classes, the renders and the "
                   "initial weights")
    g.add_argument("--threads", type=threads_count, default=0, metavar="N", help="torch CPU threads (default or 0: "
                   "the cores other programs leave free; the card records the number used)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help=f"auto: bf16 autocast on {CPU_AUTO_PRECISION}; else fp32 "
                   "(pretraining runs on the CPU)")
    g.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32", default=argparse.SUPPRESS,
                   help="same as --precision fp32")
    g.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention kernel (auto: math on a CPU under bf16, where the fused backward is slow)")
    g = p.add_argument_group("architecture (a timm VisionTransformer)")
    g.add_argument("--depth", type=int, default=d["depth"], help="transformer blocks")
    g.add_argument("--dim", type=int, default=d["dim"], help="embedding width (a multiple of --heads)")
    g.add_argument("--heads", type=int, default=d["heads"], help="attention heads")
    g.add_argument("--patch-size", type=int, default=d["patch_size"], help="patch size (pixels)")
    g.add_argument("--img-size", type=int, default=d["img_size"],
                   help="input size (pixels; a multiple of --patch-size)")
    p.add_argument("--out", type=Path, default=Path("embedded_vit"),
                   help="output directory for the weights and the JSON card")
    p.add_argument("--overwrite", action="store_true",
                   help="replace weights already in --out (otherwise refused before any work starts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


_OPTIONS = ("classes", "per_class", "eval_per_class", "epochs", "steps", "batch_size", "lr", "weight_decay",
           "warmup", "label_smoothing", "drop_path", "seed", "depth", "dim", "heads", "patch_size", "img_size",
           "out", "quiet", "attention")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Exception as err:  # a user error (mlae.MLAEError, a refused write) as one line; a bug keeps its traceback
        return _fail(err)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..backbones import CARD_FILE, WEIGHTS_FILE
    from ..errors import InputError, RunDirError
    from ..hardware import auto_threads, resolve_precision
    from ..pretrain import check_options, pretrain

    # All checked up front: finding out after an hour of pretraining that the options trained nothing, or that the
    # result cannot be written, is worse.
    options = {k: getattr(args, k) for k in _OPTIONS}
    check_options(**options)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: choose another --out")
    existing = out / WEIGHTS_FILE
    if existing.exists() and not args.overwrite:
        raise RunDirError(f"{existing} already exists; pass --overwrite to replace it (e.g. the shipped weights) "
                          f"or choose another --out")
    card = pretrain(**options, threads=args.threads or auto_threads(),
                    bf16=resolve_precision(args.precision, torch.device("cpu")) == "bf16")
    acc = card["pretraining"]["heldout_top1"]
    print(f"fractal held-out top-1 {acc:.4f}; wrote {existing} and {CARD_FILE}")
    return 0
