"""A comparison's tables and figures: results.csv (one row per run), summary.csv / summary.md (mean ± std over
seeds per dataset, per domain and overall, beside the paper's numbers for VTAB-1k) and bars_<domain>.png."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from statistics import mean, stdev
from typing import TYPE_CHECKING

from ..files import atomic_write, atomic_write_text
from ..rundir import RESULTS
from ..utils import pyplot, save_png
from .variants import Variant

if TYPE_CHECKING:
    from .compare import Run

__all__ = ["aggregate", "summarize", "domain_of", "OVERALL", "DATASETS_MEAN", "AVERAGE_LABELS"]


def domain_of(spec: str) -> str:
    from ..data import SUITE_TASKS, VTAB_TASKS

    prefix, _, name = spec.partition(":")
    if prefix == "suite" and name in SUITE_TASKS:
        return SUITE_TASKS[name][1]
    if prefix == "vtab" and name in VTAB_TASKS:
        return VTAB_TASKS[name][1]
    return prefix  # fgvc, folder: one group each


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{mean(values):.1f} ± {stdev(values):.1f}"


def _row_of(run: Run) -> dict | None:
    path = run.folder / RESULTS
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return {"method": run.variant.label, "base_method": run.variant.method,
            "overrides": json.dumps(run.variant.overrides, sort_keys=True), "dataset": run.dataset,
            "domain": domain_of(run.dataset), "seed": run.seed, "eval_split": r["eval_split"],
            "top1": round(100 * r["top1"], 4), "adapter_params": r["params"]["adapter"],
            "head_params": r["params"]["head"], "trainable_params": r["params"]["trainable"],
            "epochs": r["epochs"], "wall_time_s": round(r["wall_time_s"], 2),
            "train_images_per_s": round(r["train_images_per_s"], 1),
            "train_eval_top1": "" if r.get("train_eval_top1") is None else round(100 * r["train_eval_top1"], 4),
            "out": str(run.folder)}


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    atomic_write(path, write)


# The two averages published tables mix: the mean of the domain means (VTAB-1k's convention, the MLAE paper's
# 78.8) and the plain mean over the datasets (76.7 for the same numbers).
OVERALL = "overall"
DATASETS_MEAN = "mean_of_datasets"
AVERAGE_LABELS = {OVERALL: "overall (mean of domain means)", DATASETS_MEAN: "mean of datasets"}


def aggregate(rows: list[dict], variants: list[Variant], datasets: list[str], seeds: list[int]) -> dict:
    """{label: {scope name: [value per seed]}} for datasets, domains, "overall" and "mean_of_datasets". A
    domain's value for one seed is the mean over its datasets; "overall" is the mean of the domain means (the
    VTAB-1k convention, how the paper's averages are computed), "mean_of_datasets" the mean over all datasets.
    Seeds missing a dataset of a domain are left out of that domain (and of both averages)."""
    by = {(r["method"], r["dataset"], r["seed"]): r["top1"] for r in rows}
    domains: dict[str, list[str]] = {}
    for d in datasets:
        domains.setdefault(domain_of(d), []).append(d)
    table: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        t = table[v.label] = {}
        for d in datasets:
            t[d] = [by[(v.label, d, s)] for s in seeds if (v.label, d, s) in by]
        per_seed_domains: dict[int, dict[str, float]] = {s: {} for s in seeds}
        for dom, names in domains.items():
            t[dom] = []
            for s in seeds:
                if all((v.label, d, s) in by for d in names):
                    value = mean(by[(v.label, d, s)] for d in names)
                    t[dom].append(value)
                    per_seed_domains[s][dom] = value
        t[OVERALL] = [mean(vals.values()) for vals in per_seed_domains.values() if len(vals) == len(domains)]
        t[DATASETS_MEAN] = [mean(by[(v.label, d, s)] for d in datasets) for s in seeds
                            if all((v.label, d, s) in by for d in datasets)]
    return {"table": table, "domains": domains}


def summarize(out: Path, runs: list[Run], variants: list[Variant], datasets: list[str], seeds: list[int]) -> str:
    """Write results.csv, summary.csv, summary.md and bars_<domain>.png; returns summary.md's text."""
    from .. import published

    rows = [row for row in map(_row_of, runs) if row is not None]
    _write_csv(out / "results.csv", rows)
    agg = aggregate(rows, variants, datasets, seeds)
    table, domains = agg["table"], agg["domains"]
    papers = _paper_columns(variants, datasets, domains)
    scopes = [(d, "dataset") for d in datasets] + [(dom, "domain") for dom in domains] + [
        (OVERALL, "overall"), (DATASETS_MEAN, "overall")]
    params: dict[str, dict[str, float]] = {}
    for v in variants:
        mine = [r for r in rows if r["method"] == v.label]
        params[v.label] = {k: (mean(r[k] for r in mine) if mine else float("nan"))
                           for k in ("adapter_params", "head_params", "trainable_params", "wall_time_s")}
    summary_rows = []
    for v in variants:
        for scope, kind in scopes:
            values = table[v.label][scope]
            paper = papers.get(v.label, (None, {}))[1].get(scope)
            summary_rows.append({"method": v.label, "scope": kind, "name": scope, "n_seeds": len(values),
                                 "mean": round(mean(values), 4) if values else "",
                                 "std": round(stdev(values), 4) if len(values) > 1 else "",
                                 "paper": paper if paper is not None else "",
                                 **{k: round(val, 2) for k, val in params[v.label].items()}})
    _write_csv(out / "summary.csv", summary_rows)

    split = {r["eval_split"] for r in rows}
    lines = [f"# mlae compare: {out}", "",
             f"Top-1 (%) on the {'/'.join(sorted(split)) or 'test'} split after the last epoch, mean ± std over "
             f"seeds {', '.join(map(str, seeds))} (sample std; a single value when one seed finished). A domain is "
             "the mean of its datasets. Two averages, as published tables use both: overall is the mean of the "
             "domain means (the VTAB-1k convention, the MLAE paper's), mean of datasets the plain mean over the "
             f"{len(datasets)} datasets. {len(rows)} of {len(runs)} runs finished.", ""]
    header = ["dataset"] + [v.label for v in variants] + [f"paper: {lab}" for lab, _ in papers.values()]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scope, kind in scopes:
        name = f"**{AVERAGE_LABELS.get(scope, scope)}**" if kind != "dataset" else scope
        cells = [name] + [_fmt(table[v.label][scope]) for v in variants]
        cells += [f"{p[1][scope]:.1f}" if scope in p[1] else "–" for p in papers.values()]
        lines.append("| " + " | ".join(cells) + " |")
    if papers:
        lines += ["", f"\"paper\" columns: {published.SOURCE}; not comparable in absolute terms with runs on other "
                  "backbones, resolutions or schedules."]
    lines += ["", "| method | adapter params | head params (mean) | trainable (mean) | time per run (s) |",
              "|---|---|---|---|---|"]
    for v in variants:
        p = params[v.label]
        lines.append(f"| {v.label} | " + " | ".join("–" if math.isnan(p[k]) else f"{p[k]:,.0f}" for k in (
            "adapter_params", "head_params", "trainable_params", "wall_time_s")) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    for dom, names in domains.items():
        _bars(out / f"bars_{dom}.png", dom, names, variants, table, papers)
    return text


def _paper_columns(variants: list[Variant], datasets: list[str], domains: dict[str, list[str]]) -> dict:
    """{label: (paper row label, {scope: top-1 %})} for variants the paper reports, when every dataset is a VTAB-1k
    one. Domain and overall values are recomputed over the datasets compared here (so that a subset of VTAB-1k
    is compared like with like); with all 19 datasets the paper's printed averages are used."""
    from .. import published

    if not datasets or not all(d.startswith("vtab:") for d in datasets):
        return {}
    names = {d: d.partition(":")[2] for d in datasets}
    full = set(names.values()) == set(published.VTAB_ORDER)
    columns = {}
    for v in variants:
        found = published.paper_row(v.method, v.overrides)
        if not found or found[0] in {lab for lab, _ in columns.values()}:
            continue
        label, row = found
        values = {d: row[n] for d, n in names.items() if n in row}
        for dom, members in domains.items():
            if full and dom in row:
                values[dom] = row[dom]
            elif all(names[d] in row for d in members):
                values[dom] = round(mean(row[names[d]] for d in members), 1)
        if full and OVERALL in row:
            values[OVERALL] = row[OVERALL]
        elif all(dom in values for dom in domains):
            values[OVERALL] = round(mean(values[dom] for dom in domains), 1)
        if all(n in row for n in names.values()):  # the paper prints no mean of datasets: computed from its rows
            values[DATASETS_MEAN] = round(mean(row[n] for n in names.values()), 1)
        columns[v.label] = (label, values)
    return columns


def _bars(path: Path, domain: str, names: list[str], variants: list[Variant], table: dict, papers: dict) -> None:
    plt = pyplot()

    groups = names + [domain]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(groups) * max(1, len(variants)) ** 0.5), 3.8))
    for i, v in enumerate(variants):
        vals = [table[v.label][g] for g in groups]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [mean(x) if x else 0 for x in vals], width,
               yerr=[stdev(x) if len(x) > 1 else 0 for x in vals], capsize=2, label=v.label)
        if v.label in papers:
            pv = [papers[v.label][1].get(g) for g in groups]
            ax.scatter([x for x, p in zip(xs, pv) if p is not None], [p for p in pv if p is not None],
                       marker="_", s=200, color="black", zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.split(":")[-1] if g != domain else "mean" for g in groups], rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{domain}" + (" (black bars: paper)" if papers else ""))
    ax.legend(fontsize=7, ncol=min(4, len(variants)))
    fig.tight_layout()
    save_png(fig, path)
