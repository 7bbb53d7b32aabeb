"""Hyperparameter search with Optuna, selected on validation data, then retrained and tested once: the library
behind ``mlae sweep``.

    from mlae.experiments.sweep import sweep
    sweep({"dataset": "suite:dsprites_loc", "epochs": 20}, out="sweeps/dsprites")      # the paper's 6 × 6 grid
    sweep({...}, sampler="tpe", trials=30, params=["dropout=0:0.9", "coeff_init=0.125:4:log"], out=...)

Protocol: every trial trains on train800 and is scored on val200 (``split="val"``, top-1 after the last epoch);
the best trial's configuration is then retrained on train800val200 and evaluated once on test (``split="test"``).
The test set never takes part in the choice. (Several repositories in the field pick hyperparameters by test
accuracy; there is deliberately no option for that here.)

Workers: the study lives in a storage (``<out>/study.db`` by default; ``postgresql://...`` or ``journal:PATH`` to
share it); every worker is built with the same arguments and takes trials from it. Grid points are enqueued once,
by the worker that creates the study, and each worker pops one atomically, so no point is trained twice. A running
trial records its worker (host:pid:token) and a heartbeat; a RUNNING trial whose worker is dead (same host) or
whose heartbeat is older than ``stale_after`` is marked FAIL and its parameters are enqueued again (the new trial
resumes from the dead one's checkpoint when there is one). The worker that finds the study complete retrains the
best configuration (``final``, guarded by a file lock in ``out``).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MLAEError
from ..files import LOCK_FILE, pid_alive
from ..hardware import cpu_jobs
from ..recipes import RecipeError, canonical_config, get_method
from ..rundir import CHECKPOINT, RESULTS, WORKER_LOCAL, check_outside_datasets
from .compare import resolve_config
from .sweep_report import best_trial, write_reports
from .sweep_space import build_space

__all__ = ["Sweep", "SweepError", "sweep", "worker_plan", "run_workers", "open_storage"]


class SweepError(MLAEError, RuntimeError):
    """Workers of this machine's share of a study failed; rerunning the same sweep continues it."""


# --------------------------------------------------------------------------------------------- storage


def open_storage(url: str | None, out: Path):
    import optuna

    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise RecipeError(f"--storage takes a database URL (sqlite:///PATH/study.db, postgresql://USER@HOST/DB) or "
                          f"journal:PATH, not {url!r}")
    scheme = url.split("://")[0]  # not the rest in messages: it may hold a password
    if scheme.startswith("sqlite") and url.startswith(f"{scheme}:///") and len(url) > len(scheme) + 4:
        Path(url[len(scheme) + 4:]).expanduser().parent.mkdir(parents=True, exist_ok=True)  # as journal: does
    kwargs = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # workers starting together may race to create the tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except ImportError as err:  # SQLAlchemy found no driver for the URL's database
            raise RecipeError(f"--storage {scheme}://...: no database driver for it ({err.__cause__ or err}); for "
                              "PostgreSQL: pip install 'mlae[postgres]' (psycopg), or name an installed driver "
                              "in the URL (postgresql+psycopg2://...)") from err
        except Exception as err:
            import sqlalchemy.exc

            if isinstance(err, sqlalchemy.exc.ArgumentError):
                raise RecipeError(f"--storage {scheme}://...: not a database URL SQLAlchemy can read ({err})") from None
            if attempt == 4:
                if isinstance(err, sqlalchemy.exc.OperationalError):
                    raise RecipeError(f"--storage {scheme}://...: cannot open the database ({err.orig}); check the "
                                      "path, or that the server runs and the user may connect") from None
                raise
            time.sleep(0.5 + attempt)


def _comparable(config: dict) -> dict:
    """A study's base configuration as workers compare it: canonical (recipes.canonical_config, so options added
    since, or settings that do not apply, do not part two workers of one search), without worker-local keys."""
    return json.loads(json.dumps({k: v for k, v in sorted(canonical_config(config).items())
                                  if k not in WORKER_LOCAL}))


def _failed(trials: list) -> list:
    """The trials that failed for good: not a spare (see Sweep.next_trial), not one queued again (an interrupted or
    dead worker's). They use up a TPE study's budget: else a study whose every trial fails would never end."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("spare")
            and t.number not in retried]


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
    """One worker of a study: opens (or creates) the study, runs trials until none is left, then, if it finds the
    study complete, retrains the best configuration (:meth:`run`). Every worker of a study is built with the same
    arguments; see :func:`sweep` for their meaning."""

    def __init__(self, options: dict[str, Any] | None = None, *, config: str | None = None,
                 params: Sequence[str] = (), space: str | None = None, sampler: str = "grid",
                 trials: int | None = None, prune: bool = True, out: str | Path | None = None,
                 storage: str | None = None, study_name: str | None = None, stale_after: float = 600.0,
                 final: bool = True):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sampler, self.prune, self.stale_after, self.final = sampler, prune, stale_after, final
        given = dict(options or {})
        if config:
            given["config"] = config
        self.base_cfg = resolve_config(given)
        self.method = self.base_cfg.method
        self.space = build_space(self.method, sampler, space, params)
        if sampler == "grid" and trials is not None:
            raise RecipeError("--trials applies to --sampler tpe; the grid sampler searches the whole grid")
        if trials is not None and trials < 1:
            raise RecipeError("--trials must be >= 1")
        # the TPE budget: --trials, or 30 for a new study; joining one, at least the study's own (see _join)
        self.trials_given, self.n_trials = trials, trials or 30
        self.base = {k: v for k, v in self.base_cfg.to_dict().items() if k not in ("out", "runs_dir")}
        if sampler == "grid":
            self._check_grid()  # before anything is written
        from ..recipes import dataset_key

        self.out = Path(out or Path("sweeps") / f"{dataset_key(self.base_cfg.dataset)}_{self.method}")
        check_outside_datasets(self.out, [self.base_cfg.dataset])
        self.out.mkdir(parents=True, exist_ok=True)
        self.study_name = study_name or self.out.resolve().name
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.study = self._open_study(open_storage(storage, self.out))

    # ----------------------------------------------------------------------------- study

    def search_spec(self) -> dict:
        """What every worker of a study must agree on."""
        # Not the TPE trial budget: a later command with more --trials extends the study (see _join)
        return {"sampler": self.sampler, "space": {p.name: p.describe() for p in self.space},
                "config": _comparable(self.base)}

    def _check_grid(self) -> None:
        """Every grid point is a valid run (``dropout=1.5`` is refused here, not after the other trials trained)."""
        from ..engine import TrainConfig

        for params in self.grid():
            try:
                cfg = TrainConfig.from_dict({**self.base, **params, "split": "val"})
                get_method(cfg.method).check_options(cfg.options())
            except MLAEError as err:
                given = ", ".join(f"{k}={v}" for k, v in params.items())
                raise RecipeError(f"the grid point {given} is no valid run: {err}") from None

    def grid(self) -> list[dict]:
        import itertools

        names = [p.name for p in self.space]
        return [dict(zip(names, combo)) for combo in itertools.product(*(p.values for p in self.space))]

    def _open_study(self, storage):
        import optuna

        if self.sampler == "grid":
            # Every grid point is enqueued when the study is created, so the sampler never chooses one (optuna's
            # GridSampler would hand a running point to a second worker once the grid is exhausted).
            sampler = optuna.samplers.RandomSampler(seed=0)
        else:
            # Each worker draws from its own stream so that workers starting together do not propose the same
            # points; constant_liar keeps running trials in view.
            sampler = optuna.samplers.TPESampler(seed=hash((self.base_cfg.seed, self.worker)) % 2**31,
                                                 constant_liar=True)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, self.base_cfg.epochs // 2))
                  if self.prune else optuna.pruners.NopPruner())
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
        if self.sampler == "tpe":
            study.set_user_attr("trials", self.n_trials)
        if self.sampler == "grid":
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
        if theirs and isinstance(theirs.get("config"), dict):  # a study created by an older version compares too
            theirs = {**theirs, "config": _comparable(theirs["config"])}
        budget = study.user_attrs.get("trials") or (theirs or {}).get("trials")  # older studies: in the spec
        theirs = {k: v for k, v in theirs.items() if k != "trials"} if theirs else theirs
        if theirs != spec:
            diff = sorted(k for k in set(theirs or {}) | set(spec) if (theirs or {}).get(k) != spec.get(k))
            a, b = theirs or {}, spec
            detail = [f"{k}: {a.get(k)!r} (study) vs {b.get(k)!r} (now)" for k in diff if k != "config"]
            if "config" in diff:
                a, b = theirs["config"], spec["config"]
                detail += [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                           if a.get(k) != b.get(k)]
            raise RecipeError(f"study {self.study_name!r} in this storage searches something else ("
                              f"{'; '.join(map(str, detail[:6]))}); use the same options, or another --study-name "
                              "/ --out")
        if self.sampler == "tpe":
            self._join_budget(study, int(budget or 0))

    def _join_budget(self, study, budget: int) -> None:
        """A TPE study's budget is the largest --trials of its workers: a worker with more raises it (two raising
        it at once: each re-reads and sets again while the stored value is below its own), one without --trials
        or with fewer takes the study's. ``budget`` 0: none recorded (the creator died before recording it)."""
        wanted = self.trials_given
        if budget and wanted is not None and wanted < budget:
            print(f"study {self.study_name!r}: its trial budget is {budget}; --trials {wanted} does not lower it",
                  flush=True)
        self.n_trials = max(budget, wanted or 0) or self.n_trials  # neither: a new study's default
        for _ in range(5):
            if int(study.user_attrs.get("trials") or 0) >= self.n_trials:
                break
            study.set_user_attr("trials", self.n_trials)  # older versions kept the budget in the spec only
        if budget and self.n_trials > budget:
            print(f"study {self.study_name!r}: trial budget raised from {budget} to {self.n_trials}", flush=True)

    def _finish_setup(self, study, spec: dict) -> None:
        """The creating worker died while enqueueing the grid: enqueue the points nobody has."""
        print(f"note: study {self.study_name!r} was left half set up by its creator; completing it", file=sys.stderr)
        if study.user_attrs.get("search") is None:
            study.set_user_attr("search", spec)
        if self.sampler == "grid":
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
            dead = now - beat > self.stale_after
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
            if not queued and (self.sampler == "grid" or not self._budget_left()):
                return None
            trial = self.study.ask()
            trial.set_user_attr("worker", self.worker)  # at once, so that a kill from here on is noticed
            if self.sampler == "tpe" or "grid_point" in trial.user_attrs:
                return trial
            # Another worker popped the last queued point between our look and ask(), which then made a new
            # trial: there is no grid point for it. Close it (marked spare, left out of the reports), look again.
            trial.set_user_attr("spare", True)
            self.study.tell(trial, state=TrialState.FAIL)

    def _budget_left(self) -> bool:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)  # once: a query of the storage each time
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        return sum(t.state in counted for t in trials) + len(_failed(trials)) < self.budget()

    def budget(self) -> int:
        """The TPE study's trial budget: the largest --trials any of its workers gave (one may raise it while the
        others run)."""
        return max(self.n_trials, int(self.study.user_attrs.get("trials") or 0))

    def complete(self) -> bool:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return False
        if self.sampler == "tpe":
            closed = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) + len(_failed(trials))
            return closed >= self.budget()
        return True

    # ----------------------------------------------------------------------------- trials

    def run_trial(self, trial) -> None:
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from ..engine import TrainConfig, train

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

        beat = max(1.0, min(60.0, self.stale_after / 5))
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

    def run(self) -> None:
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
        if complete and self.final:
            final = self.run_final()
        elif not complete:
            print(f"this worker ran {ran} trial(s); others are still running — the worker that completes the study "
                  "writes the final result", flush=True)
        write_reports(self.study, self.out, self.space, self.base, final, self.sampler)
        written = [self.out / name for name in ("trials.md", "best.yaml", "heatmap.png") if (self.out / name).exists()]
        print("wrote " + ", ".join(map(str, written)), flush=True)

    def check_completed(self) -> None:
        """A finished study none of whose trials completed has no result: an error (exit 1), not a report."""
        if self.complete() and best_trial(self.study) is None:
            failed = _failed(self.study.get_trials(deepcopy=False))
            raise SweepError(f"no trial of the study completed: {len(failed)} failed (their errors are above and in "
                             f"{self.out / 'trials'}); fix the cause and start the sweep again with another --out "
                             "or --study-name")

    # ----------------------------------------------------------------------------- final

    def run_final(self) -> dict | None:
        """Retrain the best trial's configuration on train+val and test it (one worker: a file lock)."""
        import fcntl

        import yaml

        from ..engine import TrainConfig, train

        best = best_trial(self.study)
        if best is None:  # sweep() then says so, as its error
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


# --------------------------------------------------------------------------------------------- workers


def worker_plan(jobs: int | None, threads: int | None, device: str | None,
                trials: int | None) -> tuple[int, int | None]:
    """(workers, torch threads each) for this machine: ``jobs`` if given; else one with a GPU, and on a CPU one
    1-thread worker per free core (which beat one many-thread worker on small ViTs)."""
    import torch

    if jobs is not None and jobs < 1:
        raise RecipeError("--jobs must be >= 1")
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return jobs or 1, threads
    return cpu_jobs(trials or 1_000, jobs, threads)


def _work(settings: dict) -> None:
    """A worker process of :func:`run_workers`: an exception ends it with a nonzero exit code."""
    Sweep(**settings).run()


def _start(target: Callable[[dict], Any], settings: dict) -> None:
    """A worker process's entry: SIGTERM (from :func:`run_workers`) stops it as Ctrl-C does, so that its trial
    is failed for a later retry and its run keeps a checkpoint, instead of the process dying mid-write."""
    import signal

    def stop(signum, frame):
        # once: a second signal inside the trial's cleanup (failing it, queueing it again) would lose the trial
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    target(settings)


def run_workers(settings: dict, jobs: int, threads: int | None, target: Callable[[dict], Any] = _work,
                grace: float = 5.0) -> None:
    """Start ``jobs`` worker processes of the sweep that :class:`Sweep` ``(**settings)`` describes, ``threads``
    torch threads each, and wait for them. They share the study through its storage, as workers started by hand
    do. ``target(settings)`` is what each process runs (a module-level function: the processes are spawned).
    Interrupted, it waits ``grace`` seconds for the workers to stop, then sends them SIGTERM."""
    import multiprocessing

    each = f" × {threads} torch thread(s) each" if threads else ""
    print(f"{jobs} sweep workers{each} on this machine (--jobs / --threads override)", flush=True)
    settings = {**settings, "options": {**(settings.get("options") or {}), "threads": threads}}
    # spawn, not fork: a forked child would inherit torch's OpenMP state, which deadlocks under fork
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_start, args=(target, settings)) for _ in range(jobs)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reached the workers too (one process group): they are failing their trials for a
        # later retry. A SIGTERM to this process alone (`kill`, a batch scheduler) did not: pass it on.
        deadline = time.time() + grace
        for w in workers:
            if w.pid is not None:
                w.join(max(0.0, deadline - time.time()))
        raise
    finally:  # also after a second interrupt: no worker outlives this call
        for w in workers:
            if w.pid is not None and w.is_alive():
                w.terminate()
        for w in workers:
            if w.pid is not None:
                w.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise SweepError(f"{len(failed)} of {jobs} sweep workers failed (exit {', '.join(map(str, failed))}); "
                         "rerun the same command to continue the sweep")


def sweep(options: dict[str, Any] | None = None, *, jobs: int | None = None,
          target: Callable[[dict], Any] = _work, **settings) -> None:
    """This machine's share of a study: ``jobs`` worker processes (see :func:`worker_plan`), or this process
    alone when that is one. ``options``: `mlae train` options by name (``dataset``, ``method``, ``epochs``, ...;
    ``threads`` and ``device`` also size the workers); ``settings`` (keywords of :class:`Sweep`): ``config`` (a
    YAML recipe), ``params`` (``["dropout=0,0.5", "lr=1e-4:1e-2:log"]``), ``space`` (a YAML search space),
    ``sampler`` (grid or tpe), ``trials`` (tpe), ``prune``, ``out`` (default sweeps/<dataset>_<method>),
    ``storage``, ``study_name``, ``stale_after`` (seconds), ``final``. The reports land in ``out``. ``target``:
    what each worker process runs, as in :func:`run_workers`."""
    options = dict(options or {})
    n, threads = worker_plan(jobs, options.get("threads"), options.get("device"), settings.get("trials"))
    if n > 1:
        # checks the search and opens (or creates) the study here, so that a mistake in the options is one line
        # from this process rather than the same line from every worker and a count of failed workers
        parent = Sweep(options, **settings)
        try:
            run_workers({**settings, "options": options}, n, threads, target)
        except SweepError:
            parent.check_completed()  # the cause, when no trial completed, rather than a count of failed workers
            raise
        parent.check_completed()
    else:
        worker = Sweep(options, **settings)
        worker.run()
        worker.check_completed()
