"""`mlae sweep`: hyperparameter search with Optuna, selected on validation data, then retrained and tested once.

    mlae sweep --dataset suite:dsprites_loc --epochs 20 --out sweeps/dsprites     # the paper's 6 × 6 grid
    mlae sweep --sampler tpe --trials 30 --param dropout=0:0.9 --param coeff_init=0.125:4:log --out ...

Protocol: every trial trains on train800 and is scored on val200 (``split="val"``, top-1 after the last epoch);
the best trial's configuration is then retrained on train800val200 and evaluated once on test (``split="test"``).
The test set never takes part in the choice. (Several repositories in the field pick hyperparameters by test
accuracy; there is deliberately no option for that here.)

Workers: the study lives in a storage (``<out>/study.db`` by default; ``--storage postgresql://...`` or
``--storage journal:PATH`` to share it); every worker runs the same command and takes trials from it. Grid points
are enqueued once, by the worker that creates the study, and each worker pops one atomically, so no point is
trained twice. A running trial records its worker (host:pid:token) and a heartbeat; a RUNNING trial whose worker
is dead (same host) or whose heartbeat is older than ``--stale-after`` is marked FAIL and its parameters are
enqueued again (the new trial resumes from the dead one's checkpoint when there is one). The worker that finds the
study complete retrains the best configuration (``--final``, guarded by a file lock in ``--out``).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..recipes import RecipeError, get_method
from ..utils import LOCK_FILE, atomic_write_text, cpu_jobs, pid_alive, pyplot, save_png
from .compare import given_train_options, refuse_options, resolve_config, train_parent

__all__ = ["Param", "DEFAULT_SPACE", "parse_param", "load_space", "run_sweep", "write_reports"]

# The MLAE paper's search grid (expert dropout p × coefficient init).
DEFAULT_SPACE = {"dropout": (0.0, 0.1, 0.3, 0.5, 0.7, 0.9), "coeff_init": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)}
# TPE's default: the same box, continuous.
DEFAULT_RANGES = {"dropout": "0:0.9", "coeff_init": "0.125:4:log"}
NOT_SEARCHABLE = {"dataset", "method", "method_options", "out", "runs_dir", "split", "resume", "overwrite",
                  "progress", "device", "threads", "data_root", "cache"}
# Settings that may differ between the workers of one study (machine-specific or bookkeeping).
WORKER_LOCAL = ("data_root", "device", "threads", "precision", "out", "runs_dir", "checkpoint_every", "progress",
                "cache")
CHECKPOINT = "checkpoint.safetensors"


# --------------------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched setting: discrete ``values``, or a range ``low..high`` (log-scaled, or integer)."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> Any:
        if self.values is not None:
            return list(self.values)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "") + (":int" if self.integer else "")


def _converter(name: str, method: str):
    from ..engine import TrainConfig
    from ..recipes import _bool

    options = {o.name: o for o in get_method(method).options}
    if name in options:
        return options[name].type
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_SEARCHABLE
    if name not in fields:
        raise RecipeError(f"cannot search {name!r}: not an option of method {method!r} nor a training setting "
                          f"(choose from {', '.join(sorted(options) + sorted(fields))})")
    default = getattr(TrainConfig(), name)
    return _bool if isinstance(default, bool) else type(default) if default is not None else str


def parse_param(text: str, method: str) -> Param:
    """``dropout=0,0.5`` (values), ``coeff_init=0.25:4:log`` (log range), ``lr=1e-4:1e-2:log``, ``rank=2:16:int``."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not spec.strip():
        raise RecipeError(f"--param takes NAME=V1,V2,... or NAME=LOW:HIGH[:log][:int], not {text!r}")
    return _param(name, spec.strip(), method)


def _param(name: str, spec: Any, method: str) -> Param:
    convert = _converter(name, method)
    if isinstance(spec, dict):
        return Param(name, low=float(spec["low"]), high=float(spec["high"]), log=bool(spec.get("log", False)),
                     integer=bool(spec.get("int", False)))
    if isinstance(spec, (list, tuple)):
        return Param(name, values=tuple(v if isinstance(v, (list, bool)) else convert(str(v)) for v in spec))
    spec = str(spec)
    if ":" in spec:
        low, high, *flags = spec.split(":")
        if set(flags) - {"log", "int"}:
            raise RecipeError(f"{name}={spec}: a range is LOW:HIGH[:log][:int]")
        p = Param(name, low=float(low), high=float(high), log="log" in flags, integer="int" in flags)
        if not p.low < p.high or (p.log and p.low <= 0):
            raise RecipeError(f"{name}={spec}: need LOW < HIGH (and LOW > 0 for :log)")
        return p
    return Param(name, values=tuple(convert(v.strip()) for v in spec.split(",") if v.strip()))


def load_space(path: str, method: str) -> list[Param]:
    """A YAML mapping ``name: [values]`` or ``name: "low:high[:log]"`` or ``name: {low:, high:, log:, int:}``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the search space must map setting names to values or ranges")
    return [_param(str(k).replace("-", "_"), v, method) for k, v in data.items()]


def build_space(args: argparse.Namespace, method: str) -> list[Param]:
    params: dict[str, Param] = {}
    if args.space:
        params.update((p.name, p) for p in load_space(args.space, method))
    for text in args.param or []:
        p = parse_param(text, method)
        params[p.name] = p
    if not params:
        if args.sampler == "grid":
            params = {k: _param(k, list(v), method) for k, v in DEFAULT_SPACE.items()}
        else:
            params = {k: _param(k, v, method) for k, v in DEFAULT_RANGES.items()}
    if args.sampler == "grid":
        ranges = [p.name for p in params.values() if p.values is None]
        if ranges:
            raise RecipeError(f"--sampler grid needs lists of values, not ranges ({', '.join(ranges)}); "
                              "use --sampler tpe for ranges")
    return list(params.values())


# --------------------------------------------------------------------------------------------- command


OWN = {"sweep_out", "param", "space", "sampler", "trials", "prune", "storage", "study_name", "final",
       "stale_after", "config", "jobs"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", parents=[train_parent()], conflict_handler="resolve",
        help="hyperparameter search (Optuna), chosen on validation data, then retrained and tested once",
        description="Search hyperparameters with Optuna. Every trial trains on train800 and is scored on val200 "
        "(top-1 after the last epoch); the best configuration is then retrained on train800val200 and tested once. "
        "The test set plays no part in the choice (some repositories in the field select on test; this command "
        "offers no way to)." + " Train options (e.g. --dataset, --method, --epochs, --backbone, --config) set everything that is not "
        "searched.",
        epilog="Several workers (on one or many machines) share a study when they run the same command with "
        "the same --storage and --study-name; each takes trials the others have not. A killed worker loses "
        "at most its running trial, which is marked FAIL and queued again; rerun the command to continue.\n"
        "Outputs in --out: best.yaml (a recipe for `mlae train --config`), trials.csv, trials.md, heatmap.png, "
        "trials/<number>/ (one run folder per trial), final/ (the retrained best configuration).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("search")
    g.add_argument("--param", action="append", metavar="NAME=SPEC",
                   help="a searched setting (repeatable): NAME=V1,V2,... or NAME=LOW:HIGH[:log][:int] (tpe "
                   "only); any method option or training setting, e.g. dropout=0,0.5 coeff_init=0.25:4:log lr=...; "
                   "default: the paper's grid dropout {0,.1,.3,.5,.7,.9} × coeff_init {.125,.25,.5,1,2,4}")
    g.add_argument("--space", metavar="FILE", help="YAML search space: name: [values] | \"low:high[:log]\" | "
                   "{low, high, log, int}; --param entries override it")
    g.add_argument("--sampler", choices=["grid", "tpe"], default="grid",
                   help="grid: every combination once (default); tpe: Optuna's TPE over --trials trials")
    g.add_argument("--trials", type=int, metavar="N", help="tpe: number of trials of the study (default 30); "
                   "grid: the whole grid is searched")
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
    g.add_argument("--jobs", type=int, default=None, metavar="N",
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
    refuse_options(p, {"--split": " (trials use val, the final run test)", "--resume": " (rerun the command to "
                       "continue a sweep)", "--overwrite": " (choose another --out or --study-name)"})
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from .train import _fail

    try:
        jobs, threads = _workers(args)
        if jobs > 1:
            return _run_workers(args, jobs, threads)
        return Sweep(args).run()
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        return 130
    except Exception as err:
        return _fail(err)


def _workers(args: argparse.Namespace) -> tuple[int, int | None]:
    """(workers, torch threads each) for this machine: see --jobs."""
    import torch

    threads = getattr(args, "threads", None)
    if args.jobs is not None and args.jobs < 1:
        raise RecipeError("--jobs must be >= 1")
    device = getattr(args, "device", None)
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return args.jobs or 1, threads
    return cpu_jobs(args.trials or 1_000, args.jobs, threads)


def _run_workers(args: argparse.Namespace, jobs: int, threads: int | None) -> int:
    """Start ``jobs`` worker processes of this sweep (the same arguments, one worker and ``threads`` threads each)
    and wait for them. They share the study through its storage, as workers started by hand do."""
    import multiprocessing

    each = f" × {threads} torch thread(s) each" if threads else ""
    print(f"{jobs} sweep workers{each} on this machine (--jobs / --threads override)", flush=True)
    worker_args = argparse.Namespace(**{**vars(args), "jobs": 1, "threads": threads})
    # spawn, not fork: a forked child would inherit torch's OpenMP state, which deadlocks under fork
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_sweep, args=(worker_args,)) for _ in range(jobs)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join()
    except KeyboardInterrupt:
        for w in workers:  # the workers got the same SIGINT and are failing their trials for a later retry
            w.join()
        raise
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        print(f"mlae: error: {len(failed)} of {jobs} sweep workers failed (exit {', '.join(map(str, failed))}); "
              "rerun the same command to continue the sweep", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- the sweep


def open_storage(url: str | None, out: Path):
    import optuna

    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # workers starting together may race to create the tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except ImportError as err:  # SQLAlchemy found no driver for the URL's database
            scheme = url.split("://")[0]  # not the rest: it may hold a password
            raise RecipeError(f"--storage {scheme}://...: no database driver for it ({err.__cause__ or err}); for "
                              "PostgreSQL: pip install 'mlae[postgres]' (psycopg), or name an installed driver "
                              "in the URL (postgresql+psycopg2://...)") from err
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)


def _enqueue(study, params: dict, **attrs) -> None:
    """Queue a trial with fixed ``params``, kept in its user attrs as well: a worker that fails the trial later
    (its worker died, perhaps before suggesting them) queues them again from there."""
    study.enqueue_trial(params, user_attrs={"params": params, **attrs})


class Heartbeat:
    """Records ``heartbeat`` (unix time) on a running trial every ``interval`` seconds from a thread."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the storage may be briefly locked; the next beat will do
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Sweep:
    def __init__(self, args: argparse.Namespace):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.args = args
        given = given_train_options(args, OWN)
        if args.config:
            given["config"] = args.config
        self.base_cfg = resolve_config(given)
        self.method = self.base_cfg.method
        self.space = build_space(args, self.method)
        if args.sampler == "grid" and args.trials is not None:
            raise RecipeError("--trials applies to --sampler tpe; the grid sampler searches the whole grid")
        self.n_trials = args.trials or 30
        if self.n_trials < 1:
            raise RecipeError("--trials must be >= 1")
        from ..recipes import dataset_key

        self.out = Path(args.sweep_out or Path("sweeps") / f"{dataset_key(self.base_cfg.dataset)}_{self.method}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.study_name = args.study_name or self.out.resolve().name
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.base = {k: v for k, v in self.base_cfg.to_dict().items() if k not in ("out", "runs_dir")}
        self.study = self._open_study(open_storage(args.storage, self.out))

    # ----------------------------------------------------------------------------- study

    def search_spec(self) -> dict:
        """What every worker of a study must agree on."""
        return {"sampler": self.args.sampler, "space": {p.name: p.describe() for p in self.space},
                "trials": self.n_trials if self.args.sampler == "tpe" else None,
                "config": {k: v for k, v in sorted(self.base.items()) if k not in WORKER_LOCAL}}

    def grid(self) -> list[dict]:
        import itertools

        names = [p.name for p in self.space]
        return [dict(zip(names, combo)) for combo in itertools.product(*(p.values for p in self.space))]

    def _open_study(self, storage):
        import optuna

        if self.args.sampler == "grid":
            # Every grid point is enqueued when the study is created, so the sampler never chooses one (optuna's
            # GridSampler would hand a running point to a second worker once the grid is exhausted).
            sampler = optuna.samplers.RandomSampler(seed=0)
        else:
            # Each worker draws from its own stream so that workers starting together do not propose the same
            # points; constant_liar keeps running trials in view.
            sampler = optuna.samplers.TPESampler(seed=hash((self.base_cfg.seed, self.worker)) % 2**31,
                                                 constant_liar=True)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, self.base_cfg.epochs // 2))
                  if self.args.prune else optuna.pruners.NopPruner())
        spec = json.loads(json.dumps(self.search_spec()))
        try:
            study = optuna.create_study(storage=storage, study_name=self.study_name, direction="maximize",
                                        sampler=sampler, pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner)
            self._join(study, spec)
            return study
        study.set_user_attr("search", spec)
        study.set_user_attr("creator", self.worker)
        if self.args.sampler == "grid":
            for i, params in enumerate(self.grid()):
                _enqueue(study, params, grid_point=i)
        study.set_user_attr("ready", True)
        return study

    def _join(self, study, spec: dict) -> None:
        """Wait for the creating worker to set the study up, then check that we search the same thing."""
        deadline = time.time() + 120
        while not study.user_attrs.get("ready"):
            if time.time() > deadline:
                self._finish_setup(study, spec)
                break
            time.sleep(0.5)
        theirs = study.user_attrs.get("search")
        if theirs != spec:
            diff = sorted(k for k in set(theirs or {}) | set(spec) if (theirs or {}).get(k) != spec.get(k))
            detail = diff
            if "config" in diff:
                a, b = theirs["config"], spec["config"]
                detail = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise RecipeError(f"study {self.study_name!r} in this storage searches something else ("
                              f"{'; '.join(map(str, detail[:6]))}); use the same options, or another --study-name "
                              "/ --out")

    def _finish_setup(self, study, spec: dict) -> None:
        """The creating worker died while enqueueing the grid: enqueue the points nobody has."""
        print(f"note: study {self.study_name!r} was left half set up by its creator; completing it", file=sys.stderr)
        if study.user_attrs.get("search") is None:
            study.set_user_attr("search", spec)
        if self.args.sampler == "grid":
            have = {t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False)}
            for i, params in enumerate(self.grid()):
                if i not in have:
                    _enqueue(study, params, grid_point=i)
        study.set_user_attr("ready", True)

    def fail_stale(self) -> list[int]:
        """Mark RUNNING trials of dead workers FAIL and queue their parameters again; returns their numbers."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        host = socket.gethostname()
        now = time.time()
        failed = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
            dead = now - beat > self.args.stale_after
            if worker and worker != self.worker:
                w_host, pid, _ = worker.rsplit(":", 2)
                # our own pid under another token is a previous process that had our pid
                dead |= w_host == host and (int(pid) == os.getpid() or not pid_alive(int(pid)))
            if not dead:
                continue
            try:
                # Atomic in every storage: of several workers failing the same trial, one succeeds; the others
                # find it finished (ValueError) or lose the race inside the storage (UpdateFinishedTrialError).
                self.study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, UpdateFinishedTrialError):
                continue
            params = t.user_attrs.get("params") or t.params
            if params:  # a TPE trial killed before its first suggest() has nothing to run again
                self._requeue(t, params)
            print(f"trial {t.number} of dead worker {worker or '?'} marked FAIL"
                  + ("; its parameters are queued again" if params else ""), file=sys.stderr, flush=True)
            failed.append(t.number)
        return failed

    def _requeue(self, t, params: dict) -> None:
        extra = {"grid_point": t.user_attrs["grid_point"]} if "grid_point" in t.user_attrs else {}
        _enqueue(self.study, params, retry_of=t.number, **extra)

    def next_trial(self):
        """A queued trial (``study.ask`` pops one atomically), or, for TPE with budget left, a new one."""
        from optuna.trial import TrialState

        while True:
            queued = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not queued and (self.args.sampler == "grid" or not self._budget_left()):
                return None
            trial = self.study.ask()
            trial.set_user_attr("worker", self.worker)  # at once, so that a kill from here on is noticed
            if self.args.sampler == "tpe" or "grid_point" in trial.user_attrs:
                return trial
            # Another worker popped the last queued point between our look and ask(), which then made a new
            # trial: there is no grid point for it. Close it (marked spare, left out of the reports), look again.
            trial.set_user_attr("spare", True)
            self.study.tell(trial, state=TrialState.FAIL)

    def _budget_left(self) -> bool:
        from optuna.trial import TrialState

        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        return len(self.study.get_trials(deepcopy=False, states=counted)) < self.n_trials

    def complete(self) -> bool:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return False
        if self.args.sampler == "tpe":
            return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) >= self.n_trials
        return True

    # ----------------------------------------------------------------------------- trials

    def run_trial(self, trial) -> None:
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from ..engine import TrainConfig, train
        from ..errors import MLAEError

        params = {p.name: p.suggest(trial) for p in self.space}
        trial.set_user_attr("heartbeat", time.time())
        folder = self.out / "trials" / str(trial.number)
        resume = False
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None:
            old = self.out / "trials" / str(retry_of)
            if (old / CHECKPOINT).exists() and not folder.exists():
                os.replace(old, folder)  # continue the dead trial's run rather than start over
                # fail_stale judged its worker dead, on this host or (by its heartbeat) on another one
                (folder / LOCK_FILE).unlink(missing_ok=True)
                resume = True
                for line in (folder / "metrics.jsonl").read_text().splitlines():
                    m = json.loads(line)
                    if m.get("val_top1") is not None:
                        trial.report(m["val_top1"], m["epoch"])
        trial.set_user_attr("folder", str(folder))
        cfg = TrainConfig.from_dict({**self.base, **params, "split": "val", "out": str(folder), "resume": resume,
                                     "overwrite": not resume, "progress": False})
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"trial {trial.number} ({label}) started{' (resumed)' if resume else ''}", flush=True)

        def on_epoch_end(epoch: int, metrics: dict) -> None:
            value = metrics.get("val_top1")
            if value is None:
                return
            trial.report(value, epoch)
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val top-1 {value:.4f} after epoch {epoch}")

        beat = max(1.0, min(60.0, self.args.stale_after / 5))
        try:
            with Heartbeat(trial, beat):
                results = train(cfg, on_epoch_end=on_epoch_end)
        except optuna.TrialPruned as err:
            if self._finish(trial, state=TrialState.PRUNED):
                print(f"trial {trial.number} pruned: {err}", flush=True)
            return
        except UpdateFinishedTrialError:  # from trial.report(): another worker closed the trial meanwhile
            self._finish(trial, state=TrialState.FAIL)  # prints what happened
            return
        except BaseException as err:
            ours = self._finish(trial, state=TrialState.FAIL, error=f"{type(err).__name__}: {err}"[:500])
            if isinstance(err, KeyboardInterrupt):  # an interruption, not a bad configuration: queue it again
                if ours:
                    self._requeue(trial, params)
                raise
            if not isinstance(err, (MLAEError, ValueError)):
                raise
            print(f"trial {trial.number} failed: {err}", file=sys.stderr, flush=True)
            return
        if self._finish(trial, results["top1"], best_val_top1=results.get("best_val_top1"), epochs=results["epochs"],
                        wall_time_s=results["wall_time_s"], trainable_params=results["params"]["trainable"]):
            print(f"trial {trial.number} ({label}): val top-1 {100 * results['top1']:.2f}%", flush=True)

    def _finish(self, trial, value: float | None = None, state=None, **attrs) -> bool:
        """Record the outcome of our ``trial``; False, with a note, when another worker closed it first (it took
        this worker for dead and queued the trial again, so this run's result is dropped)."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            # Not tell(skip_if_finished=True): it hides whether this call or another worker closed the trial, and
            # only the worker that closed it may queue it again. ValueError: it was closed before this call.
            self.study.tell(trial, value, state=state)
        except (ValueError, UpdateFinishedTrialError):
            print(f"trial {trial.number} was closed by another worker meanwhile (no heartbeat within --stale-after) "
                  "and queued again; this worker's result for it is dropped", file=sys.stderr, flush=True)
            return False
        return True

    def run(self) -> int:
        self.fail_stale()
        ran = 0
        while True:
            trial = self.next_trial()
            if trial is None:
                break
            self.run_trial(trial)
            ran += 1
            self.fail_stale()
        complete = self.complete()
        final = None
        if complete and self.args.final:
            final = self.run_final()
        elif not complete:
            print(f"this worker ran {ran} trial(s); others are still running — the worker that completes the study "
                  "writes the final result", flush=True)
        write_reports(self.study, self.out, self.space, self.base, final, self.args.sampler)
        print(f"wrote {self.out / 'trials.md'}, {self.out / 'best.yaml'}, {self.out / 'heatmap.png'}", flush=True)
        return 0

    # ----------------------------------------------------------------------------- final

    def run_final(self) -> dict | None:
        """Retrain the best trial's configuration on train+val and test it (one worker: a file lock)."""
        import fcntl

        import yaml

        from ..engine import RESULTS, TrainConfig, train

        best = best_trial(self.study)
        if best is None:
            print("no trial completed; nothing to retrain", file=sys.stderr)
            return None
        folder = self.out / "final"
        with open(self.out / "final.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("another worker is running the final retraining", flush=True)
                return None
            d = {**self.base, **best.params, "split": "test", "out": str(folder), "progress": False}
            if (folder / RESULTS).exists() and (folder / "config.yaml").exists():
                done = yaml.safe_load((folder / "config.yaml").read_text())
                if all(done.get(k) == v for k, v in best.params.items()):
                    return json.loads((folder / RESULTS).read_text())
            resume = (folder / CHECKPOINT).exists() and (folder / "config.yaml").exists() and all(
                yaml.safe_load((folder / "config.yaml").read_text()).get(k) == v for k, v in best.params.items())
            print(f"final: retraining trial {best.number}'s configuration on train+val, testing once", flush=True)
            results = train(TrainConfig.from_dict({**d, "resume": resume, "overwrite": not resume}))
            print(f"final: test top-1 {100 * results['top1']:.2f}% (trial {best.number}, val top-1 "
                  f"{100 * best.value:.2f}%)", flush=True)
            return results


# --------------------------------------------------------------------------------------------- reports


def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def trial_rows(study, space: list[Param]) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("spare"):  # opened and closed by Sweep.next_trial, never run
            continue
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = t.value if t.value is not None else (t.intermediate_values[last] if last is not None else None)
        params = t.params or t.user_attrs.get("params", {})
        rows.append({"number": t.number, "state": t.state.name,
                     **{p.name: params.get(p.name, "") for p in space},
                     "val_top1": "" if value is None else round(100 * value, 4),
                     "best_val_top1": "" if t.user_attrs.get("best_val_top1") is None else
                     round(100 * t.user_attrs["best_val_top1"], 4),
                     "epochs_run": last if last is not None else "",
                     "duration_s": "" if duration is None else round(duration, 1),
                     "retry_of": t.user_attrs.get("retry_of", ""),
                     "worker": t.user_attrs.get("worker", ""), "error": t.user_attrs.get("error", ""),
                     "folder": t.user_attrs.get("folder", "")})
    return rows


def write_reports(study, out: Path, space: list[Param], base: dict, final: dict | None, sampler: str) -> None:
    """trials.csv, trials.md, best.yaml and heatmap.png from the study's current state."""
    import io

    import yaml

    rows = trial_rows(study, space)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())

    best = best_trial(study)
    if final is None and (out / "final" / "results.json").exists() and best is not None:
        done = yaml.safe_load((out / "final" / "config.yaml").read_text())
        if all(done.get(k) == v for k, v in best.params.items()):
            final = json.loads((out / "final" / "results.json").read_text())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [f"# mlae sweep: {study.study_name}", "",
             f"{base.get('method')} on {base.get('dataset')}, {base.get('epochs')} epochs, sampler {sampler}; "
             "trials train on train800 and are scored on val200 (top-1 after the last epoch; pruned trials show "
             "their last reported value). The best configuration is then retrained on train800val200 and tested "
             "once: the test set plays no part in the choice.", "",
             "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())), ""]
    if best is not None:
        lines.append(f"**Best (val):** trial {best.number}, " + ", ".join(f"{k}={v}" for k, v in best.params.items())
                     + f": val top-1 {100 * best.value:.2f}%")
    if final is not None:
        lines.append(f"**Final (test):** {100 * final['top1']:.2f}% top-1 on {final['eval_split']} after retraining "
                     "on train+val (final/results.json)")
    header = ["#", "state", *[p.name for p in space], "val top-1 (%)", "epochs", "time (s)", "note"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        note = []
        if best is not None and r["number"] == best.number:
            note.append("**best**")
        if r["retry_of"] != "":
            note.append(f"re-run of {r['retry_of']}")
        if r["error"]:
            note.append(str(r["error"]).replace("|", "/")[:80])
        cells = [r["number"], r["state"].lower(),
                 *[f"{r[p.name]:.4g}" if isinstance(r[p.name], float) else r[p.name] for p in space],
                 "" if r["val_top1"] == "" else f"{r['val_top1']:.2f}", r["epochs_run"], r["duration_s"],
                 "; ".join(note)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")

    if best is not None:
        recipe = {k: v for k, v in base.items() if k not in ("threads", "progress")}
        recipe.update(best.params)
        recipe["split"] = "test"
        head = [f"# mlae sweep {study.study_name}: best of {counts.get('COMPLETE', 0)} completed trials, selected on "
                "val200 (trained on train800)",
                f"# trial {best.number}: val top-1 {100 * best.value:.2f}%; "
                + ", ".join(f"{k}={v}" for k, v in best.params.items())]
        if final is not None:
            head.append(f"# retrained on train800val200: test top-1 {100 * final['top1']:.2f}% (final/results.json)")
        head.append("# mlae train --config best.yaml   trains this configuration")
        atomic_write_text(out / "best.yaml", "\n".join(head) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    _heatmap(out / "heatmap.png", rows, space)


def _heatmap(path: Path, rows: list[dict], space: list[Param]) -> None:
    """Validation top-1 over two searched settings (dropout × coeff_init when searched): a grid of annotated
    cells for discrete values (the best over any other settings), a scatter plot for ranges."""
    plt = pyplot()

    names = [p.name for p in space]
    axes = [n for n in ("coeff_init", "dropout") if n in names] if {"dropout", "coeff_init"} <= set(names) else \
        names[:2]
    params = {p.name: p for p in space}
    scored = [r for r in rows if r["val_top1"] != "" and r["state"] in ("COMPLETE", "PRUNED")]
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    if len(axes) == 1:
        axes = axes + [None]
    xp, yp = params[axes[0]], params[axes[1]] if axes[1] else None
    if xp.values is not None and (yp is None or yp.values is not None):
        import numpy as np

        xs, ys = list(xp.values), list(yp.values) if yp else [""]
        grid = np.full((len(ys), len(xs)), np.nan)
        pruned = np.zeros_like(grid, dtype=bool)
        for r in scored:
            if r[xp.name] not in xs or (yp and r[yp.name] not in ys):
                continue
            i = ys.index(r[yp.name]) if yp else 0
            j = xs.index(r[xp.name])
            if np.isnan(grid[i, j]) or r["val_top1"] > grid[i, j]:
                grid[i, j], pruned[i, j] = r["val_top1"], r["state"] == "PRUNED"
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        fig.colorbar(im, ax=ax, label="val top-1 (%)")
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(len(ys)):
            for j in range(len(xs)):
                v = grid[i, j]
                text = "–" if np.isnan(v) else f"{v:.1f}" + ("\npruned" if pruned[i, j] else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if np.isnan(v) or v < mid else "black")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([f"{v:g}" if isinstance(v, float) else str(v) for v in xs])
        ax.set_yticks(range(len(ys)))
        ax.set_yticklabels([f"{v:g}" if isinstance(v, float) else str(v) for v in ys])
    else:
        sc = ax.scatter([r[xp.name] for r in scored], [r[yp.name] if yp else 0 for r in scored],
                        c=[r["val_top1"] for r in scored], cmap="viridis", s=60)
        fig.colorbar(sc, ax=ax, label="val top-1 (%)")
        for r in scored:
            ax.annotate(f"{r['val_top1']:.1f}", (r[xp.name], r[yp.name] if yp else 0), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        if xp.log:
            ax.set_xscale("log")
        if yp is not None and yp.log:
            ax.set_yscale("log")
    ax.set_xlabel(xp.name)
    ax.set_ylabel(yp.name if yp else "")
    extra = [n for n in names if n not in axes]
    ax.set_title("validation top-1 (%)" + (f" — best over {', '.join(extra)}" if extra else ""))
    fig.tight_layout()
    save_png(fig, path)
