"""LoRA vs MLAE vs DMLoRA on a few suite tasks, then one multitask MoLE over the task LoRAs just trained.

Part 1 -- per task and method, one ``mlae train`` run (the embedded pretrained ViT, the CLI's defaults for each
method, ``--epochs 6 --lr 2e-3 --eval-every 6 --threads 1``, seed 0); top-1 on the test split after the last epoch.

Part 2 -- one MoLE model for all the tasks: the shared pretrained backbone (it is the same whatever the number of
classes), the tasks' LoRAs from part 1 as frozen experts (``mlae.mole_from_adapters``), the gates shared by the
tasks, one head per task (initialised from that task's LoRA head). Gates and heads train on the round-robin
mixture of the training sets (one batch of each task in turn, ``--mt-epochs`` passes), with the gating balance
loss (weight 0.01); every task is then evaluated with its own head. On the same footing:

* the arithmetic merge (``w_i = 1/N``) with the source heads, and with the heads retrained on the merged features
  for the same number of steps;
* each task's own LoRA (its part-1 run);
* the trained MoLE's mean gate weight of every expert on every task, and the trained MoLE restricted to one expert
  (``mlae.select_experts``, no retraining).

    python benchmarks/methods_demo.py                       # ~20 min of one CPU core
    python benchmarks/methods_demo.py --tasks digits,textures --epochs 2 --out runs/methods_demo_quick

Finished part-1 runs (``results.json`` present) are reused. Writes ``<out>/methods_demo.{json,md}`` and prints
the tables. One seed and short runs: the differences are indicative, not significant.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

METHODS = ["lora", "mlae", "dmlora"]
BATCH, BALANCE = 64, 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/methods_demo", help="folder of the runs and tables")
    p.add_argument("--tasks", default="digits,textures,clevr_dist", help="comma-separated suite task names")
    p.add_argument("--epochs", type=int, default=6, help="epochs of every part-1 run")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mt-epochs", type=int, default=3, help="passes over the round-robin mixture (part 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- part 1


def run_dir(out: Path, task: str, method: str) -> Path:
    return out / f"{task}_{method}"


def train_runs(args, tasks: list[str], out: Path) -> dict[str, dict[str, dict]]:
    from mlae.cli import main

    results: dict[str, dict[str, dict]] = {}
    for method in METHODS:
        for task in tasks:
            d = run_dir(out, task, method)
            if not (d / "results.json").exists():
                argv = ["train", "--dataset", f"suite:{task}", "--method", method, "--epochs", str(args.epochs),
                        "--lr", str(args.lr), "--eval-every", str(args.epochs), "--threads", str(args.threads),
                        "--seed", str(args.seed), "--out", str(d), "--quiet", "--overwrite"]
                print("mlae " + " ".join(argv), flush=True)
                code = main(argv)
                if code:
                    raise SystemExit(f"mlae train failed ({code}) for {task}/{method}")
            r = json.loads((d / "results.json").read_text())
            print(f"{task:>12} {method:>7}: top-1 {100 * r['top1']:.1f} %, {r['params']['trainable']:,} trainable, "
                  f"{r['wall_time_s']:.0f} s", flush=True)
            results.setdefault(task, {})[method] = r
    return results


# --------------------------------------------------------------------------------------------- part 2


class MultiHead(nn.Module):
    """A shared (adapted) backbone with one classifier head per task."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Linear]):
        super().__init__()
        self.model, self.heads = model, nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.model.forward_head(self.model.forward_features(x), pre_logits=True))


def source_head(path: Path) -> nn.Linear:
    """The classifier head a LoRA run trained (stored in its adapter file)."""
    with safe_open(str(path), "pt") as f:
        w, b = f.get_tensor("head.weight"), f.get_tensor("head.bias")
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head


def multitask(args, tasks: list[str], out: Path) -> dict:
    import mlae
    from mlae.adapters.mole import arithmetic_merge, from_adapters, select_experts
    from mlae.backbones import backbone_input_size
    from mlae.data import load_task
    from mlae.engine import EVAL_BATCH, Inputs, backbone_stats, lr_at
    from mlae.trained import build_backbone
    from mlae.hardware import autocast, resolve_precision

    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    precision = resolve_precision("auto", dev)
    experts = [run_dir(out, t, "lora") / "adapter.safetensors" for t in tasks]

    def backbone() -> nn.Module:
        # The pretrained backbone: identical whatever num_classes (only the unused head depends on it).
        return build_backbone(None, 10, args.seed, 0.1)

    probe = backbone()
    size = int(backbone_input_size(probe))
    stats = backbone_stats(None, probe)
    data = {t: load_task(f"suite:{t}", image_size=size, split="test", seed=args.seed) for t in tasks}
    inputs = {t: Inputs(data[t].augment, size, dev, *stats) for t in tasks}

    @torch.no_grad()
    def evaluate(net: MultiHead) -> dict[str, float]:
        net.eval()
        acc = {}
        for t in tasks:
            split, correct = data[t].eval, 0
            for s in range(0, len(split), EVAL_BATCH):
                with autocast(dev, precision):
                    logits = net(inputs[t](split.images[s:s + EVAL_BATCH], train=False), t)
                correct += int((logits.argmax(-1) == split.labels[s:s + EVAL_BATCH]).sum())
            acc[t] = correct / len(split)
        net.train()
        return acc

    def fit(net: MultiHead, params: list, balance: bool, label: str) -> None:
        """Round robin over the tasks: one batch of each in turn; linear warmup (one pass), then cosine."""
        torch.manual_seed(args.seed)  # drop-path
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
        steps = max(math.ceil(len(data[t].train) / BATCH) for t in tasks)
        total = args.mt_epochs * steps * len(tasks)
        g = torch.Generator().manual_seed(args.seed)
        net.train()
        step = 0
        for epoch in range(args.mt_epochs):
            orders = {t: torch.randperm(len(data[t].train), generator=g) for t in tasks}
            losses = []
            for i in range(steps):
                for t in tasks:
                    idx = orders[t][(i * BATCH) % len(data[t].train):][:BATCH]
                    x = inputs[t](data[t].train.images[idx], train=True, generator=g)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, total, steps * len(tasks), args.lr)
                    with autocast(dev, precision):
                        logits = net(x, t)
                    loss = F.cross_entropy(logits.float(), data[t].train.labels[idx])
                    if balance:
                        loss = loss + BALANCE * mlae.aux_losses(net)["balance"].float()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    step += 1
            print(f"  {label} pass {epoch + 1}/{args.mt_epochs}: mean loss {sum(losses) / len(losses):.3f}", flush=True)

    res: dict = {"experts": [str(e) for e in experts]}
    res["own LoRA"] = {t: json.loads((run_dir(out, t, "lora") / "results.json").read_text())["top1"] for t in tasks}

    t0 = time.time()
    arith = MultiHead(arithmetic_merge(backbone(), experts), {t: source_head(e) for t, e in zip(tasks, experts)})
    res["arithmetic merge, source heads"] = evaluate(arith)
    arith.requires_grad_(False)
    arith.heads.requires_grad_(True)
    fit(arith, list(arith.heads.parameters()), balance=False, label="arithmetic merge, heads")
    res["arithmetic merge, heads retrained"] = evaluate(arith)
    res["arithmetic merge time_s"] = time.time() - t0
    del arith

    t0 = time.time()
    mole = MultiHead(from_adapters(backbone(), experts, train_head=False),
                     {t: source_head(e) for t, e in zip(tasks, experts)})
    res["MoLE at init"] = evaluate(mole)
    mole.requires_grad_(False)
    gates = [p for n, p in mole.named_parameters() if "lora_gate" in n]
    for p in gates + list(mole.heads.parameters()):
        p.requires_grad_(True)
    res["MoLE trainable"] = sum(p.numel() for p in gates) + sum(p.numel() for p in mole.heads.parameters())
    fit(mole, gates + list(mole.heads.parameters()), balance=True, label="MoLE gates + heads")
    res["MoLE, gates + heads trained"] = evaluate(mole)
    res["MoLE time_s"] = time.time() - t0

    mole.eval()
    gate = {}
    with torch.no_grad():
        for t in tasks:  # mean gate weight of every expert, over gated layers and tokens of test images
            split = data[t].eval
            with autocast(dev, precision):
                mole(inputs[t](split.images[:EVAL_BATCH], train=False), t)
            q = torch.stack([layer.last_weights.float() for _, layer in mlae.adapter_layers(mole)]).mean(0)
            gate[t] = [round(v, 3) for v in q.tolist()]
    res["MoLE mean gate weights"] = gate
    res["MoLE, one expert"] = {}
    for i, t in enumerate(tasks):
        select_experts(mole, [i])
        res["MoLE, one expert"][t] = evaluate(mole)
    select_experts(mole, None)
    return res


# --------------------------------------------------------------------------------------------- tables


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def tables(tasks: list[str], single: dict, mt: dict) -> str:
    lines = ["| method | " + " | ".join(tasks) + " | mean | trainable params |",
             "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
    for m in METHODS:
        accs = [single[t][m]["top1"] for t in tasks]
        params = sorted({single[t][m]["params"]["trainable"] for t in tasks})
        span = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}"
        lines.append(f"| {m} | " + " | ".join(pct(a) for a in accs) + f" | {pct(sum(accs) / len(accs))} | {span} |")
    lines += ["", "| multitask (one model, one head per task) | " + " | ".join(tasks) + " | mean |",
              "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    rows = [("each task's own LoRA (one model per task)", mt["own LoRA"]),
            ("arithmetic merge, source heads", mt["arithmetic merge, source heads"]),
            ("arithmetic merge, heads retrained", mt["arithmetic merge, heads retrained"]),
            ("MoLE at init (= arithmetic merge)", mt["MoLE at init"]),
            ("MoLE, gates + heads trained", mt["MoLE, gates + heads trained"])]
    rows += [(f"trained MoLE, only expert {i} ({e})", mt["MoLE, one expert"][e]) for i, e in enumerate(tasks)]
    for label, accs in rows:
        vals = [accs[t] for t in tasks]
        lines.append(f"| {label} | " + " | ".join(pct(v) for v in vals) + f" | {pct(sum(vals) / len(vals))} |")
    lines += ["", "| trained MoLE, mean gate weight on the test images of | "
              + " | ".join(f"expert {i} ({e})" for i, e in enumerate(tasks)) + " |",
              "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{w:.3f}" for w in mt["MoLE mean gate weights"][t]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    single = train_runs(args, tasks, out)
    part1 = time.time() - start
    print(f"part 1 done in {part1:.0f} s; multitask MoLE next", flush=True)
    mt = multitask(args, tasks, out)
    total = time.time() - start
    record = {"args": vars(args), "tasks": tasks,
              "single": {t: {m: {"top1": r["top1"], "trainable": r["params"]["trainable"],
                                 "wall_time_s": r["wall_time_s"]} for m, r in single[t].items()} for t in tasks},
              "multitask": mt, "wall_time_s": {"part1_this_call": part1, "total_this_call": total}}
    (out / "methods_demo.json").write_text(json.dumps(record, indent=1) + "\n")
    md = tables(tasks, single, mt)
    (out / "methods_demo.md").write_text(md)
    print(md)
    print(f"wall time of this call: {total:.0f} s", flush=True)


if __name__ == "__main__":
    main()
