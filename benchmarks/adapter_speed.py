"""Training step time and memory of MLAE vs our LoRA vs HF PEFT LoRA (same rank), and merged-MLAE inference
vs the plain backbone. Prints measured ratios; nothing is asserted.

    .venv/bin/python benchmarks/adapter_speed.py              # ViT-Ti/S at 32x32 (patch 4) and 224, fp32 and bf16
    .venv/bin/python benchmarks/adapter_speed.py --quick      # 32x32 only

Timing: the methods are timed in interleaved rounds (one step each per round) and the median per method is
kept, so that load from other processes hits all of them alike. Memory: on CUDA the peak allocated memory of
a step; on CPU (no allocator statistics) the bytes of the tensors autograd saves for backward plus gradients
and AdamW state, which is what differs between methods.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import timm
import torch
from torch import nn

import mlae

MODELS = {  # name -> (timm name, img size, patch size)
    "ViT-Ti/4@32": ("vit_tiny_patch16_224", 32, 4),
    "ViT-S/4@32": ("vit_small_patch16_224", 32, 4),
    "ViT-Ti/16@224": ("vit_tiny_patch16_224", 224, 16),
    "ViT-S/16@224": ("vit_small_patch16_224", 224, 16),
    "ViT-B/16@224": ("vit_base_patch16_224", 224, 16),  # the paper's backbone: by default on CUDA only
}
CPU_DEFAULT = [m for m in MODELS if not m.startswith("ViT-B")]  # ViT-B at 224 px takes minutes per step here


ATTENTION = "auto"  # --attention: the path mlae train would take (set_attention), the same for every method


def build(method: str, timm_name: str, img: int, patch: int, device, dtype: str) -> nn.Module:
    from mlae.attention import set_attention

    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, img_size=img, patch_size=patch, num_classes=100)
    if method == "mlae":  # 8 rank-1 experts = rank 8, stochastic masking on
        mlae.apply(model, mlae.MLAEConfig(experts=8, dropout=0.5))
    elif method == "lora":
        mlae.apply(model, mlae.LoRAConfig(rank=8, alpha=8))
    elif method == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    elif method != "plain":
        raise ValueError(method)
    set_attention(model, ATTENTION, device=device, precision=dtype)
    return model.to(device)


class SavedBytes:
    """Counts the bytes autograd saves for backward (activation memory) while active."""

    def __init__(self):
        self.total = 0

    def pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def train_step(model, opt, x, y, dtype, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_training(cfg, methods, dtype, batch, rounds, device):
    timm_name, img, patch = MODELS[cfg]
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    runs = {}
    for m in methods:
        model = build(m, timm_name, img, patch, device, dtype).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        train_step(model, opt, x, y, dtype, device)  # warm-up; creates optimizer state
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(model, opt, x, y, dtype, device)
            mem = torch.cuda.max_memory_allocated()
        else:
            with SavedBytes() as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.zero_grad(set_to_none=True)
            state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if torch.is_tensor(t))
            mem = saved.total + state + sum(p.numel() * p.element_size() for p in params)  # + grads
        runs[m] = {"model": model, "opt": opt, "times": [], "mem": mem}
    for _ in range(rounds):
        for m in methods:
            r = runs[m]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(r["model"], r["opt"], x, y, dtype, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            r["times"].append(time.perf_counter() - t0)
    return {m: (statistics.median(r["times"]), r["mem"]) for m, r in runs.items()}


@torch.no_grad()
def measure_inference(cfg, dtype, batch, rounds, device):
    timm_name, img, patch = MODELS[cfg]
    x = torch.randn(batch, 3, img, img, device=device)
    plain = build("plain", timm_name, img, patch, device, dtype).eval()
    merged = mlae.merge(build("mlae", timm_name, img, patch, device, dtype), keep_original=False).eval()
    times = {"plain": [], "merged": []}
    for model in (plain, merged):  # warm-up
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(x)
    for _ in range(rounds):
        for name, model in (("plain", plain), ("merged", merged)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["plain"]), statistics.median(times["merged"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                    help="default: all on CUDA, all but ViT-B on a CPU")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per method (default: 15 at 32px, 5 at 224)")
    ap.add_argument("--quick", action="store_true", help="32x32 models only")
    ap.add_argument("--attention", choices=["auto", "fused", "math"], default="auto",
                    help="attention path of every model (auto: as mlae train picks it)")
    args = ap.parse_args()
    global ATTENTION
    ATTENTION = args.attention
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = args.models or (list(MODELS) if device.type == "cuda" else CPU_DEFAULT)
    models = [m for m in chosen if not (args.quick and "@224" in m)]
    methods = ["mlae", "lora"] + (["peft"] if importlib.util.find_spec("peft") else [])
    if "peft" not in methods:
        print("peft is not installed: the PEFT LoRA column is left empty")
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} attention={args.attention} "
          f"torch={torch.__version__}")
    print("| model | precision | MLAE step (ms) | LoRA step | PEFT LoRA step | MLAE/LoRA | MLAE/PEFT | "
          "merged/plain inference speed | memory MLAE/LoRA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg in models:
        rounds = args.rounds or (15 if "@32" in cfg else 5)
        for dtype in args.precisions:
            r = measure_training(cfg, methods, dtype, args.batch, rounds, device)
            t_plain, t_merged = measure_inference(cfg, dtype, args.batch, 3 * rounds, device)
            (tm, mm), (tl, ml) = r["mlae"], r["lora"]
            tp = r["peft"][0] if "peft" in r else None
            peft = (f"{tp*1e3:.0f} | {tm/tp:.3f}" if tp else "– | –").split(" | ")
            print(f"| {cfg} | {dtype} | {tm*1e3:.0f} | {tl*1e3:.0f} | {peft[0]} | {tm/tl:.3f} | {peft[1]} | "
                  f"{t_plain/t_merged:.3f} | {mm/ml:.3f} |", flush=True)


if __name__ == "__main__":
    main()
