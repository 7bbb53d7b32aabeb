"""`mlae compare`: methods × datasets × seeds in one command, one table (:mod:`mlae.experiments.compare`).

    mlae compare --methods linear,lora,mlae --datasets suite:all --seeds 0,1,42 --out runs/compare --epochs 20

Method variants name a method plus option overrides in brackets; each is a column of its own:

    --methods "mlae,mlae[dropout=0],mlae[adaptive=false],lora,lora[lr=1e-3,rank=4]"
    --methods "nomask=mlae[dropout=0],mlae"        # an explicit column label before '='
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .train import _fail, add_train_options, positive_int, train_options

__all__ = ["register", "run_compare", "report"]

# Train options the comparison replaces by its own: it sets them per run, or does what they ask by itself.
REFUSED = {"--dataset": "; use --datasets", "--method": "; use --methods", "--seed": "; use --seeds",
           "--resume": " (finished runs are skipped and interrupted ones resumed automatically)",
           "--overwrite": " (delete a run folder to redo it)",
           "--quiet": " (each run's output goes to its train.log)"}
LEAVE_OUT = ("--out", "--config")  # the comparison's own


def register(subparsers) -> None:
    from ..engine import DEFAULT_DATASET

    p = subparsers.add_parser(
        "compare",
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
    add_train_options(p, LEAVE_OUT, REFUSED)
    g = p.add_argument_group("comparison")
    g.add_argument("--methods", required=True, metavar="LIST",
                   help="comma-separated methods or variants METHOD[opt=value,...] (see below)")
    g.add_argument("--datasets", default=DEFAULT_DATASET, metavar="SPECS",
                   help=f"comma-separated dataset specs; suite:all / vtab:all / fgvc:all expand (default "
                   f"{DEFAULT_DATASET})")
    g.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default 0; the paper: 0,1,42)")
    g.add_argument("--out", dest="compare_out", required=True, metavar="DIR",
                   help="output folder: runs/<label>/<prefix>-<dataset>/s<seed> (e.g. runs/lora/vtab-cifar/s0), "
                   "results.csv, summary.md, ...")
    g.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="runs in parallel (default: one per GPU with CUDA_VISIBLE_DEVICES; on CPU one 1-thread "
                   "job per free core, which beat one many-thread job on small ViTs)")
    g.add_argument("--config", metavar="FILE", help="YAML recipe for every run (its per_dataset entries apply); "
                   "options on the command line and variant overrides win over it")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from ..experiments.compare import compare

    options = train_options(args, LEAVE_OUT, REFUSED)
    return report(lambda: compare(args.methods, args.datasets, args.seeds, args.compare_out, options=options,
                                  config=args.config, jobs=args.jobs))


def report(run: Callable) -> int:
    """Run a comparison (``run()`` returns a :class:`~mlae.experiments.compare.Comparison`: `mlae compare`, or an
    ablation preset) and print its summary and failed runs, or why it stopped."""
    try:
        result = run()
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as err:
        return _fail(err)
    print(result.summary)
    if result.failures:
        print(f"mlae: error: {len(result.failures)} run(s) failed:\n  " + "\n  ".join(result.failures),
              file=sys.stderr)
        return 1
    return 0
