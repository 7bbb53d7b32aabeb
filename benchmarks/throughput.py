"""How close an MLAE training step comes to what this machine can do, and where the rest of the time goes.

    .venv/bin/python benchmarks/throughput.py                      # embedded ViT, batch 64, 1 thread
    .venv/bin/python benchmarks/throughput.py --threads 2 --no-compile

Prints, from one run:
- FLOPs per image of one training step (forward + backward, ``torch.utils.flop_counter``);
- the GEMM limit: every matrix product the step runs (recorded with its shapes and dtype), timed alone, back to
  back, on this machine. Their FLOPs over that time is the achievable GEMM rate on the model's own shapes, and
  their summed time is the step time a perfectly GEMM-bound step would take;
- the achieved FLOP/s of the step and its fraction of that GEMM rate;
- the step time of eager + fused attention (timm's default), eager + the path ``--attention auto`` picks, and
  ``torch.compile`` of the latter, timed in interleaved rounds (medians), plus the loss of the first steps of
  both eager paths from the same initialisation (same loss curve);
- the top operators of a ``torch.profiler`` profile of the chosen path.
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mlae
from mlae.attention import set_attention
from mlae.backbones import create_backbone
from mlae.hardware import autocast, resolve_precision

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


class RecordMatmuls(TorchDispatchMode):
    """Records (op, input shapes, dtype) of every matrix product dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            mats = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls[(func, tuple(tuple(m.shape) for m in mats), mats[-1].dtype)] += 1
        return func(*args, **(kwargs or {}))


BACKBONE = None  # the default embedded version; --backbone names another


def build(attention: str, precision: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_backbone(BACKBONE, num_classes=10)
    mlae.apply(model, mlae.MLAEConfig(experts=8, dropout=0.5))
    set_attention(model, attention, device="cpu", precision=precision)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def step_fn(model, opt, precision: str):
    device = torch.device("cpu")

    def step(x, y):
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def gemm_limit(calls: Counter, repeats: int = 3) -> tuple[float, float]:
    """(FLOPs, seconds) of the recorded matrix products, each shape timed alone (median of ``repeats``)."""
    flops = seconds = 0.0
    for (func, shapes, dtype), count in calls.items():
        mats = [torch.randn(s, dtype=dtype) for s in shapes]
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            a, b = mats
            op = lambda: func(a, b)  # noqa: E731
            m, k = a.shape[-2:]
            n = b.shape[-1]
            batch = a.shape[0] if a.dim() == 3 else 1
        else:
            bias, a, b = mats
            op = lambda: func(bias, a, b)  # noqa: E731
            m, k = a.shape[-2:]
            n = b.shape[-1]
            batch = a.shape[0] if a.dim() == 3 else 1
        op()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        flops += count * 2.0 * batch * m * n * k
        seconds += count * statistics.median(times)
    return flops, seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (one step per path each)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (slow to build)")
    ap.add_argument("--backbone", default=None, help="an embedded version (embedded-v2, ...) or a `mlae pretrain` "
                    "folder (default: the default embedded backbone)")
    args = ap.parse_args(argv)
    global BACKBONE
    BACKBONE = args.backbone
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    chosen = set_attention(build("auto", precision)[0], "auto", device="cpu", precision=precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    print(f"{args.backbone or 'embedded'} ViT + MLAE (8 rank-1 experts on qkv, p = 0.5), batch {args.batch_size}, {args.threads} "
          f"thread(s), {precision}; --attention auto picks '{chosen}' here")

    # Counted on the math path, where attention is ordinary matrix products too (the fused kernel hides them).
    model, opt = build("math", precision)
    step = step_fn(model, opt, precision)
    step(x, y)
    with FlopCounterMode(display=False) as counter:
        step(x, y)
    flops = counter.get_total_flops()
    with RecordMatmuls() as rec:
        step(x, y)
    gemm_flops, gemm_s = gemm_limit(rec.calls)
    print(f"FLOPs per image (training step): {flops / args.batch_size / 1e6:.0f} MFLOP, of which matrix products "
          f"{gemm_flops / args.batch_size / 1e6:.0f} MFLOP in {sum(rec.calls.values())} calls of {len(rec.calls)} "
          f"shapes")
    print(f"GEMM limit on these shapes: {gemm_flops / gemm_s / 1e9:.1f} GFLOP/s, i.e. {1e3 * gemm_s:.0f} ms per step")

    tag = {p: " (auto)" if p == chosen else "" for p in ("fused", "math")}
    paths = {f"eager, fused attention{tag['fused']}": step_fn(*build("fused", precision), precision),
             f"eager, math attention{tag['math']}": step}
    if args.compile:
        m2, o2 = build(chosen, precision)
        compiled = torch.compile(m2)
        inner = step_fn(compiled, o2, precision)
        t0 = time.perf_counter()
        inner(x, y)
        inner(x, y)
        print(f"torch.compile: built in {time.perf_counter() - t0:.0f} s")
        paths[f"torch.compile, {chosen} attention"] = inner
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(times.values())))
    print("\n| path | step (ms) | img/s | vs eager fused | achieved GFLOP/s | of GEMM limit |\n|---|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {1e3 * t:.0f} | {args.batch_size / t:.0f} | {base / t:.2f}x | {flops / t / 1e9:.1f} | "
              f"{100 * gemm_s / t:.0f} % |")

    losses = {}
    for path in ("fused", "math"):
        m, o = build(path, precision, seed=1)
        fn = step_fn(m, o, precision)
        torch.manual_seed(5)  # the same expert masks and drop-path draws for both paths
        losses[path] = [float(fn(x, y)) for _ in range(5)]
    diff = max(abs(a - b) for a, b in zip(losses["fused"], losses["math"]))
    print(f"\nloss of 5 steps from one init, fused: {[round(v, 4) for v in losses['fused']]}; math: "
          f"{[round(v, 4) for v in losses['math']]} (max difference {diff:.2g})")

    from torch.profiler import ProfilerActivity, profile

    profiled = paths[next(name for name in paths if "(auto)" in name)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            profiled(x, y)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\ntop operators ({chosen} attention), share of self CPU time:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f} %  {e.key}")


if __name__ == "__main__":
    main()
