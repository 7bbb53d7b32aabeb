"""Methods × datasets × seeds in one call, one table: the library behind ``mlae compare``.

    from mlae.experiments.compare import compare
    result = compare("lora,nomask=mlae[dropout=0]", "suite:all", [0, 1], "runs/compare", options={"epochs": 20})
    print(result.summary)

Each run is a subprocess ``mlae train --config <run>/compare.yaml --out <run>``, where ``compare.yaml`` is the
run's fully resolved configuration (train options < method-variant overrides). Finished runs (``results.json``
present) are skipped, interrupted ones resumed from their checkpoint, so the same call can be repeated until
everything is done.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import FolderLock
from ..hardware import cpu_jobs
from ..recipes import RecipeError, config_from_options, get_method
from ..rundir import CHECKPOINT, RESULTS, RUN_LOCAL, check_comparison_folder, check_outside_datasets
from .summary import summarize
from .variants import Variant, parse_methods, parse_seeds

__all__ = ["Run", "Comparison", "compare", "plan", "execute_runs", "resolve_config", "dataset_slug", "RUN_RECIPE"]

RUN_RECIPE = "compare.yaml"
# What the grid itself sets for every run; given as train options they would be overridden without a word.
GRID_KEYS = ("dataset", "method", "seed")


@dataclass
class Run:
    variant: Variant
    dataset: str
    seed: int
    folder: Path
    config: dict


@dataclass
class Comparison:
    """What :func:`compare` did: its runs, the text of summary.md, and one line per failed run."""

    variants: list[Variant]
    datasets: list[str]
    seeds: list[int]
    runs: list[Run]
    summary: str
    failures: list[str]


def dataset_slug(spec: str) -> str:
    from ..recipes import dataset_key

    prefix, _, _ = spec.partition(":")
    return f"{prefix}-{dataset_key(spec)}"


def _check_distinct(datasets: list[str]) -> None:
    """Each dataset once, each in a run folder of its own: two folders with one name (folder:a/pets and
    folder:b/pets) would share runs/<label>/folder-pets/, and the second run would replace the first's."""
    seen: dict[str, str] = {}
    for d in datasets:
        slug = dataset_slug(d)
        if slug in seen:
            if seen[slug] == d:
                raise RecipeError(f"--datasets lists {d} twice; list each dataset once (seeds repeat runs)")
            raise RecipeError(f"--datasets {seen[slug]} and {d} would share the run folder {slug}: rename one "
                              "folder, or compare them into separate --out folders")
        seen[slug] = d


def resolve_config(given: dict[str, Any], *, check: bool = True, **overrides):
    """TrainConfig from train options (with `mlae train`'s precedence: defaults < ``given["config"]`` recipe <
    options), then ``overrides``. Method options that the method does not take are dropped, so one set of options
    can drive several methods. ``check``: as for :func:`mlae.recipes.config_from_options`."""
    from ..engine import TrainConfig

    method = get_method(overrides.get("method", given.get("method", TrainConfig.method)))
    fields = set(TrainConfig.__dataclass_fields__)
    keep = {k: v for k, v in given.items() if k in fields or k in method.defaults()}
    return config_from_options({**keep, **overrides}, recipe=given.get("config"), check=check)


def plan(variants: list[Variant], datasets: list[str], seeds: list[int], out: str | Path,
         options: dict[str, Any] | None = None, config: str | None = None) -> list[Run]:
    """Every run of the grid with its resolved configuration; refuses a run folder that holds a finished run made
    with other settings."""
    given = dict(options or {})
    if config:
        given["config"] = config
    _check_distinct(datasets)
    runs = []
    for v in variants:
        for d in datasets:
            for s in seeds:
                folder = Path(out) / "runs" / v.slug / dataset_slug(d) / f"s{s}"
                finished = (folder / RESULTS).exists()  # reused, not run: MoLE's experts need not exist now
                cfg = resolve_config(given, check=not finished, dataset=d, method=v.method, seed=s, out=str(folder),
                                     **v.overrides)
                config_ = {k: val for k, val in cfg.to_dict().items() if k not in ("threads", "runs_dir")}
                runs.append(Run(v, d, s, folder, config_))
                if finished:
                    changed = _changed(folder / RUN_RECIPE, config_)
                    if changed:
                        raise RecipeError(
                            f"{folder} holds a finished run made with other settings ("
                            + ", ".join(changed[:5])
                            + "); use another --out, or delete that run folder to redo it")
    return runs


def _changed(stored: Path, config: dict) -> list[str] | None:
    """The settings (other than run-local ones) in which a stored configuration (compare.yaml, or the engine's
    config.yaml) differs from ``config``, as "key: old -> new"; None when there is no such file."""
    import yaml

    from ..engine import TrainConfig
    from ..recipes import canonical_config

    if not stored.exists():
        return None
    before = yaml.safe_load(stored.read_text()) or {}
    # A setting added since the file was written (e.g. normalize) held its default for that run.
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    before = canonical_config({**{k: v for k, v in defaults.items() if k in config}, **before})
    config = canonical_config(config)
    return [f"{k}: {before.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(before) | set(config))
            if k not in RUN_LOCAL and before.get(k) != config.get(k)]


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
    running: set[subprocess.Popen] = set()

    def execute(run: Run) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        name = f"{run.variant.label} / {run.dataset} / seed {run.seed}"
        # `--resume` continues with the run folder's own config.yaml: only when the settings are unchanged.
        resume = False
        if (run.folder / CHECKPOINT).exists():
            changed = _changed(run.folder / "config.yaml", run.config)
            resume = changed == []
            if not resume:  # say so: the partial run's epochs are about to be thrown away
                why = ("its settings are unknown (no config.yaml)" if changed is None
                       else "it was made with other settings (" + ", ".join(changed[:5]) + ")")
                print(f"restart {name}: the unfinished run's checkpoint is discarded, {why}", flush=True)
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
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                with lock:
                    running.add(proc)
                try:
                    rc = proc.wait()
                finally:
                    with lock:
                        running.discard(proc)
        finally:
            with lock:
                free.append(gpu)
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

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        list(pool.map(execute, todo))
    except KeyboardInterrupt:
        _stop(running, lock)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an interruption, start no further run
    return failures


def _stop(running: set[subprocess.Popen], lock: threading.Lock, grace: float = 5.0) -> None:
    """Stop the runs in progress after this process was interrupted. Ctrl-C in a terminal reached them too (one
    process group) and they are stopping; a SIGTERM to this process alone (`kill`, a batch scheduler) did not:
    send them one after ``grace`` seconds, which `mlae train` handles as Ctrl-C (checkpoint kept, lock released)."""
    deadline = time.time() + grace
    with lock:
        procs = list(running)
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()


def compare(methods: str | list[Variant], datasets: str | list[str], seeds: str | list[int], out: str | Path, *,
            options: dict[str, Any] | None = None, config: str | None = None,
            jobs: int | None = None) -> Comparison:
    """Train every variant of ``methods`` (``"lora,nomask=mlae[dropout=0]"`` or :class:`Variant` objects) on every
    dataset (``suite:all`` / ``vtab:all`` / ``fgvc:all`` expand) with every seed, skipping finished runs, and write
    the tables into ``out``. ``options``: `mlae train` options by name (``{"epochs": 20, "backbone": ...}``) for
    every run; method options apply to the methods that take them. ``config``: a YAML recipe for every run.
    ``jobs``: runs in parallel (default: one per GPU; on a CPU one 1-thread job per free core). Progress is
    printed; failed runs are listed in the result rather than raised."""
    from ..data import expand_specs

    options = dict(options or {})
    grid = [k for k in GRID_KEYS if k in options]
    if grid:
        raise RecipeError(f"{', '.join(grid)}: set by the comparison's own datasets / methods / seeds, not options")
    variants = parse_methods(methods) if isinstance(methods, str) else list(methods)
    datasets = expand_specs(datasets)
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else parse_seeds(",".join(map(str, seeds)))
    check_outside_datasets(Path(out), datasets)  # before anything is written there
    check_comparison_folder(Path(out))
    runs = plan(variants, datasets, seeds, out, options, config)
    out = Path(out)
    # One compare per folder at a time: two would train the same runs and interleave the tables. Each run's own
    # folder is locked by the `mlae train` process that writes it, not here.
    with FolderLock(out):
        todo = [r for r in runs if not (r.folder / RESULTS).exists()]
        print(f"{len(runs)} runs ({len(variants)} methods × {len(datasets)} datasets × {len(seeds)} seeds): "
              f"{len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
        failures = execute_runs(todo, jobs=jobs, threads=options.get("threads"), device=options.get("device"))
        text = summarize(out, runs, variants, datasets, seeds)
    return Comparison(variants, datasets, seeds, runs, text, failures)
