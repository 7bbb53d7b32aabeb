"""Does the embedded fractal-pretrained ViT beat the same architecture randomly initialised?

For every task of the embedded suite (800 train + 200 val images for training, >= 1000 test, 32×32) and both
initialisations (the shipped weights vs random, same architecture, same inputs, same budget):

* **linear probe** — the backbone frozen in eval mode; the pooled feature the classifier head reads
  (``forward_head(..., pre_logits=True)``: the class token, the ViT default) extracted once; a multinomial
  logistic regression trained on it (features standardised on the training set, L2 strength picked on a
  20 % hold-out of the training images from a fixed grid, then refit on all of them). ``--probe cli`` runs
  ``mlae train --method linear`` instead (the head trained by SGD inside the fine-tuning loop: much slower).
* **MLAE** — ``mlae train --method mlae --backbone embedded [--no-pretrained] --epochs N`` with the CLI's
  defaults otherwise (8 rank-1 experts on ``attn.qkv``, AdamW 5e-4, cosine); top-1 of the last epoch.

    python benchmarks/embedded_backbone.py --epochs 5 --out runs/embedded_backbone
    python benchmarks/embedded_backbone.py --tasks digits,textures --methods linear   # quick look
    python benchmarks/embedded_backbone.py --inits random   # the random-init half first (no weights needed)

Prints a Markdown table, writes ``<out>/embedded_backbone.{md,json}``; ``--update-card`` also stores the
result in the backbone's card (``embedded_vit.json`` in its folder).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlae.files import atomic_write_text

TASKS = ["digits", "dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist", "smallnorb_azi",
         "smallnorb_ele", "textures"]
INITS = ["pretrained", "random"]


@torch.inference_mode()
def features(model, split, inputs, batch: int = 250) -> torch.Tensor:
    out = []
    for i in range(0, len(split), batch):
        x = inputs(split.images[i:i + batch], train=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        out.append(f.float())
    return torch.cat(out)


def logistic_regression(xtr, ytr, num_classes: int, l2: float, steps: int = 100) -> torch.nn.Linear:
    torch.manual_seed(0)
    clf = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(xtr), ytr) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def top1(clf, x, y) -> float:
    with torch.no_grad():
        return float((clf(x).argmax(-1) == y).float().mean())


def linear_probe(task_name: str, init: str, backbone: str, seed: int = 0) -> float:
    from mlae.backbones import create_backbone
    from mlae.data import load_task
    from mlae.engine import Inputs, backbone_stats

    task = load_task(f"suite:{task_name}", seed=seed)
    torch.manual_seed(seed)  # the random-init backbone must be the same one on every run
    model = create_backbone(backbone, num_classes=task.num_classes, pretrained=init == "pretrained",
                            drop_path_rate=0.0).eval()
    mean, std = backbone_stats(backbone, model)
    inputs = Inputs(augment=task.augment, image_size=task.image_size, device=torch.device("cpu"), mean=mean,
                    std=std)
    xtr, ytr = features(model, task.train, inputs), task.train.labels
    xte, yte = features(model, task.eval, inputs), task.eval.labels
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(ytr))
    fit, hold = perm[:cut], perm[cut:]
    grid = [1e-4, 1e-3, 1e-2]
    scores = [top1(logistic_regression(xtr[fit], ytr[fit], task.num_classes, l2), xtr[hold], ytr[hold])
              for l2 in grid]
    best = grid[int(np.argmax(scores))]
    return top1(logistic_regression(xtr, ytr, task.num_classes, best), xte, yte)


def cli_run(task_name: str, method: str, init: str, epochs: int, out: Path, workers: int | None,
            lr: float | None, backbone: str) -> float:
    run = out / "runs" / f"{task_name}_{method}_{init}"
    cmd = [sys.executable, "-m", "mlae", "train", "--dataset", f"suite:{task_name}", "--method", method,
           "--backbone", backbone, "--epochs", str(epochs), "--eval-every", str(epochs), "--out", str(run),
           "--overwrite", "--quiet"]
    if init == "random":
        cmd.append("--no-pretrained")
    if workers:
        cmd += ["--threads", str(workers)]
    if lr:
        cmd += ["--lr", str(lr)]
    subprocess.run(cmd, check=True)
    return float(json.loads((run / "results.json").read_text())["test_top1"])


def table(results: dict, methods: list[str], tasks: list[str]) -> str:
    names = {"linear": "linear probe", "mlae": "MLAE"}
    head = "| task | " + " | ".join(f"{names[m]} {i}" for m in methods for i in ("pretrained", "random", "Δ")) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(methods))]
    for t in tasks + ["**average**"]:
        cells = []
        for m in methods:
            if t == "**average**":
                p = np.mean([results[m][x]["pretrained"] for x in tasks])
                r = np.mean([results[m][x]["random"] for x in tasks])
            else:
                p, r = results[m][t]["pretrained"], results[m][t]["random"]
            cells += [f"{100 * p:.1f}", f"{100 * r:.1f}", f"{100 * (p - r):+.1f}"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated suite tasks")
    ap.add_argument("--methods", default="linear,mlae", help="comma-separated: linear, mlae")
    ap.add_argument("--probe", choices=["features", "cli"], default="features",
                    help="linear probe protocol (see the module docstring)")
    ap.add_argument("--epochs", type=int, default=5, help="mlae train epochs (and --probe cli epochs)")
    ap.add_argument("--lr", type=float, default=None, help="mlae train learning rate (default: the CLI's)")
    ap.add_argument("--threads", "--workers", dest="workers", type=int, default=None, help="torch threads (passed to mlae train)")
    ap.add_argument("--backbone", default="embedded", help="an embedded version (embedded, embedded-v2, ...) or "
                    "a folder written by `mlae pretrain`: compare two backbones by running this once for each")
    ap.add_argument("--out", type=Path, default=Path("runs/embedded_backbone"))
    ap.add_argument("--inits", default=",".join(INITS), help="comma-separated: pretrained, random (a partial "
                    "run; results accumulate in <out>/embedded_backbone.partial.json)")
    ap.add_argument("--update-card", action="store_true", help="store the table in the embedded card")
    args = ap.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    if args.workers:
        torch.set_num_threads(args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "embedded_backbone.partial.json"
    results = json.loads(partial.read_text()) if partial.exists() else {}
    timing = results.pop("_seconds", {})
    for m in methods:
        for t in tasks:
            for init in args.inits.split(","):
                if init in results.get(m, {}).get(t, {}):
                    continue  # resume: cells already measured
                t0 = time.time()
                if m == "linear" and args.probe == "features":
                    acc = linear_probe(t, init, args.backbone)
                else:
                    acc = cli_run(t, m, init, args.epochs, args.out, args.workers, args.lr, args.backbone)
                results.setdefault(m, {}).setdefault(t, {})[init] = acc
                timing[f"{m}/{t}/{init}"] = round(time.time() - t0, 1)
                print(f"{m:6s} {t:14s} {init:10s} top-1 {acc:.4f}  ({time.time() - t0:.0f} s)", flush=True)
                partial.write_text(json.dumps({**results, "_seconds": timing}, indent=1))
    if any(i not in results.get(m, {}).get(t, {}) for m in methods for t in tasks for i in INITS):
        return 0  # a partial run: the table needs both initialisations
    md = table(results, methods, tasks)
    command = "python benchmarks/embedded_backbone.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(md)
    report = {"command": command, "backbone": args.backbone, "tasks": tasks, "methods": methods, "probe": args.probe,
              "mlae_epochs": args.epochs, "mlae_lr": args.lr, "results": results, "seconds": timing,
              "averages": {m: {i: float(np.mean([results[m][t][i] for t in tasks])) for i in INITS}
                           for m in methods}}
    (args.out / "embedded_backbone.md").write_text(md + "\n")
    (args.out / "embedded_backbone.json").write_text(json.dumps(report, indent=1))
    if args.update_card:
        from mlae.backbones import CARD_FILE, DEFAULT_EMBEDDED, card_folder

        path = (card_folder(args.backbone) or card_folder(DEFAULT_EMBEDDED)) / CARD_FILE  # the card of that backbone
        card = json.loads(path.read_text())
        card["evaluation"] = {**report, "table": md}
        atomic_write_text(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
