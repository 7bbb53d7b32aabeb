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


def welch(better: list[float], worse: list[float]) -> tuple[float, float]:
    """Mean difference in the claimed direction and its standard error (seeds independent)."""
    diff = mean(better) - mean(worse)
    return diff, math.sqrt(stdev(better) ** 2 / len(better) + stdev(worse) ** 2 / len(worse))


def call(diff: float, se: float) -> str:
    if diff > 2 * se:
        return "holds"
    if diff < -2 * se:
        return "does not hold"
    return "within noise"


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
    # per claim and dataset: (difference, its standard error); the pooled row averages the per-dataset
    # differences (each dataset weighs the same) with SE = sqrt(sum SE_d^2) / D
    cells: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    print("| claim | dataset | claimed better | claimed worse | difference | verdict |")
    print("|---|---|---|---|---|---|")
    for dataset in datasets:
        for claim, a, b in CLAIMS:
            if (a, dataset) in acc and (b, dataset) in acc:
                diff, se = welch(acc[a, dataset], acc[b, dataset])
                cells[claim][dataset] = (diff, se)
                print(f"| {claim} | {dataset} | {a} {fmt(acc[a, dataset])} | {b} {fmt(acc[b, dataset])} | "
                      f"{diff:+.1f} | {call(diff, se)} |")
        claim, a, b = SIMILARITY
        sims = {}
        for label in (a, b):
            sims[label] = [mlae.expert_similarity(load_trained(Path(o) / "adapter.safetensors")[0])
                           for o in folders.get((label, dataset), [])]
        if sims[a] and sims[b]:
            # Lower similarity is the claim, so "better" is the negated similarity.
            diff, se = welch([-s for s in sims[a]], [-s for s in sims[b]])
            cells[claim][dataset] = (diff, se)
            print(f"| {claim} | {dataset} | {a} cos {fmt(sims[a], 3)} | {b} cos {fmt(sims[b], 3)} | "
                  f"{-diff:+.3f} | {call(diff, se)} |")
    if len(datasets) < 2:
        return
    print()
    print("| claim | " + " | ".join(datasets) + " | all datasets (mean difference ± SE) | verdict |")
    print("|---|" + "---|" * (len(datasets) + 2))
    for claim in [c for c, _, _ in CLAIMS[:7]] + [SIMILARITY[0]] + [c for c, _, _ in CLAIMS[7:]]:
        row = cells.get(claim, {})
        if not row:
            continue
        # similarity: show the change in cosine itself (negative is the claim), to 3 decimals
        scale, digits = (-1.0, 3) if claim == SIMILARITY[0] else (1.0, 1)
        per = [f"{scale * row[d][0]:+.{digits}f} ({call(*row[d])})" if d in row else "–" for d in datasets]
        diffs = [row[d] for d in datasets if d in row]
        pooled = mean(d for d, _ in diffs), math.sqrt(sum(se ** 2 for _, se in diffs)) / len(diffs)
        print(f"| {claim} | " + " | ".join(per) +
              f" | {scale * pooled[0]:+.{digits}f} ± {pooled[1]:.{digits}f} | **{call(*pooled)}** |")


if __name__ == "__main__":
    main()
