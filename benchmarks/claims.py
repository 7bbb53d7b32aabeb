"""Verdicts on the MLAE paper's claims from an `mlae compare` folder (used for docs/REPRODUCTION.md).

    python benchmarks/claims.py runs/repro            # prints the Markdown table

Each claim compares two method labels of the compare run (mean ± std over seeds of last-epoch test top-1).
Verdict: "holds" when the mean difference in the claimed direction exceeds twice its standard error
(Welch, seeds independent), "does not hold" when it goes the other way by as much, else "within noise".
Claim 5 (expert similarity) is measured on the saved adapters with `mlae.expert_similarity`.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import mlae
from mlae.engine import load_trained

CLAIMS = [  # (claim, better label, worse label)
    ("1. MLAE beats LoRA at the same budget", "mlae", "lora"),
    ("2a. expert masking beats no masking", "mlae", "mlae-p0"),
    ("2b. expert masking beats input dropout (LoRA+Dropout)", "mlae", "lora-dropout"),
    ("3. adaptive coefficients help", "mlae", "mlae-frozen-c"),
    ("4a. stochastic uniform beats fixed (incremental)", "mlae", "fixed-incremental"),
    ("4b. stochastic uniform beats fixed (protruding)", "mlae", "fixed-protruding"),
    ("4c. stochastic uniform beats mixed (hourglass)", "mlae", "mixed-hourglass"),
    ("6a. rank-1 experts beat rank-2 at equal budget (8×1 vs 4×2)", "mlae", "mlae-4x2"),
    ("6b. rank-1 experts beat rank-4 at equal budget (8×1 vs 2×4)", "mlae", "mlae-2x4"),
]
SIMILARITY = ("5. MLAE's experts are less similar than LoRA's rank-1 components", "mlae", "lora")


def verdict(better: list[float], worse: list[float]) -> tuple[float, str]:
    diff = mean(better) - mean(worse)
    se = math.sqrt(stdev(better) ** 2 / len(better) + stdev(worse) ** 2 / len(worse))
    if diff > 2 * se:
        return diff, "holds"
    if diff < -2 * se:
        return diff, "does not hold"
    return diff, "within noise"


def fmt(values: list[float], digits: int = 1) -> str:
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir", type=Path)
    args = ap.parse_args()
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)
    with open(args.compare_dir / "results.csv") as f:
        for row in csv.DictReader(f):
            acc[row["method"], row["dataset"]].append(float(row["top1"]))
            folders[row["method"], row["dataset"]].append(row["out"])
    datasets = sorted({d for _, d in acc})
    print("| claim | dataset | claimed better | claimed worse | difference | verdict |")
    print("|---|---|---|---|---|---|")
    for dataset in datasets:
        for claim, a, b in CLAIMS:
            if (a, dataset) in acc and (b, dataset) in acc:
                diff, v = verdict(acc[a, dataset], acc[b, dataset])
                print(f"| {claim} | {dataset} | {a} {fmt(acc[a, dataset])} | {b} {fmt(acc[b, dataset])} | "
                      f"{diff:+.1f} | {v} |")
        claim, a, b = SIMILARITY
        sims = {}
        for label in (a, b):
            sims[label] = [mlae.expert_similarity(load_trained(Path(o) / "adapter.safetensors")[0])
                           for o in folders.get((label, dataset), [])]
        if sims[a] and sims[b]:
            # Lower similarity is the claim, so "better" is the negated similarity.
            diff, v = verdict([-s for s in sims[a]], [-s for s in sims[b]])
            print(f"| {claim} | {dataset} | {a} cos {fmt(sims[a], 3)} | {b} cos {fmt(sims[b], 3)} | "
                  f"{-diff:+.3f} | {v} |")


if __name__ == "__main__":
    main()
