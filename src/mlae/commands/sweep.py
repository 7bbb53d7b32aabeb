"""`mlae sweep`: hyperparameter search with Optuna, selected on validation data, then retrained and tested once
(:mod:`mlae.experiments.sweep` has the protocol and the worker model).

    mlae sweep --dataset suite:dsprites_loc --epochs 20 --out sweeps/dsprites     # the paper's 6 × 6 grid
    mlae sweep --sampler tpe --trials 30 --param dropout=0:0.9 --param coeff_init=0.125:4:log --out ...
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .train import _fail, add_train_options, positive_int, train_options

__all__ = ["register", "run_sweep", "sweep_settings", "sweep_from_args"]

REFUSED = {"--split": " (trials use val, the final run test)", "--resume": " (rerun the command to continue a "
           "sweep)", "--overwrite": " (choose another --out or --study-name)"}
# The sweep's own options: argparse dest -> keyword of mlae.experiments.sweep.Sweep.
SETTINGS = {"config": "config", "param": "params", "space": "space", "sampler": "sampler", "trials": "trials",
            "prune": "prune", "sweep_out": "out", "storage": "storage", "study_name": "study_name",
            "stale_after": "stale_after", "final": "final"}
LEAVE_OUT = ("--out", "--config")  # the sweep's own


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="hyperparameter search (Optuna), chosen on validation data, then retrained and tested once",
        description="Search hyperparameters with Optuna. Every trial trains on train800 and is scored on val200 "
        "(top-1 after the last epoch); the best configuration is then retrained on train800val200 and tested once. "
        "The test set plays no part in the choice (some repositories in the field select on test; this command "
        "offers no way to). Train options (e.g. --dataset, --method, --epochs, --backbone, --config) set "
        "everything that is not searched.",
        epilog="Several workers (on one or many machines) share a study when they run the same command with "
        "the same --storage and --study-name; each takes trials the others have not. A killed worker loses "
        "at most its running trial, which is marked FAIL and queued again; rerun the command to continue.\n"
        "Outputs in --out: best.yaml (a recipe for `mlae train --config`), trials.csv, trials.md, heatmap.png, "
        "trials/<number>/ (one run folder per trial), final/ (the retrained best configuration).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p, LEAVE_OUT, REFUSED)
    g = p.add_argument_group("search")
    g.add_argument("--param", action="append", metavar="NAME=SPEC",
                   help="a searched setting (repeatable): NAME=V1,V2,... or NAME=LOW:HIGH[:log][:int] (tpe "
                   "only); any method option or training setting, e.g. dropout=0,0.5 coeff_init=0.25:4:log lr=...; "
                   "default: the paper's grid dropout {0,.1,.3,.5,.7,.9} × coeff_init {.125,.25,.5,1,2,4}")
    g.add_argument("--space", metavar="FILE", help="YAML search space: name: [values] | \"low:high[:log]\" | "
                   "{low, high, log, int}; --param entries override it")
    g.add_argument("--sampler", choices=["grid", "tpe"], default="grid",
                   help="grid: every combination once (default); tpe: Optuna's TPE over --trials trials")
    g.add_argument("--trials", type=int, metavar="N", help="tpe: number of trials of the study (default 30; a larger "
                   "number extends an existing study); grid: the whole grid is searched")
    g.add_argument("--no-prune", dest="prune", action="store_false",
                   help="train every trial to the end (default: stop trials whose validation accuracy is below "
                   "the median of earlier trials at the same epoch, after the first half of training)")
    g = p.add_argument_group("study and workers")
    g.add_argument("--out", dest="sweep_out", metavar="DIR", help="output folder (default "
                   "sweeps/<dataset>_<method>)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage shared by the workers: an RDB URL "
                   "(postgresql://user:pw@host/db with the postgres extra, sqlite:///path.db) or journal:PATH (a "
                   "journal file, safe for many processes and NFS); default sqlite:///<out>/study.db")
    g.add_argument("--study-name", metavar="NAME", help="study name in the storage (default: the --out folder's "
                   "name)")
    g.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="workers this command starts on this machine, each taking trials of the shared study "
                   "(default: on a CPU one 1-thread worker per free core, which beat one many-thread worker on small "
                   "ViTs; 1 with a GPU); --threads sets each worker's torch threads")
    g.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                   help="a running trial without heartbeat for this long is taken as dead (its worker on another "
                   "machine died); dead workers on this machine are detected at once (default 600)")
    g.add_argument("--final", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain the best configuration on train+val and test it once the study is complete "
                   "(done by one worker)")
    g.add_argument("--config", metavar="FILE", help="YAML recipe for every trial; options on the command line "
                   "win over it, searched settings win over both")
    p.set_defaults(func=run_sweep)


def sweep_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :class:`mlae.experiments.sweep.Sweep` that a parsed command line stands for."""
    return {"options": train_options(args, LEAVE_OUT, REFUSED),
            **{key: getattr(args, dest) for dest, key in SETTINGS.items()}}


def sweep_from_args(args: argparse.Namespace):
    """The study worker that a parsed `mlae sweep` command line describes."""
    from ..experiments.sweep import Sweep

    return Sweep(**sweep_settings(args))


def run_sweep(args: argparse.Namespace) -> int:
    from ..experiments.sweep import sweep

    try:
        sweep(jobs=args.jobs, target=_worker, **sweep_settings(args))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        return 130
    except Exception as err:
        return _fail(err)
    return 0


def _worker(settings: dict) -> None:
    """A worker process started by ``--jobs``: errors are printed as `mlae sweep` prints them, and its exit code
    tells the starting command that it failed (a user error, not only a crash, counts)."""
    from ..experiments.sweep import Sweep

    try:
        Sweep(**settings).run()
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        sys.exit(_fail(err))
