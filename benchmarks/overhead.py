"""Share of training wall time the engine spends outside forward / backward / optimizer step.

Runs the real training loop (`mlae.engine.train`) on a suite task and times, from the outside, every training
forward, backward, optimizer step (with zero_grad) and batch preparation. Whatever remains of the epoch's
training time is the engine's own overhead: indexing, the LR schedule, loss bookkeeping, the progress bar,
the NaN check. Evaluation is excluded (the engine times it apart).

    python benchmarks/overhead.py                         # embedded ViT, suite:digits, MLAE, one epoch
    python benchmarks/overhead.py --backbone vit_tiny_patch16_224 --no-pretrained --img-size 32 --patch-size 4
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict

import torch

import mlae.data
from mlae import engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="suite:digits")
    p.add_argument("--method", default="mlae")
    p.add_argument("--backbone", default=None, help="default: the embedded ViT")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto")
    args = p.parse_args()

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(name, fn, only_training=True):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if only_training and torch.is_inference_mode_enabled():
                return fn(*a, **kw)  # evaluation: not part of the training loop
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spent[name] += time.perf_counter() - t
            calls[name] += 1
            return out
        return wrapper

    build = engine.build_backbone

    def build_timed(*a, **kw):
        model = build(*a, **kw)
        model.forward = timed("forward", model.forward)
        return model

    engine.build_backbone = build_timed
    mlae.data.prepare_batch = timed("data prep", mlae.data.prepare_batch)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    for opt_method in ("step", "zero_grad"):
        setattr(torch.optim.AdamW, opt_method, timed("optimizer", getattr(torch.optim.AdamW, opt_method)))

    epochs = []
    with tempfile.TemporaryDirectory() as out:
        cfg = engine.TrainConfig(dataset=args.dataset, method=args.method, backbone=args.backbone,
                                 pretrained=args.pretrained, img_size=args.img_size, patch_size=args.patch_size,
                                 epochs=args.epochs, batch_size=args.batch_size, precision=args.precision,
                                 out=out + "/run", progress=True)
        engine.train(cfg, on_epoch_end=lambda epoch, m: epochs.append(m))

    train_time = sum(m["train_time_s"] for m in epochs)
    images = sum(m["images_per_s"] * m["train_time_s"] for m in epochs)
    core = spent["forward"] + spent["backward"] + spent["optimizer"]
    rest = train_time - core - spent["data prep"]
    print(f"\n{args.dataset} / {args.method}, {args.epochs} epoch(s), {calls['forward']} steps of batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads")
    print(f"  training loop wall time  {train_time:8.2f} s  ({images / train_time:.0f} img/s)")
    for name in ("forward", "backward", "optimizer"):
        print(f"  {name:<24} {spent[name]:8.2f} s  {100 * spent[name] / train_time:5.1f} %")
    print(f"  data prep                {spent['data prep']:8.2f} s  {100 * spent['data prep'] / train_time:5.1f} %"
          "  (prepare_batch, reported apart)")
    print(f"  engine overhead          {rest:8.2f} s  {100 * rest / train_time:5.1f} %"
          "  (everything else; target < 5 %)")
    print(f"  evaluation (excluded)    {sum(m['epoch_time_s'] for m in epochs) - train_time:8.2f} s")


if __name__ == "__main__":
    main()
