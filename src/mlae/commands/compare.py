"""`mlae compare`: methods × datasets × seeds in one command, one table.

    mlae compare --methods linear,lora,mlae --datasets suite:all --seeds 0,1,42 --out runs/compare --epochs 20

Each run is a subprocess ``mlae train --config <run>/compare.yaml --out <run>``, where ``compare.yaml`` is the
run's fully resolved configuration (train options of this command < method-variant overrides). Finished runs
(``results.json`` present) are skipped, interrupted ones resumed from their checkpoint, so the same command can
be repeated until everything is done.

Method variants name a method plus option overrides in brackets; each is a column of its own:

    --methods "mlae,mlae[dropout=0],mlae[adaptive=false],lora,lora[lr=1e-3,rank=4]"
    --methods "nomask=mlae[dropout=0],mlae"        # an explicit column label before '='
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Callable

from ..recipes import RecipeError, get_method
from ..utils import FolderLock, atomic_write, atomic_write_text, cpu_jobs, pyplot, save_png

__all__ = ["Run", "Variant", "execute_runs", "parse_methods", "parse_seeds", "train_parent", "given_train_options",
           "run_compare", "summarize"]

RESULTS = "results.json"
RUN_RECIPE = "compare.yaml"
# Settings that may change between invocations without invalidating a finished run.
VOLATILE = ("out", "runs_dir", "threads", "device", "checkpoint_every", "progress", "resume", "overwrite", "cache")


# --------------------------------------------------------------------------------------------- train options


class _Refuse(argparse.Action):
    """A `mlae train` option that this command replaces (or cannot honour)."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs):
        self.hint = hint
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} does not apply here{self.hint}")


def train_parent() -> argparse.ArgumentParser:
    """`mlae train`'s parser, to be used as ``parents=[...]`` of another command (with conflict_handler="resolve"),
    so that every train option (method options included) is accepted with the same flags, types and help."""
    from . import train

    scratch = argparse.ArgumentParser(add_help=False)
    sub = scratch.add_subparsers()
    train.register(sub)
    return sub.choices["train"]


def refuse_options(parser: argparse.ArgumentParser, refuse: dict[str, str]) -> None:
    """Replace inherited train options (flag -> hint) by an error (needs conflict_handler="resolve")."""
    for flag, hint in refuse.items():
        parser.add_argument(flag, action=_Refuse, hint=hint, dest=argparse.SUPPRESS, default=argparse.SUPPRESS)


def given_train_options(args: argparse.Namespace, own: set[str]) -> dict[str, Any]:
    """The `mlae train` options given on the command line (the train parser's defaults are SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k not in own and k not in ("func", "command")}


def resolve_config(given: dict[str, Any], **overrides):
    """TrainConfig from train options (with `mlae train`'s precedence: defaults < --config recipe < options),
    then ``overrides``. Method options that the method does not take are dropped, so one command line can
    drive several methods."""
    from ..engine import TrainConfig
    from .train import config_from_args

    method = get_method(overrides.get("method", given.get("method", TrainConfig.method)))
    fields = set(TrainConfig.__dataclass_fields__)
    keep = {k: v for k, v in given.items() if k in fields or k in method.defaults() or k == "config"}
    return config_from_args(argparse.Namespace(**{**keep, **overrides}))


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A column of the comparison: a method and option overrides (method options or TrainConfig fields)."""

    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label.replace("[", "_").replace("]", "")).strip("_")


_VARIANT = re.compile(r"^\s*(?:(?P<label>[^=\[\]]+?)\s*=\s*)?(?P<method>[\w.-]+)\s*(?:\[(?P<opts>.*)\])?\s*$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise RecipeError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise RecipeError(f"unbalanced '[' in {text!r}")
    return [p.strip() for p in parts + [cur] if p.strip()]


def _parse_value(method_name: str, key: str, text: str) -> Any:
    from ..engine import TrainConfig
    from ..recipes import _bool

    options = {o.name: o for o in get_method(method_name).options}
    if key in options:
        opt = options[key]
        if opt.nargs:
            return [opt.type(v) for v in re.split(r"[\s|]+", text) if v]
        value = opt.type(text)
        if opt.choices and value not in opt.choices:
            raise RecipeError(f"{method_name}[{key}={text}]: choose from {', '.join(map(str, opt.choices))}")
        return value
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields or key in ("dataset", "method", "seed", "out", "resume", "overwrite"):
        known = sorted(options) + sorted(set(fields) - {"dataset", "method", "seed", "out", "resume", "overwrite",
                                                        "method_options"})
        raise RecipeError(f"{method_name}[{key}=...]: {method_name!r} has no option {key!r}; known: "
                          f"{', '.join(known)}")
    default = getattr(TrainConfig(), key)
    if isinstance(default, bool):
        return _bool(text)
    if isinstance(default, (int, float)):
        return type(default)(float(text)) if isinstance(default, float) else int(text)
    return None if text.lower() in ("none", "null") else text


def parse_methods(text: str) -> list[Variant]:
    """``"mlae,mlae[dropout=0,coeff_init=2],nomask=mlae[dropout=0]"`` -> variants (labels unique)."""
    variants = []
    for item in _split_top(text):
        m = _VARIANT.match(item)
        if not m:
            raise RecipeError(f"cannot parse method {item!r}: expected METHOD, METHOD[opt=value,...] or "
                              "LABEL=METHOD[...]")
        method = get_method(m["method"]).name
        overrides: dict[str, Any] = {}
        raw = []
        if m["opts"] is not None:
            for pair in (p for p in re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", m["opts"]) if p.strip()):
                key, sep, value = pair.partition("=")
                key = key.strip().replace("-", "_")
                if not sep or not key:
                    raise RecipeError(f"{item!r}: expected opt=value inside the brackets, got {pair!r}")
                overrides[key] = _parse_value(method, key, value.strip())
                raw.append(f"{key}={value.strip()}")
        label = (m["label"] or "").strip() or (method + (f"[{','.join(raw)}]" if raw else ""))
        variants.append(Variant(label, method, overrides))
    labels = [v.label for v in variants]
    slugs = [v.slug for v in variants]
    if len(set(labels)) != len(labels) or len(set(slugs)) != len(slugs):
        raise RecipeError(f"method labels must be unique (and distinct as folder names): {', '.join(labels)}")
    if not variants:
        raise RecipeError("--methods is empty")
    return variants


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds takes comma-separated integers, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def domain_of(spec: str) -> str:
    from ..data import SUITE_TASKS, VTAB_TASKS

    prefix, _, name = spec.partition(":")
    if prefix == "suite" and name in SUITE_TASKS:
        return SUITE_TASKS[name][1]
    if prefix == "vtab" and name in VTAB_TASKS:
        return VTAB_TASKS[name][1]
    return prefix  # fgvc, folder: one group each


def dataset_slug(spec: str) -> str:
    from ..recipes import dataset_key

    prefix, _, _ = spec.partition(":")
    return f"{prefix}-{dataset_key(spec)}"


# --------------------------------------------------------------------------------------------- command


OWN = {"methods", "datasets", "seeds", "compare_out", "jobs", "config"}


def register(subparsers) -> None:
    from ..engine import DEFAULT_DATASET

    p = subparsers.add_parser(
        "compare", parents=[train_parent()], conflict_handler="resolve",
        help="run methods × datasets × seeds and tabulate mean ± std (with the paper's numbers for VTAB-1k)",
        description="Train every method variant on every dataset with every seed (subprocesses of `mlae train`), "
        "skip runs already finished, and write results.csv (one row per run), summary.md / summary.csv "
        "(mean ± std over seeds per dataset, per domain and overall; trainable parameters; time) and "
        "bars_<domain>.png. Train options (e.g. --epochs, --backbone, --config) apply to every run; method "
        "options apply to the methods that take them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="method variants: METHOD[opt=value,...] overrides method options or training settings, e.g.\n"
        "  --methods \"mlae,mlae[dropout=0],mlae[adaptive=false],lora,lora[lr=1e-3]\"\n"
        "  --methods \"nomask=mlae[dropout=0],mlae\"   (LABEL=... names the column)")
    g = p.add_argument_group("comparison")
    g.add_argument("--methods", required=True, metavar="LIST",
                   help="comma-separated methods or variants METHOD[opt=value,...] (see below)")
    g.add_argument("--datasets", default=DEFAULT_DATASET, metavar="SPECS",
                   help=f"comma-separated dataset specs; suite:all / vtab:all / fgvc:all expand (default "
                   f"{DEFAULT_DATASET})")
    g.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default 0; the paper: 0,1,42)")
    g.add_argument("--out", dest="compare_out", required=True, metavar="DIR",
                   help="output folder: runs/<method>/<dataset>/s<seed>, results.csv, summary.md, ...")
    g.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs in parallel (default: one per GPU with CUDA_VISIBLE_DEVICES; on CPU one 1-thread "
                   "job per free core, which beat one many-thread job on small ViTs)")
    g.add_argument("--config", metavar="FILE", help="YAML recipe for every run (its per_dataset entries apply); "
                   "options on the command line and variant overrides win over it")
    refuse_options(p, {"--dataset": "; use --datasets", "--method": "; use --methods", "--seed": "; use --seeds",
                       "--resume": " (finished runs are skipped and interrupted ones resumed automatically)",
                       "--overwrite": " (delete a run folder to redo it)",
                       "--quiet": " (each run's output goes to its train.log)"})
    p.set_defaults(func=run_compare)


def _fail(err: Exception) -> int:
    from .train import _fail as train_fail

    return train_fail(err)


@dataclass
class Run:
    variant: Variant
    dataset: str
    seed: int
    folder: Path
    config: dict


def plan(args: argparse.Namespace) -> tuple[list[Variant], list[str], list[int], list[Run]]:
    from ..data import expand_specs

    variants = parse_methods(args.methods)
    datasets = expand_specs(args.datasets)
    seeds = parse_seeds(args.seeds)
    given = given_train_options(args, OWN)
    if args.config:
        given["config"] = args.config
    out = Path(args.compare_out)
    runs = []
    for v in variants:
        for d in datasets:
            for s in seeds:
                folder = out / "runs" / v.slug / dataset_slug(d) / f"s{s}"
                cfg = resolve_config(given, dataset=d, method=v.method, seed=s, out=str(folder), **v.overrides)
                config = {k: val for k, val in cfg.to_dict().items() if k not in ("threads", "runs_dir")}
                runs.append(Run(v, d, s, folder, config))
                if (folder / RESULTS).exists():
                    changed = _changed(folder / RUN_RECIPE, config)
                    if changed:
                        raise RecipeError(
                            f"{folder} holds a finished run made with other settings ("
                            + ", ".join(changed[:5])
                            + "); use another --out, or delete that run folder to redo it")
    return variants, datasets, seeds, runs


def _changed(stored: Path, config: dict) -> list[str] | None:
    """The settings (other than volatile ones) in which a stored configuration (compare.yaml, or the engine's
    config.yaml) differs from ``config``, as "key: old -> new"; None when there is no such file."""
    import yaml

    from ..engine import TrainConfig

    if not stored.exists():
        return None
    before = yaml.safe_load(stored.read_text()) or {}
    # A setting added since the file was written (e.g. normalize) held its default for that run.
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    before = {**{k: v for k, v in defaults.items() if k in config}, **before}
    return [f"{k}: {before.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(before) | set(config))
            if k not in VOLATILE and before.get(k) != config.get(k)]


def _devices(device: str | None) -> list[str | None]:
    """One entry per parallel job: a CUDA_VISIBLE_DEVICES value, or None on CPU."""
    if device is None or str(device).startswith("cuda"):
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:
            n = 0
        if n and (device is None or device == "cuda"):
            return [str(i) for i in range(n)]
    return [None]


def execute_runs(todo: list[Run], *, jobs: int | None = None, threads: int | None = None, device: str | None = None,
                 on_done: Callable[[Run], None] | None = None) -> list[str]:
    """Train ``todo`` (each an `mlae train` subprocess writing into its run folder, resumed when its checkpoint
    has the same settings), ``jobs`` at a time; returns one line per failed run. ``on_done(run)`` is called
    (serially) after every finished run."""
    import yaml

    gpus = _devices(device)
    if gpus[0] is None:
        jobs, threads = cpu_jobs(len(todo), jobs, threads)
        if todo:
            print(f"CPU: {jobs} job(s) in parallel × {threads} torch thread(s) each (--jobs / --threads override)",
                  flush=True)
    else:
        jobs = jobs or len(gpus)
    free = list(gpus) * max(1, math.ceil(jobs / len(gpus)))
    lock = threading.Lock()
    failures: list[str] = []

    def execute(run: Run) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        # `--resume` continues with the run folder's own config.yaml: only when the settings are unchanged.
        resume = (run.folder / "checkpoint.safetensors").exists() and _changed(run.folder / "config.yaml",
                                                                               run.config) == []
        (run.folder / RUN_RECIPE).write_text(yaml.safe_dump(run.config, sort_keys=False))
        cmd = [sys.executable, "-m", "mlae", "train", "--config", str(run.folder / RUN_RECIPE),
               "--out", str(run.folder), "--quiet", "--resume" if resume else "--overwrite"]
        if threads:
            cmd += ["--threads", str(threads)]
        with lock:
            gpu = free.pop()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            with open(run.folder / "train.log", "a") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        finally:
            with lock:
                free.append(gpu)
        name = f"{run.variant.label} / {run.dataset} / seed {run.seed}"
        if rc == 0 and (run.folder / RESULTS).exists():
            top1 = json.loads((run.folder / RESULTS).read_text())["top1"]
            print(f"done   {name}: top-1 {100 * top1:.2f}%", flush=True)
            if on_done is not None:
                with lock:
                    on_done(run)
        else:
            with lock:
                failures.append(f"{name} (exit {rc}; see {run.folder / 'train.log'})")
            print(f"FAILED {name} (exit {rc}; see {run.folder / 'train.log'})", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(execute, todo))
    return failures


def run_compare(args: argparse.Namespace) -> int:
    try:
        variants, datasets, seeds, runs = plan(args)
        out = Path(args.compare_out)
        # One compare per folder at a time: two would train the same runs and interleave the tables. Each run's
        # own folder is locked by the `mlae train` process that writes it, not here.
        with FolderLock(out):
            return _run_all(args, out, variants, datasets, seeds, runs)
    except Exception as err:
        return _fail(err)


def _run_all(args, out: Path, variants: list[Variant], datasets: list[str], seeds: list[int], runs: list[Run]) -> int:
    todo = [r for r in runs if not (r.folder / RESULTS).exists()]
    print(f"{len(runs)} runs ({len(variants)} methods × {len(datasets)} datasets × {len(seeds)} seeds): "
          f"{len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    try:
        failures = execute_runs(todo, jobs=args.jobs, threads=getattr(args, "threads", None),
                                device=getattr(args, "device", None))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    text = summarize(out, runs, variants, datasets, seeds)
    print(text)
    if failures:
        print(f"mlae: error: {len(failures)} run(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- tables


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
