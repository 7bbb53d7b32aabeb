"""Verdicts on the MLAE paper's claims from an `mlae compare` folder (used for docs/REPRODUCTION.md).

    python benchmarks/claims.py runs/repro            # prints the Markdown table
    python benchmarks/claims.py --regime docs/results/paper_regime.csv   # the paper-regime study's tables
    python benchmarks/claims.py --regime docs/results/paper_regime.csv --update docs/REPRODUCTION.md

Each claim compares two method labels of the compare run (mean ± std over seeds of last-epoch test top-1).
Verdict: "holds" when the mean difference in the claimed direction exceeds twice its standard error
(Welch, seeds independent), "does not hold" when it goes the other way by as much, else "within noise".
Claim 5 (expert similarity) is measured on the saved adapters with `mlae.expert_similarity`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import mlae
from mlae.trained import load_trained

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


def verdicts(acc: dict[tuple[str, str], list[float]], claims, datasets: list[str],
             extra: dict[str, dict[str, tuple[float, float]]] | None = None,
             extra_cells: list[str] | None = None) -> None:
    """Print the per-dataset verdict table of ``claims`` (claim, better label, worse label) and, over several
    datasets, the pooled one. ``extra`` holds precomputed (difference, SE) cells per claim and dataset (claim
    5's similarity); ``extra_cells`` their per-dataset table rows."""
    cells: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict, extra or {})
    print("| claim | dataset | claimed better | claimed worse | difference | verdict |")
    print("|---|---|---|---|---|---|")
    for dataset in datasets:
        for claim, a, b in claims:
            if len(acc.get((a, dataset), [])) > 1 and len(acc.get((b, dataset), [])) > 1:
                diff, se = welch(acc[a, dataset], acc[b, dataset])
                cells[claim][dataset] = (diff, se)
                print(f"| {claim} | {dataset} | {a} {fmt(acc[a, dataset])} | {b} {fmt(acc[b, dataset])} | "
                      f"{diff:+.1f} | {call(diff, se)} |")
    for line in extra_cells or []:
        print(line)
    if len(datasets) < 2:
        return
    print()
    print("| claim | " + " | ".join(datasets) + " | all datasets (mean difference ± SE) | verdict |")
    print("|---|" + "---|" * (len(datasets) + 2))
    order = [c for c, _, _ in claims[:7]] + [SIMILARITY[0]] + [c for c, _, _ in claims[7:]]
    for claim in order:
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


def from_compare(compare_dir: Path) -> None:
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)
    with open(compare_dir / "results.csv") as f:
        for row in csv.DictReader(f):
            acc[row["method"], row["dataset"]].append(float(row["top1"]))
            folders[row["method"], row["dataset"]].append(row["out"])
    datasets = sorted({d for _, d in acc})
    sim_cells: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    lines = []
    claim, a, b = SIMILARITY
    for dataset in datasets:
        sims = {label: [mlae.expert_similarity(load_trained(Path(o) / "adapter.safetensors")[0])
                        for o in folders.get((label, dataset), [])] for label in (a, b)}
        if len(sims[a]) > 1 and len(sims[b]) > 1:
            # Lower similarity is the claim, so "better" is the negated similarity.
            diff, se = welch([-s for s in sims[a]], [-s for s in sims[b]])
            sim_cells[claim][dataset] = (diff, se)
            lines.append(f"| {claim} | {dataset} | {a} cos {fmt(sims[a], 3)} | {b} cos {fmt(sims[b], 3)} | "
                         f"{-diff:+.3f} | {call(diff, se)} |")
    verdicts(acc, CLAIMS, datasets, sim_cells, lines)


REGIME_CLAIMS = CLAIMS + [("7. DMLoRA beats LoRA", "dmlora", "lora"),
                          ("p chosen per task on val200 beats one p = 0.5", "mlae", "mlae-p0.5"),
                          # the paper's own ablation (p = 0: 76.6, one p = 0.5 for all tasks: 77.5)
                          ("one p = 0.5 for all tasks beats no masking (p = 0)", "mlae-p0.5", "mlae-p0"),
                          ("MLAE with one p = 0.5 beats LoRA", "mlae-p0.5", "lora"),
                          # learned p (MLAE-auto, one run per task): "within noise" of the sweep is its target.
                          # "mlae-auto" is the default (concrete) learner, "mlae-auto-heldout" the heldout one
                          # (see paper_regime.CLAIM_VARIANTS).
                          ("MLAE-auto (heldout) vs MLAE with p swept on val200", "mlae-auto-heldout", "mlae"),
                          ("MLAE-auto (heldout) beats MLAE p = 0.5", "mlae-auto-heldout", "mlae-p0.5"),
                          ("MLAE-auto (heldout) beats LoRA", "mlae-auto-heldout", "lora"),
                          ("MLAE-auto (concrete) vs MLAE with p swept on val200", "mlae-auto", "mlae"),
                          ("MLAE-auto (concrete) beats MLAE p = 0.5", "mlae-auto", "mlae-p0.5"),
                          ("MLAE-auto (concrete) beats LoRA", "mlae-auto", "lora"),
                          ("MLAE-auto (concrete) vs MLAE p = 0", "mlae-auto", "mlae-p0"),
                          ("selecting MLAE's p on test instead of val200", "mlae (test-selected)", "mlae"),
                          ("selecting LoRA's alpha on test instead of val200", "lora (test-selected)", "lora"),
                          # the protocol of the VTAB repos the paper builds on: both methods tuned on test
                          ("MLAE beats LoRA, both selected on test", "mlae (test-selected)", "lora (test-selected)"),
                          # MLAE given the update scale alpha / r that LoRA chose on val200 (MLAE's own s is 1)
                          ("MLAE at LoRA's chosen scale beats LoRA", "mlae-lora-scale", "lora"),
                          ("LoRA's chosen scale helps MLAE (p chosen on val200)", "mlae-lora-scale", "mlae"),
                          ("MLAE p = 0 at LoRA's chosen scale vs LoRA (the decomposition alone)", "mlae-p0-lora-scale",
                           "lora")]


def from_regime(path: Path) -> None:
    """Tables of docs/REPRODUCTION.md's paper-regime section from the committed CSV of benchmarks/paper_regime.py:
    one section per study setting (backbone, epochs, lr, precision), since rows of different settings do not compare."""
    with open(path, newline="") as f:
        rows = [_learner_label(r) for r in csv.DictReader(f)]
    settings: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        settings[r["backbone"], int(r["epochs"]), float(r["lr"]), r.get("precision") or "bf16"].append(r)
    for (backbone, epochs, lr, precision), subset in sorted(settings.items()):
        print(f"# Backbone {backbone or 'embedded (default)'}, {epochs} epochs, lr {lr:g}, {precision}\n")
        regime_section(subset)


def _learner_label(row: dict) -> dict:
    """A learned-p row labelled by the learner its config names: tables written before 2026-12-04 called the
    heldout learner's rows ``mlae-auto`` and the concrete learner's ``mlae-auto-concrete``."""
    if row["variant"] in ("mlae-auto", "mlae-auto-concrete", "mlae-auto-heldout"):
        heldout = json.loads(row["config"]).get("dropout_learner") == "heldout"
        return {**row, "variant": "mlae-auto-heldout" if heldout else "mlae-auto"}
    return row


def trials_section(rows: list[dict]) -> None:
    """The select part as it stands: every trial's val200 top-1 (train800 -> val200, seed 0), the best of each
    method in bold, with its eval-mode training top-1: how far the adapter memorised under that setting."""
    trials = [r for r in rows if r["selected_by"] == "trial"]
    if not trials:
        return
    knob = {"mlae": ("p", "MLAE p"), "lora": ("alpha", "LoRA α")}
    columns = sorted({(r["method"], float(r[knob[r["method"]][0]])) for r in trials},
                     key=lambda c: (c[0] != "mlae", c[1]))
    found = {(r["dataset"], r["method"], float(r[knob[r["method"]][0]])): r for r in trials}
    print("\n## Trials: val200 top-1 (%) on train800, seed 0; the best of each method in bold, training top-1 "
          "(eval mode) in brackets\n")
    print("| dataset | " + " | ".join(f"{knob[m][1]} = {v:g}" for m, v in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for d in sorted({r["dataset"] for r in trials}):
        best = {m: max(float(r["val_top1"]) for (d2, m2, _), r in found.items() if (d2, m2) == (d, m))
                for m in knob if any(k[:2] == (d, m) for k in found)}
        cells = []
        for m, v in columns:
            r = found.get((d, m, v))
            if r is None:
                cells.append("–")
                continue
            top1 = float(r["val_top1"])
            cells.append((f"**{top1:.1f}**" if top1 == best[m] else f"{top1:.1f}") + f" ({float(r['train_top1']):.0f})")
        print(f"| {d} | " + " | ".join(cells) + " |")


def learned_section(rows: list[dict]) -> None:
    """For each MLAE-auto variant: its learned p per task and seed, next to the p the val200 sweep chose. One number
    where every layer learned the same p (the heldout learner sets one p for all layers), else the profile, first
    block first."""
    for variant in sorted({r["variant"] for r in rows if r["variant"].startswith("mlae-auto")}):
        _learned_table(rows, variant)


def _learned_table(rows: list[dict], variant: str) -> None:
    learned = [r for r in rows if r["variant"] == variant and r.get("learned_p")]
    if learned:
        learner = "concrete" if variant == "mlae-auto" else variant.removeprefix("mlae-auto-")  # see CLAIM_VARIANTS
        print(f"\n## MLAE-auto ({learner}): the learned p against the p chosen on val200\n")
        seeds = sorted({int(r["seed"]) for r in learned})
        print("| dataset | p chosen on val200 | " + " | ".join(f"learned p, seed {s}" for s in seeds) + " |")
        print("|---|---|" + "---|" * len(seeds))
        for d in sorted({r["dataset"] for r in learned}):
            chosen = next((x["p"] for x in rows if x["dataset"] == d and x["variant"] == "mlae"
                           and x["selected_by"] == "val"), "–")
            by_seed = {int(r["seed"]): r["learned_p"].split() for r in learned if r["dataset"] == d}
            cells = ["–" if s not in by_seed else by_seed[s][0] + f" (all {len(by_seed[s])} layers)"
                     if len(set(by_seed[s])) == 1 else " ".join(by_seed[s]) for s in seeds]
            print(f"| {d} | {chosen} | " + " | ".join(cells) + " |")


def regime_section(rows: list[dict]) -> None:
    from mlae.data import SUITE_TASKS

    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["split"] != "test" or r["selected_by"] in ("trial", "candidate"):
            continue
        label = r["variant"] + (" (test-selected)" if r["selected_by"] == "test" else "")
        acc[label, r["dataset"]].append(float(r["test_top1"]))
    datasets = sorted({d for _, d in acc})
    print("## Regime: rank-8 LoRA (α = 8), seed 0\n")
    print("| dataset | train top-1 (eval mode) | test top-1 | test gain over the last quarter of training |")
    print("|---|---|---|---|")
    regime = [r for r in rows if r["variant"] == "lora-default"]
    for r in regime:
        print(f"| {r['dataset']} | {r['train_top1']} | {r['test_top1']} | {r.get('test_gain_last_quarter', '')} |")
    if regime:
        memorised = sum(float(r["train_top1"]) >= 99.0 for r in regime)
        print(f"\nTraining top-1 ≥ 99 % on {memorised} of {len(regime)} tasks.")
    trials_section(rows)
    if not datasets:
        print()
        return
    print("\n## Selected hyperparameters (p for MLAE, α for LoRA) per dataset\n")
    print("| dataset | MLAE p (val200) | MLAE p (test) | LoRA α (val200) | LoRA α (test) |\n|---|---|---|---|---|")
    for d in datasets:
        pick = {(r["variant"], r["selected_by"]): r for r in rows if r["dataset"] == d}
        cells = [pick.get((m, by), {}).get(col, "–") for m, col in (("mlae", "p"), ("lora", "alpha"))
                 for by in ("val", "test")]
        print(f"| {d} | " + " | ".join(cells[i] for i in (0, 1, 2, 3)) + " |")
    learned_section(rows)
    print("\n## Test top-1 (%), mean over seeds\n")
    labels = sorted({label for label, _ in acc}, key=lambda x: (x not in ("lora", "mlae"), x))
    print("| variant | " + " | ".join(datasets) + " | mean over tasks | mean of domain means |")
    print("|---|" + "---|" * (len(datasets) + 2))
    for label in labels:
        means = {d: mean(acc[label, d]) for d in datasets if acc.get((label, d))}
        if len(means) < len(datasets):
            task_mean = domain_mean = "–"
        else:
            domains = defaultdict(list)
            for d, v in means.items():
                domains[SUITE_TASKS[d.split(":", 1)[1]][1]].append(v)
            task_mean = f"{mean(means.values()):.1f}"
            domain_mean = f"{mean(mean(v) for v in domains.values()):.1f}"
        print(f"| {label} | " + " | ".join(f"{means[d]:.1f}" if d in means else "–" for d in datasets) +
              f" | {task_mean} | {domain_mean} |")
    print("\n## Verdicts\n")
    verdicts(acc, REGIME_CLAIMS, datasets)
    print()


# --update: the marked blocks of a Markdown file, "<!-- NAME: begin ... -->" up to "<!-- NAME: end -->", get the
# table of the same name from the last study setting's section (the tables under these headings; for the
# verdicts the pooled one, which comes last).
UPDATABLE = {"trials": "## Trials", "selected": "## Selected hyperparameters", "learned": "## MLAE-auto (heldout):",
             "learned-concrete": "## MLAE-auto (concrete):",
             "test": "## Test top-1", "verdicts": "## Verdicts"}


def update_doc(csv_path: Path, doc: Path) -> list[str]:
    """Rewrites the marked tables of ``doc`` from ``csv_path``; returns the names of the blocks it rewrote."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from_regime(csv_path)
    section = out.getvalue().split("\n# Backbone ")[-1]
    text, done = doc.read_text(), []
    for name, heading in UPDATABLE.items():
        part = section.split("\n" + heading, 1)
        if len(part) < 2 or f"<!-- {name}: begin" not in text:
            continue
        body = part[1].split("\n## ", 1)[0]
        tables = re.findall(r"(?m)^(\|.*\|\n(?:\|.*\|\n?)+)", body)
        if not tables:
            continue
        table = tables[-1].strip()
        text = re.sub(rf"(<!-- {name}: begin[^\n]*-->\n).*?(<!-- {name}: end -->)",
                      lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
        done.append(name)
    doc.write_text(text)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir", type=Path, nargs="?", help="an mlae compare output folder")
    ap.add_argument("--regime", type=Path, metavar="CSV", help="instead: docs/results/paper_regime.csv")
    ap.add_argument("--update", type=Path, metavar="MD", help="with --regime: rewrite the marked tables of this "
                    f"Markdown file ({', '.join(UPDATABLE)}) from the last study setting instead of printing")
    args = ap.parse_args()
    if (args.compare_dir is None) == (args.regime is None):
        ap.error("give a compare folder or --regime CSV (one of them)")
    if args.update and not args.regime:
        ap.error("--update goes with --regime")
    if args.update:
        print(f"{args.update}: rewrote {', '.join(update_doc(args.regime, args.update)) or 'no block'}")
    elif args.regime:
        from_regime(args.regime)
    else:
        from_compare(args.compare_dir)


if __name__ == "__main__":
    main()
