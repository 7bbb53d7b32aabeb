"""Pretraining the embedded ViT from scratch on formula-driven fractal images (the command: ``mlae pretrain``,
:mod:`mlae.commands.pretrain`).

The shipped weights (``mlae/weights/embedded_vit.safetensors`` + ``embedded_vit.json``) are the output of
this command with its defaults (see docs/BACKBONES.md for the exact command line and the measured run).
Everything is a function of ``--seed``: the fractal classes, the rendered images, the initialisation and
the batch order (bit-for-bit equality across machines is not promised: CPU kernels differ).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import fractals
from .attention import set_attention
from .backbones import (CARD_FILE, EMBEDDED_ARCH, EMBEDDED_MEAN, EMBEDDED_STD, WEIGHTS_FILE,
                        _is_head, build_embedded)
from .errors import InputError
from .files import atomic_save_file, atomic_write_text

__all__ = ["pretrain", "check_options", "DEFAULTS"]

DEFAULTS: dict[str, Any] = dict(classes=100, per_class=600, epochs=8, batch_size=128, lr=1e-3,
                                weight_decay=0.05, warmup=0.05, label_smoothing=0.1, drop_path=0.1,
                                seed=0, eval_per_class=10, depth=EMBEDDED_ARCH["depth"],
                                dim=EMBEDDED_ARCH["embed_dim"], heads=EMBEDDED_ARCH["num_heads"],
                                patch_size=EMBEDDED_ARCH["patch_size"], img_size=EMBEDDED_ARCH["img_size"])


def check_options(*, classes: int, per_class: int, eval_per_class: int, epochs: int, steps: int | None,
                  batch_size: int, lr: float, weight_decay: float, warmup: float, label_smoothing: float,
                  drop_path: float, seed: int, depth: int, dim: int, heads: int, patch_size: int, img_size: int,
                  threads: int | None = None, **_) -> None:
    """Refuse, with one :class:`~mlae.errors.InputError` naming the flag, its value and the fix, a setting that
    would crash the run or train nothing; called before any image is rendered or any file is written."""
    def at_least(flag: str, value, minimum: int, why: str = "") -> None:
        if value < minimum:
            raise InputError(f"{flag} must be >= {minimum}{why}, not {value!r}")

    at_least("--classes", classes, 2, " (a classifier needs two classes to tell apart)")
    at_least("--per-class", per_class, 1)
    at_least("--eval-per-class", eval_per_class, 1, " (the held-out accuracy needs images)")
    at_least("--epochs", epochs, 1)
    if steps is not None:
        at_least("--steps", steps, 1, " (or leave it out to run every epoch)")
    at_least("--batch-size", batch_size, 1)
    train_images = classes * per_class
    if batch_size > train_images:  # every batch is full (the last partial one is dropped): no step would run
        raise InputError(f"--batch-size {batch_size} is larger than the {train_images} training images (--classes "
                         f"{classes} x --per-class {per_class}), so no optimiser step would run: lower --batch-size "
                         f"or raise --per-class")
    # `not x > 0` also refuses NaN, as TrainConfig does
    if not lr > 0 or math.isinf(lr):
        raise InputError(f"--lr must be a positive number, not {lr!r}")
    if not 0 <= weight_decay < math.inf:
        raise InputError(f"--weight-decay must be a number >= 0, not {weight_decay!r}")
    if not 0 <= warmup < 1:
        raise InputError(f"--warmup is the fraction of the steps spent in linear warmup: it must be in [0, 1), not "
                         f"{warmup!r}")
    if not 0 <= label_smoothing < 1:
        raise InputError(f"--label-smoothing must be in [0, 1), not {label_smoothing!r}")
    if not 0 <= drop_path < 1:
        raise InputError(f"--drop-path (the stochastic depth rate) must be in [0, 1), not {drop_path!r}")
    at_least("--seed", seed, 0)  # numpy's SeedSequence, which draws the fractals, takes none below 0
    if threads is not None:
        at_least("--threads", threads, 1)
    at_least("--depth", depth, 1)
    at_least("--heads", heads, 1)
    at_least("--dim", dim, 1)
    if dim % heads:
        raise InputError(f"--dim {dim} is not divisible by --heads {heads}: choose a width that is a multiple of "
                         f"the heads")
    at_least("--patch-size", patch_size, 1)
    at_least("--img-size", img_size, 1)
    if img_size % patch_size:
        raise InputError(f"--img-size {img_size} is not divisible by --patch-size {patch_size}: choose an input "
                         f"size that is a multiple of the patch size")


def _normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(EMBEDDED_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EMBEDDED_STD).view(1, 3, 1, 1)
    return (x_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


@torch.no_grad()
def _accuracy(model, images: torch.Tensor, labels: torch.Tensor, bf16: bool, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(_normalise(images[i:i + batch]))
        correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    model.train()
    return correct / max(1, len(images))


def pretrain(*, classes: int, per_class: int, eval_per_class: int, epochs: int, steps: int | None,
             batch_size: int, lr: float, weight_decay: float, warmup: float, label_smoothing: float,
             drop_path: float, seed: int, threads: int, depth: int, dim: int, heads: int, patch_size: int,
             img_size: int, out: Path, quiet: bool = False, bf16: bool = True,
             attention: str = "auto") -> dict[str, Any]:
    """Render the fractal data, train, evaluate on fresh renders, write weights + card; returns the card."""
    check_options(**locals())  # before any rendering: the same checks as the command's
    from tqdm import tqdm

    t0 = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ifs = fractals.sample_ifs_classes(classes, seed)
    x_np, y_np = fractals.render_dataset(ifs, per_class, seed, size=img_size, split=0, progress=not quiet)
    xe_np, ye_np = fractals.render_dataset(ifs, eval_per_class, seed, size=img_size, split=1)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    xe, ye = torch.from_numpy(xe_np), torch.from_numpy(ye_np)
    render_s = time.time() - t0

    arch = dict(EMBEDDED_ARCH, img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth,
                num_heads=heads)
    model = build_embedded(arch, num_classes=classes, drop_path_rate=drop_path)
    attention = set_attention(model, attention, device="cpu", precision="bf16" if bf16 else "fp32")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = len(x) // batch_size
    total = steps_per_epoch * epochs
    warm = max(1, int(warmup * total))

    # Not engine.lr_at: the same schedule, but its cosine rounds differently (pi * (a / b) there, pi * a / b here),
    # which changes the lr in the last bit at 829 of the 3744 steps of the default recipe, and the shipped weights
    # and running pretrainings must stay reproducible by their card's command.
    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    gen = torch.Generator().manual_seed(seed)
    limit = total if steps is None else min(total, steps)
    bar = tqdm(total=limit, desc="pretrain", unit="step", disable=quiet)
    step, train_t0, seen = 0, time.time(), 0
    epoch_acc: list[float] = []
    for epoch in range(epochs):
        if step >= limit:
            break
        order = torch.randperm(len(x), generator=gen)
        correct = n = 0
        loss_ema = None
        for b in range(steps_per_epoch):
            if step >= limit:
                break
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = _normalise(x[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips: the only augmentation
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            yb = y[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            n += len(idx)
            loss_val = loss.item()
            loss_ema = loss_val if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_val
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_ema:.3f}", acc=f"{correct / n:.3f}",
                            img_s=f"{seen / (time.time() - train_t0):.0f}")
        epoch_acc.append(correct / max(1, n))
    bar.close()
    train_s = time.time() - train_t0
    heldout = _accuracy(model, xe, ye, bf16)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not _is_head(k)}
    atomic_save_file(state, out / WEIGHTS_FILE, {"format": "mlae-embedded-vit", "seed": str(seed)})
    command = (f"mlae pretrain --classes {classes} --per-class {per_class} --epochs {epochs} "
               f"--batch-size {batch_size} --lr {lr:g} --weight-decay {weight_decay:g} --seed {seed} --threads {threads} "
               f"--depth {depth} --dim {dim} --heads {heads} --patch-size {patch_size} --img-size {img_size}"
               + f" --precision {'bf16' if bf16 else 'fp32'}"
               + (f" --steps {steps}" if steps is not None else "") + f" --out {out}")
    card: dict[str, Any] = {
        "name": "mlae embedded ViT (FractalDB-style formula-driven pretraining)",
        "arch": arch,
        "input": {"size": img_size, "mean": list(EMBEDDED_MEAN), "std": list(EMBEDDED_STD),
                  "range": "RGB in [0, 1], then (x - mean) / std", "pool": "class token (timm default)"},
        "weights": {"file": WEIGHTS_FILE, "dtype": "float16", "head": "removed (reset to num_classes)",
                    "parameters": int(sum(v.numel() for v in state.values()))},
        "command": command,
        "seed": seed,
        "data": {"generator": "mlae.fractals (IFS, σ-factor sampling, 2–4 maps, min fill 10 %, 5 % jitter, "
                              "half greyscale / half one colour per map, horizontal flips)",
                 "classes": classes, "per_class": per_class, "train_images": int(len(x)),
                 "heldout_images": int(len(xe)), "render_seconds": round(render_s, 1)},
        "recipe": {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "schedule":
                   f"linear warmup {warmup:g} of steps, cosine to 0", "batch_size": batch_size,
                   "label_smoothing": label_smoothing, "drop_path": drop_path,
                   "precision": "bf16 autocast" if bf16 else "fp32", "threads": threads,
                   "attention": attention},
        "epochs": epochs,
        "steps": step,
        "steps_planned": total,
        "pretraining": {"train_top1_per_epoch": [round(a, 4) for a in epoch_acc],
                        "heldout_top1": round(heldout, 4),
                        "heldout": "fresh renders (different instance jitter) of the same classes"},
        "wall_time_seconds": {"render": round(render_s, 1), "train": round(train_s, 1),
                              "total": round(time.time() - t0, 1)},
        "images_per_second": round(seen / max(train_s, 1e-9), 1),
        "torch": torch.__version__,
        "evaluation": None,
    }
    atomic_write_text(out / CARD_FILE, json.dumps(card, indent=2, ensure_ascii=False))
    return card
