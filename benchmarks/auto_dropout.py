"""MLAE's learned masking probability (``dropout="auto"``): which estimator, measured small.

Part ``toy`` -- a teacher-student problem that needs regularisation, where a p sweep costs seconds. A frozen random
MLP (``DIM`` → 64 → 64 → ``CLASSES``, GELU) is the backbone; the teacher adds a random rank-2 update to both hidden
layers; labels are *sampled* from the teacher's softmax, so they are noisy and a memorising student loses on fresh
data (``--labels teacher`` instead takes the teacher's argmax: clean labels, where memorising is learning and
masking has nothing to correct). The student has MLAE (``EXPERTS`` rank-1 experts) on both hidden layers and the teacher's head, trains on
``n`` examples (full batch, Adam, ``--steps``) and is scored on 4,096 fresh examples (cross-entropy against the
teacher's probabilities, and top-1 against its argmax). Variants: p fixed at the paper's grid {0, .1, .3, .5, .7,
.9} (the sweep) and ``dropout="auto"`` with each learner; several training-set sizes, so one can see whether the
learned p follows the sweep's best p as n changes.

The ``heldout`` learner holds out ``HOLDOUT`` (20 %) of the ``n`` examples (seeded) for its controller and trains
on the rest; every ``CONTROL_EVERY`` steps (the toy's stand-in for the engine's epoch) it measures the eval-mode
cross-entropy on as many training examples and on the held-out ones and moves p
(:class:`mlae.adapters.mlae.DropoutController`). The grid and the other learners train on all ``n`` examples: a
handicap for ``heldout``, which sees 80 % of the labels.

Part ``suite`` -- ``mlae train --dropout auto`` with each learner on one suite task for a few epochs (train800 /
val200), to see p move on the real backbone. Far too short to rank anything; it shows the dynamics.

    python benchmarks/auto_dropout.py toy --sizes 64,512 --seeds 0,1,2 --out runs/auto_dropout
    python benchmarks/auto_dropout.py toy --labels teacher --variants 0,0.1,0.3,0.5,0.7,0.9,heldout   # clean labels
    python benchmarks/auto_dropout.py suite --task dsprites_loc --epochs 3 --out runs/auto_dropout

Writes ``<out>/toy.json`` / ``<out>/suite.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mlae

DIM, HIDDEN, CLASSES, EXPERTS, TEST = 16, 64, 10, 8, 4096
HEAD_GAIN, UPDATE = 30.0, 0.5  # head scale; teacher update norm relative to the layer's weights
GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
LEARNERS = ("concrete", "variational")
HELDOUT = "heldout"
AUTO_VARIANTS = (*LEARNERS, *(f"{learner}/expert" for learner in LEARNERS), HELDOUT)  # "/expert": one p per expert
HOLDOUT, CONTROL_EVERY = 0.2, 10  # heldout: the fraction of n held out; steps between controller updates


def backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                        nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        net[4].weight *= HEAD_GAIN  # logits of std ~2.5: the teacher's labels are noisy, not uniform
    return net


def teacher(seed: int) -> nn.Module:
    """The backbone plus a rank-2 update of each hidden layer, of norm UPDATE × the layer's weights'."""
    net = backbone(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            out, inp = layer.weight.shape
            update = torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)
            layer.weight += UPDATE * update * layer.weight.norm() / update.norm()
    return net.requires_grad_(False)


def student(seed: int, variant) -> nn.Module:
    if variant in GRID:
        options = {"dropout": variant}
    else:
        learner, _, per = variant.partition("/")
        options = {"dropout": "auto", "dropout_learner": learner, "dropout_per_expert": per == "expert"}
    return mlae.apply(backbone(seed), mlae.MLAEConfig(experts=EXPERTS, target_modules=["0", "2"], train_head=False,
                                                      **options))


def run(n: int, seed: int, variant, steps: int, lr: float, labels: str = "sampled") -> dict:
    from mlae.adapters.mlae import DropoutController

    t0 = time.perf_counter()
    net = teacher(seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    x, x_test = torch.randn(n, DIM, generator=g), torch.randn(TEST, DIM, generator=g)
    y = torch.multinomial(F.softmax(net(x), -1), 1, generator=g).squeeze(1)
    if labels == "teacher":  # clean labels: memorising them is learning the teacher, nothing to regularise
        y = net(x).argmax(-1)
    target = F.softmax(net(x_test), -1)
    model = student(seed, variant)
    controller = history = None
    if variant == HELDOUT:  # hold out 20 % of the n examples; train on the rest
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(30_000 + seed))
        held = perm[:max(1, round(HOLDOUT * n))]
        x_held, y_held, x, y = x[held], y[held], x[perm[len(held):]], y[perm[len(held):]]
        x_probe, y_probe = x[:len(held)], y[:len(held)]  # a fixed subset of the trained examples, as many
        controller, history = DropoutController(model), []
    mlae.set_train_size(model, len(x))
    torch.manual_seed(seed)  # the masks
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = F.cross_entropy(model(x), y) + sum(mlae.aux_losses(model).values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if controller is not None and (step + 1) % CONTROL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                controller.update(F.cross_entropy(model(x_probe), y_probe).item(),
                                  F.cross_entropy(model(x_held), y_held).item())
            history.append(controller.p)
            model.train()
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        train_nll = F.cross_entropy(model(x), y).item()
    learned = [torch.tensor(v["dropout"]).mean().item() for v in mlae.learned_values(model).values()]
    return {"n": n, "seed": seed, "variant": str(variant), "train_nll": train_nll,
            "test_nll": -(target * F.log_softmax(logits, -1)).sum(-1).mean().item(),
            "test_top1": (logits.argmax(-1) == target.argmax(-1)).float().mean().item(),
            "p": learned or [variant] * 2,  # per layer (mean over experts)
            "trained_on": len(x), **({"p_history": history} if history is not None else {}),
            "seconds": time.perf_counter() - t0}


def toy(args) -> list[dict]:
    rows = []
    variants = [*GRID, *AUTO_VARIANTS]
    if args.variants:
        wanted = args.variants.split(",")
        variants = [v for v in variants if str(v) in wanted or (isinstance(v, float) and f"{v:g}" in wanted)]
    for n in map(int, args.sizes.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for v in variants:
                rows.append({**run(n, seed, v, args.steps, args.lr, args.labels), "labels": args.labels})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def toy_table(rows: list[dict]) -> str:
    def mean(xs):
        return sum(xs) / len(xs)

    lines = ["| n | variant | train NLL | test NLL | test top-1 | p (layer 0, layer 2) |",
             "|---|---|---:|---:|---:|---|"]
    for n in sorted({r["n"] for r in rows}):
        for v in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["n"] == n and r["variant"] == v]
            p = [mean([r["p"][i] for r in sel]) for i in range(2)]
            lines.append(f"| {n} | {v} | {mean([r['train_nll'] for r in sel]):.3f} | "
                         f"{mean([r['test_nll'] for r in sel]):.4f} | {mean([r['test_top1'] for r in sel]):.3f} | "
                         f"{p[0]:.2f}, {p[1]:.2f} |")
    return "\n".join(lines)


def suite(args) -> list[dict]:
    from mlae.cli import main

    rows = []
    for learner in (*LEARNERS, HELDOUT):
        out = Path(args.out) / f"suite_{args.task}_{learner}"
        if not (out / "results.json").exists():
            argv = ["train", "--dataset", f"suite:{args.task}", "--split", "val", "--method", "mlae", "--dropout",
                    "auto", "--dropout-learner", learner, "--epochs", str(args.epochs), "--lr", str(args.lr),
                    "--threads", str(args.threads), "--quiet", "--overwrite", "--out", str(out)]
            assert main(argv) == 0, argv
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows.append({"learner": learner, "val_top1": [m["val_top1"] for m in metrics],
                     "train_loss": [m["train_loss"] for m in metrics],
                     "p": [m["learned"] for m in metrics]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["toy", "suite"])
    p.add_argument("--out", default="runs/auto_dropout")
    p.add_argument("--sizes", default="64,512", help="toy: training-set sizes")
    p.add_argument("--seeds", default="0,1,2", help="toy: seeds")
    p.add_argument("--steps", type=int, default=300, help="toy: full-batch Adam steps")
    p.add_argument("--labels", choices=["sampled", "teacher"], default="sampled",
                   help="toy: labels sampled from the teacher's softmax (noisy: memorising them overfits), or its "
                        "argmax (clean: a student that memorises them learns the teacher)")
    p.add_argument("--variants", default=None, help="toy: a comma-separated subset, e.g. 0,0.5,0.9,heldout")
    p.add_argument("--lr", type=float, default=None, help="learning rate (toy 3e-3, suite 2e-3)")
    p.add_argument("--task", default="dsprites_loc", help="suite: the task")
    p.add_argument("--epochs", type=int, default=3, help="suite: epochs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "toy":
        args.lr = args.lr or 3e-3
        rows = toy(args)
        (out / f"toy{'' if args.labels == 'sampled' else '_' + args.labels}.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(toy_table(rows))
        print(f"\n{HELDOUT}: trains on {100 - 100 * HOLDOUT:.0f} % of n (the other {100 * HOLDOUT:.0f} % are its "
              f"controller's held-out set, p updated every {CONTROL_EVERY} steps); the fixed-p grid and the other "
              "learners train on all n examples, a handicap for heldout")
    else:
        args.lr = args.lr or 2e-3
        (out / "suite.json").write_text(json.dumps(suite(args), indent=1) + "\n")


if __name__ == "__main__":
    main()
