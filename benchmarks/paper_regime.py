"""The paper's setting on the suite: adapters that memorise, p chosen on validation, every claim re-tested.

Runs the study in parts, each resumable, and appends one row per finished run to a CSV that is committed
(``docs/results/paper_regime.csv``), so that the study grows across machines and sessions and the report
(``python benchmarks/claims.py --regime docs/results/paper_regime.csv``) regenerates from the repository alone.

    python benchmarks/paper_regime.py regime  --epochs 100 --lr 2e-3     # does rank-8 LoRA memorise? (seed 0)
    python benchmarks/paper_regime.py select  --epochs 100 --lr 2e-3     # trials on train800 -> val200 (seed 0)
    python benchmarks/paper_regime.py test    --epochs 100 --lr 2e-3     # candidates on test; chosen x 3 seeds
    python benchmarks/paper_regime.py test    --epochs 100 --lr 2e-3 --selected-by val   # the val choice first
    python benchmarks/paper_regime.py claims  --epochs 100 --lr 2e-3     # the other variants, 3 seeds
    python benchmarks/paper_regime.py status                             # what is done; runs left per part, hours

Protocol (rows' ``selected_by``):
- ``trial``: MLAE with every p of ``--p-grid`` and LoRA with every alpha of ``--alpha-grid`` (the same number
  of trials), trained on train800, scored on val200, seed 0.
- ``candidate``: each trial's configuration trained on train800val200 and tested, seed 0 (what a repository
  that selects on test looks at).
- ``val``: the configuration with the best val200 top-1, trained on train800val200 with every seed and tested:
  variant ``mlae`` / ``lora``. ``test``: the same for the configuration with the best seed-0 test top-1 (the
  gain that protocol manufactures is the difference). A ``val`` and a ``test`` row may come from one run.
- ``fixed``: the claims' other variants, at the p chosen on validation where they mask stochastically.
``train_top1`` is measured in eval mode on the training images after the last epoch.
A run is identified by (dataset, configuration, seed, split, epochs, lr, backbone): rows already in the CSV are
not run again; run folders live under ``--runs`` (not committed).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from mlae.rundir import RESULTS
from mlae.experiments.compare import Run, dataset_slug, execute_runs, resolve_config
from mlae.experiments.variants import parse_methods
from mlae.adapters.lora import LoRAConfig
from mlae.backbones import DEFAULT_EMBEDDED
from mlae.data import expand_specs
from mlae.files import atomic_write_text
from mlae.hardware import cpu_cores, cpu_name, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "results" / "paper_regime.csv"
COLUMNS = ["dataset", "method", "variant", "config", "seed", "split", "selected_by", "epochs", "lr", "p",
           "coeff_init", "alpha", "train_top1", "val_top1", "test_top1", "test_gain_last_quarter", "seconds",
           "backbone", "cpu", "learned_p", "precision"]
P_GRID = "0,0.1,0.3,0.5,0.7,0.9"          # the paper's grid (Table 10's values come from it)
ALPHA_GRID = "2,4,8,16,32,64"              # rank 8: update scale alpha / r from 1/4 to 8
SEEDS = "0,1,42"
# The claims' variants besides the selected mlae / lora. "{p}" is the p chosen on validation for the task.
CLAIM_VARIANTS = ("mlae-p0=mlae[dropout=0],lora-dropout,mlae-frozen-c=mlae[dropout={p},adaptive=false],"
                  "fixed-incremental=mlae[masking=fixed,pattern=incremental],"
                  "fixed-protruding=mlae[masking=fixed,pattern=protruding],"
                  "mixed-hourglass=mlae[dropout={p},masking=mixed,pattern=hourglass],"
                  "mlae-4x2=mlae[dropout={p},experts=4,expert_rank=2],"
                  "mlae-2x4=mlae[dropout={p},experts=2,expert_rank=4],dmlora,"
                  # the paper's ablation: one p for every task; and p learned in the run (one run, no search):
                  # "mlae-auto" is the default learner, concrete (a p per layer from the training signal, all
                  # 1,000 images); "mlae-auto-heldout" the controller that holds out 200 of the 1,000 images.
                  # Both name their learner, so the rows keep their meaning if the default changes.
                  "mlae-p0.5=mlae[dropout=0.5],mlae-auto=mlae[dropout=auto,dropout_learner=concrete],"
                  "mlae-auto-heldout=mlae[dropout=auto,dropout_learner=heldout],"
                  # LoRA's update is scaled by alpha / r, and its alpha was chosen on val200; MLAE's scale s
                  # is 1 (the official code's). "{lora_scale}" is that task's chosen alpha / r, so these ask
                  # whether LoRA's lead is the scale it was allowed to choose.
                  "mlae-lora-scale=mlae[dropout={p},scale={lora_scale}],"
                  "mlae-p0-lora-scale=mlae[dropout=0,scale={lora_scale}]")


CPU = cpu_name()  # timings in ``seconds`` compare only between rows of one CPU


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_precision(row: dict) -> str:
    """A row's training precision; rows from before the column was added all trained under bf16 autocast."""
    return row.get("precision") or "bf16"


def append_row(path: Path, row: dict) -> None:
    """One line per finished run, appended (and flushed) at once: a killed study loses no finished run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:  # a table written before a column was added: rewrite it with the new header
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(read_rows(path))
            atomic_write_text(path, text.getvalue())
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.csv = Path(args.csv)
        self.datasets = expand_specs(args.datasets)
        self.seeds = [int(s) for s in args.seeds.split(",")]
        # Resolved here, once: "auto" measures bf16 on this CPU before the jobs start (they then read the cached
        # value), and the table records the precision the runs trained in.
        self.precision = resolve_precision(args.precision, torch.device("cpu"))
        self.base = {"epochs": args.epochs, "lr": args.lr, "precision": self.precision}
        if args.backbone:
            self.base["backbone"] = args.backbone
        for key in ("img_size", "patch_size", "batch_size", "warmup_epochs"):
            if getattr(args, key) is not None:
                self.base[key] = getattr(args, key)
        if args.no_pretrained:
            self.base["pretrained"] = False
        self.counting: dict | None = None  # while the status part counts the runs left: run key -> variant

    # --------------------------------------------------------------------------------------- bookkeeping
    def key(self, run: Run) -> tuple:
        """A run's identity: every method option (resolved, so that ``lora`` and ``lora[alpha=8]`` are one run)
        and the study's settings."""
        return (run.dataset, run.variant.method, _options(run), str(run.seed), run.config["split"],
                str(self.args.epochs), f"{self.args.lr:g}", self.args.backbone or "", self.precision)

    def done(self) -> dict[tuple, list[dict]]:
        """The CSV's rows by run identity."""
        out: dict[tuple, list[dict]] = {}
        for r in read_rows(self.csv):
            config = _canonical(r["method"], json.loads(r["config"]))
            key = (r["dataset"], r["method"], config, r["seed"], r["split"], r["epochs"], r["lr"], r["backbone"],
                   row_precision(r))
            out.setdefault(key, []).append(r)
        return out

    def run_of(self, label: str, dataset: str, seed: int, split: str) -> Run:
        (v,) = parse_methods(label)
        folder = Path(self.args.runs) / split / v.slug / dataset_slug(dataset) / f"s{seed}"
        cfg = resolve_config(dict(self.base), dataset=dataset, method=v.method, seed=seed, split=split,
                             out=str(folder), progress=False, **v.overrides)
        config = {k: val for k, val in cfg.to_dict().items() if k not in ("threads", "runs_dir")}
        return Run(v, dataset, seed, folder, config)

    def execute(self, wanted: list[tuple[str, str, int, str, str, str]]) -> None:
        """``wanted``: (label, dataset, seed, split, variant, selected_by); runs every one not yet in the CSV
        (a run whose rows exist under another role is not trained again: its result is copied)."""
        done = self.done()
        todo: dict[tuple, Run] = {}
        roles: dict[tuple, list[tuple[str, str]]] = {}
        for label, dataset, seed, split, variant, selected_by in wanted:
            run = self.run_of(label, dataset, seed, split)
            key = self.key(run)
            rows = done.get(key, [])
            if any((r["variant"], r["selected_by"]) == (variant, selected_by) for r in rows):
                continue
            if self.counting is not None:  # the status part: count what is left, train and write nothing
                if not rows:
                    self.counting.setdefault(key, variant)
                continue
            if rows:  # the same run under another role: record it again, no training
                row = {**rows[0], "variant": variant, "selected_by": selected_by}
                append_row(self.csv, row)
                done[key].append(row)
                continue
            todo.setdefault(key, run)
            if (variant, selected_by) not in roles.setdefault(key, []):
                roles[key].append((variant, selected_by))
        if self.counting is not None:
            return

        def on_done(run: Run) -> None:
            r = json.loads((run.folder / RESULTS).read_text())
            opts = run.config
            for variant, selected_by in roles[self.key(run)]:
                append_row(self.csv, {
                    "dataset": run.dataset, "method": run.variant.method, "variant": variant,
                    "config": _options(run), "seed": run.seed,
                    "split": opts["split"], "selected_by": selected_by, "epochs": self.args.epochs,
                    "lr": f"{self.args.lr:g}", "p": opts.get("dropout", ""), "coeff_init": opts.get("coeff_init", ""),
                    "alpha": opts.get("alpha", ""), "train_top1": _pct(r.get("train_eval_top1")),
                    "val_top1": _pct(r.get("val_top1")), "test_top1": _pct(r.get("test_top1")),
                    "test_gain_last_quarter": _last_quarter_gain(run.folder / "metrics.jsonl"),
                    "seconds": round(r["wall_time_s"], 1), "backbone": self.args.backbone or "",
                    "cpu": CPU, "learned_p": _learned_p(r.get("learned")), "precision": self.precision})

        print(f"{len(todo)} run(s) to train ({len(wanted) - len(todo)} of {len(wanted)} wanted are in {self.csv})",
              flush=True)
        failures = execute_runs(list(todo.values()), jobs=self.args.jobs, threads=self.args.threads,
                                on_done=on_done)
        if failures:
            raise SystemExit("failed runs:\n  " + "\n  ".join(failures))

    # --------------------------------------------------------------------------------------- selection
    def grid(self, family: str) -> list[str]:
        if family == "mlae":
            return [f"mlae[dropout={p}]" for p in self.args.p_grid.split(",")]
        return [f"lora[alpha={a}]" for a in self.args.alpha_grid.split(",")]

    def chosen(self, dataset: str, family: str, by: str) -> str | None:
        """The grid label with the best val200 (``by="val"``) or seed-0 test (``by="test"``) top-1; ties go to
        the first in grid order. None while some of its rows are missing."""
        rows = {(r["variant"], r["selected_by"]): r for r in read_rows(self.csv) if r["dataset"] == dataset
                and r["epochs"] == str(self.args.epochs) and r["lr"] == f"{self.args.lr:g}"
                and r["backbone"] == (self.args.backbone or "") and row_precision(r) == self.precision}
        scores = []
        for label in self.grid(family):
            row = rows.get((label, "trial" if by == "val" else "candidate"))
            if row is None:
                return None
            scores.append((float(row["val_top1" if by == "val" else "test_top1"]), label))
        best = max(s for s, _ in scores)
        return next(label for s, label in scores if s == best)

    # --------------------------------------------------------------------------------------- parts
    def part_regime(self) -> None:
        self.execute([("lora", d, 0, "test", "lora-default", "fixed") for d in self.datasets])

    def part_select(self) -> None:
        self.execute([(label, d, 0, "val", label, "trial") for d in self.datasets
                      for family in ("mlae", "lora") for label in self.grid(family)])

    def part_test(self, selected_by: str | None = None) -> None:
        # --selected-by val: only the honest protocol's retrains (3 seeds of the val200 choice), so that its
        # verdicts come before the 12 candidates per task that "selected on test" needs; a later full test part
        # trains those and reuses every run already in the table.
        selections = ("val",) if (selected_by or self.args.selected_by) == "val" else ("val", "test")
        if "test" in selections:
            self.execute([(label, d, 0, "test", label, "candidate") for d in self.datasets
                          for family in ("mlae", "lora") for label in self.grid(family)])
        wanted = []
        for d in self.datasets:
            for family in ("mlae", "lora"):
                for by in selections:
                    label = self.chosen(d, family, by)
                    if label is None:
                        print(f"{d}: {family} trials or candidates missing; run the select part first",
                              file=sys.stderr)
                        continue
                    wanted += [(label, d, s, "test", family, by) for s in self.seeds]
        self.execute(wanted)

    def part_claims(self) -> None:
        by_variant: dict[str, list] = {}  # variant by variant, so that a study stopped early has whole claims
        for d in self.datasets:
            label = self.chosen(d, "mlae", "val")
            if label is None:
                print(f"{d}: no p chosen on validation yet; run the select part first", file=sys.stderr)
                continue
            p = parse_methods(label)[0].overrides["dropout"]
            text = self.args.claim_variants.replace("{p}", f"{p:g}")
            if "{lora_scale}" in text:
                lora = self.chosen(d, "lora", "val")
                if lora is None:
                    print(f"{d}: no LoRA alpha chosen on validation yet; run the select part first", file=sys.stderr)
                    continue
                text = text.replace("{lora_scale}", f"{lora_scale(lora):g}")
            for v in parse_methods(text):
                spec = v.method + ("[" + ",".join(f"{k}={_text(x)}" for k, x in v.overrides.items()) + "]"
                                   if v.overrides else "")
                by_variant.setdefault(v.label, []).extend((spec, d, s, "test", v.label, "fixed") for s in self.seeds)
        self.execute([w for runs in by_variant.values() for w in runs])

    def part_status(self) -> None:
        rows = read_rows(self.csv)
        mine = [r for r in rows if r["epochs"] == str(self.args.epochs) and r["lr"] == f"{self.args.lr:g}"
                and r["backbone"] == (self.args.backbone or "") and row_precision(r) == self.precision]
        print(f"{self.csv}: {len(rows)} rows, {len(mine)} with epochs {self.args.epochs}, lr {self.args.lr:g}, "
              f"backbone {self.args.backbone or 'embedded'}, {self.precision}")
        for d in self.datasets:
            by = {}
            for r in mine:
                if r["dataset"] == d:
                    by[r["selected_by"]] = by.get(r["selected_by"], 0) + 1
            chosen = {f"{f}/{s}": self.chosen(d, f, s) for f in ("mlae", "lora") for s in ("val", "test")}
            print(f"  {d}: {by or 'nothing yet'}; chosen: {chosen}")
        # What each part still has to train, in the order docs/REPRODUCTION.md runs them, and how long that is at
        # the median run time of this CPU's rows. Runs that need an earlier part's results (the choice on test
        # needs the candidates) are not counted until those exist.
        seconds = sorted(float(r["seconds"]) for r in mine if r["cpu"] == CPU and r["seconds"])
        left = {}
        jobs = self.args.jobs or cpu_cores()  # the parts' default: one job per core
        for name, part in (("select", self.part_select), ("test --selected-by val", lambda: self.part_test("val")),
                           ("claims", self.part_claims), ("test", lambda: self.part_test("both"))):
            self.counting = {}
            with contextlib.redirect_stderr(io.StringIO()):  # "run the select part first" notes
                part()
            left[name], self.counting = self.counting, None
        seen: set = set()
        for name, keys in left.items():  # a run counts in the first part that trains it
            new = [k for k in keys if k not in seen]
            seen |= set(keys)
            eta = (f", about {len(new) * seconds[len(seconds) // 2] / jobs / 3600:.1f} h at {jobs} jobs "
                   f"(median {seconds[len(seconds) // 2]:.0f} s per run on this CPU)" if seconds and new else "")
            print(f"left: {name}: {len(new)} run(s){eta}")
            if name == "claims" and new:  # the order the part trains them in
                per = Counter(keys[k] for k in new)
                print("  by variant: " + ", ".join(f"{v} {n}" for v, n in per.items()))


def _options(run: Run) -> str:
    return _canonical(run.variant.method, run.config)


def _canonical(method: str, options: dict) -> str:
    """A method's options as one JSON string per run identity (defaults filled in, settings that do not apply
    reset: mlae.recipes.Method.canonical_options), so rows written by earlier versions still match."""
    from mlae.recipes import get_method

    return json.dumps(get_method(method).canonical_options(options), sort_keys=True)


def _last_quarter_gain(metrics: Path) -> str:
    """Points the evaluated split gained between the evaluation at 3/4 of training and the last one: about 0
    once accuracy has stopped rising ("" with fewer than two evaluations)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    key = next((k for k in ("test_top1", "val_top1") if any(m.get(k) is not None for m in rows)), None)
    evals = [(m["epoch"], m[key]) for m in rows if key and m.get(key) is not None]
    if len(evals) < 2:
        return ""
    last_epoch, last = evals[-1]
    before = [acc for epoch, acc in evals[:-1] if epoch <= 0.75 * last_epoch]
    return f"{100 * (last - before[-1]):.2f}" if before else ""


def _learned_p(learned: dict | None) -> str:
    """MLAE-auto's learned masking probability per adapted layer, in layer order ("" for other methods); one
    layer's per-expert values are averaged."""
    if not learned:
        return ""
    ps = []
    for values in learned.values():
        p = values.get("dropout")
        ps.append(sum(p) / len(p) if isinstance(p, list) else p)
    return " ".join(f"{p:.3f}" for p in ps if p is not None)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def lora_scale(label: str) -> float:
    """The scale alpha / r of a LoRA grid label such as ``lora[alpha=32]`` (r from the label or LoRA's default)."""
    opts = {**{k: f.default for k, f in LoRAConfig.__dataclass_fields__.items()}, **parse_methods(label)[0].overrides}
    return float(opts["alpha"]) / int(opts["rank"])


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["regime", "select", "test", "claims", "status"])
    ap.add_argument("--datasets", default="suite:all")
    ap.add_argument("--seeds", default=SEEDS)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--p-grid", default=P_GRID)
    ap.add_argument("--alpha-grid", default=ALPHA_GRID)
    ap.add_argument("--claim-variants", default=CLAIM_VARIANTS, help="compare-style variants of the claims part; "
                    "{p} stands for the p chosen on validation, {lora_scale} for alpha / r of LoRA's")
    ap.add_argument("--selected-by", choices=["both", "val"], default="both",
                    help="test part: both selections (default), or only the val200 choice's retrains, whose "
                         "verdicts then come first (the 'selected on test' candidates follow in a later run)")
    ap.add_argument("--backbone", default=DEFAULT_EMBEDDED, help="as `mlae train --backbone`; the default names the "
                    "embedded version, so that rows stay unambiguous when the default embedded backbone changes")
    ap.add_argument("--precision", choices=["bf16", "fp32", "auto"], default="bf16",
                    help="as `mlae train --precision`. Every row of the committed table was trained under bf16 "
                         "autocast, so that is the default here: `auto` chooses per machine and would mix the two")
    ap.add_argument("--no-pretrained", action="store_true", help="(tests) random initial weights")
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--warmup-epochs", type=int)
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: one per free core)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default 1 per job)")
    ap.add_argument("--runs", default=os.environ.get("MLAE_REGIME_RUNS", "runs/paper_regime"),
                    help="run folders (not committed)")
    ap.add_argument("--csv", default=str(CSV), help="the committed table of results")
    args = ap.parse_args(argv)
    study = Study(args)
    getattr(study, f"part_{args.part}")()


if __name__ == "__main__":
    main()
