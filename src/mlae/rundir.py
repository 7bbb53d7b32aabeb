"""The run folder: its file names, choosing and locking it, the --resume check, checkpoints, config.yaml, figures.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch),
``checkpoint.safetensors`` (while training), the trained weights (``adapter.safetensors``, or
``model.safetensors`` for full fine-tuning: :mod:`mlae.trained`), ``results.json`` (written last: its presence
marks a finished run), ``curves.png`` (when matplotlib is installed), ``tensorboard/`` (``--tensorboard``) and
``.mlae.lock`` while a process writes it (:class:`mlae.files.FolderLock`).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import RunDirError, TrainingError
from .files import FolderLock, atomic_save_file, atomic_write_text
from .recipes import METHODS, canonical_config, dataset_key
from .trained import ADAPTER_FILE, CHECKPOINT, MODEL_FILE, absolute_spec, checkpoint_settings
from .utils import pyplot, save_png, set_rng_state

if TYPE_CHECKING:  # annotations only: the engine imports this module
    from .engine import TrainConfig

__all__ = ["CHECKPOINT", "RESULTS", "RUN_LOCAL", "RESUME_MAY_CHANGE", "WORKER_LOCAL", "default_out", "prepare_run_dir",
           "clear_run_files", "save_checkpoint", "load_checkpoint", "write_config", "save_figure", "draw_curves",
           "TENSORBOARD_DIR", "check_outside_datasets", "check_comparison_folder"]

RESULTS = "results.json"
TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files
# Any one of these marks a run folder (compare.yaml and train.log: what `mlae compare` writes into a run's folder
# before it starts the run).
_RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT, RESULTS, ADAPTER_FILE, MODEL_FILE, "compare.yaml",
              "train.log")
# Run-local settings: where things are and how this machine runs them, not what is trained. The one definition
# for every place that compares two configurations of the same run or study (a key missing from a configuration
# dict, e.g. progress, which to_dict() drops, simply never differs):
# - RESUME_MAY_CHANGE: `mlae train --resume` continues a run whose settings differ only in these;
# - `mlae compare` reuses a finished run (or resumes an interrupted one) whose settings differ only in RUN_LOCAL;
# - WORKER_LOCAL: the workers of one `mlae sweep` study may differ in these. precision too, as every trial runs
#   whole in one worker (a resumed run may not: one spliced from bf16 and fp32 halves is neither); attention is
#   not among them because the studies already created recorded it in the search spec that a joining worker
#   must match (leaving it out would shut every new worker out of them).
RUN_LOCAL = ("threads", "device", "attention", "progress", "cache", "data_root", "checkpoint_every", "out", "runs_dir")
RESUME_MAY_CHANGE = RUN_LOCAL
WORKER_LOCAL = tuple(k for k in RUN_LOCAL if k != "attention") + ("precision",)


# --------------------------------------------------------------------------------------------- run folder


def default_out(cfg: TrainConfig) -> Path:
    """``<runs_dir>/<dataset>_<method>_s<seed>``: where a run goes without --out."""
    return Path(cfg.runs_dir) / f"{dataset_key(cfg.dataset)}_{cfg.method}_s{cfg.seed}"


def prepare_run_dir(cfg: TrainConfig, stack: contextlib.ExitStack) -> tuple[Path, bool]:
    """Pick the output folder and lock it for this process until ``stack`` closes (a second writer is refused);
    returns (folder, resume_from_checkpoint)."""
    if cfg.out is None and not cfg.resume and not cfg.overwrite:  # --overwrite / --resume: the default folder itself
        base = default_out(cfg)
        out, i = base, 1
        while out.exists() and any(out.iterdir()):
            i += 1
            out = base.with_name(f"{base.name}-{i}")
        _check_out(out, cfg)
        stack.enter_context(FolderLock(out))
        return out, False
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg)
    _check_out(out, cfg)
    stack.enter_context(FolderLock(out))  # before looking inside: what is found stays true while we run
    finished = (out / RESULTS).exists()
    has_checkpoint = (out / CHECKPOINT).exists()
    if cfg.overwrite:
        return out, False
    if finished and cfg.resume:  # (--resume --overwrite is refused: the two contradict each other)
        raise RunDirError(f"{out} holds a finished run: there is nothing to resume; to train it again, drop --resume "
                          "and pass --overwrite, or choose another --out")
    if finished:
        raise RunDirError(f"{out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if cfg.resume:
        if not has_checkpoint:  # e.g. a typo in --out: starting a new run there would hide it
            raise RunDirError(f"--resume: no interrupted run in {out} (no {CHECKPOINT}); check --out, or drop "
                              "--resume to start a new run there")
        _check_resume(out, cfg)
        return out, True
    if has_checkpoint:
        raise RunDirError(f"{out} holds an unfinished run with a checkpoint; pass --resume to continue it "
                          "(or --overwrite to start over)")
    return out, False


def _check_out(out: Path, cfg: TrainConfig) -> None:
    """Refuse a run folder that would mix the run's files with others: a file, a folder that holds files but no
    run (a data folder, a folder of runs), or a folder inside a ``folder:`` dataset, where the run would be
    read as one more class folder by the next run on that dataset."""
    flag = "--out" if cfg.out is not None else "the run folder"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{flag} {out} is a file, not a folder; name a folder for the run")
    check_outside_datasets(out, [cfg.dataset], flag)
    if not cfg.resume and out.is_dir() and not any((out / name).exists() for name in _RUN_FILES) and any(
            not p.name.startswith(".") for p in out.iterdir()):
        raise RunDirError(f"{flag} {out} holds other files and no run; choose a new or empty folder, so that the "
                          "run's files do not mix with them")


def check_outside_datasets(out: Path, specs: list[str], flag: str = "--out") -> None:
    """Refuse an output folder inside a ``folder:`` dataset: the next run on that dataset would read it as one more
    class folder. For `mlae train`, and for `compare` and `sweep` before they write anything."""
    for spec in specs:
        spec = absolute_spec(spec)
        if spec.startswith("folder:"):
            data, where = Path(spec[len("folder:"):]), Path(out).resolve()
            if where == data or data in where.parents:
                raise RunDirError(f"{flag} {out} is inside the dataset folder {data}: the next run on it would "
                                  f"read the folder as a class; choose a folder outside it with {flag}")


def check_comparison_folder(out: Path) -> None:
    """Refuse an `mlae compare` --out whose files are not a comparison's: a `mlae train` run folder, or a folder
    of other files, where the comparison's tables and run folders would mix with them (as `mlae train` refuses)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; name a folder for the comparison")
    names = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if any(name in _RUN_FILES for name in names):
        raise RunDirError(f"--out {out} is a `mlae train` run folder; give the comparison a folder of its own")
    if names and "runs" not in names and "results.csv" not in names:
        raise RunDirError(f"--out {out} holds other files and no comparison; choose a new or empty folder, so that "
                          "the comparison's files do not mix with them")


def _check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse to continue a run with other settings than it was started with: the result would be a mixture
    (e.g. a learning-rate schedule spliced from two lengths). Compared with the settings the checkpoint was
    written with (config.yaml for checkpoints older than that record)."""
    import yaml

    before = checkpoint_settings(out / CHECKPOINT)
    if before is None and (out / "config.yaml").exists():
        before = yaml.safe_load((out / "config.yaml").read_text())
    if before is None:
        raise RunDirError(f"{out}: the checkpoint records no settings to check a resumed run against; pass "
                          "--overwrite to start over")
    now = canonical_config(json.loads(json.dumps(cfg.to_dict())))  # tuples as lists, as they were stored
    before = canonical_config(before)
    changed = [f"{k} {before[k]!r} -> {now.get(k)!r}" for k in before
               if k not in RESUME_MAY_CHANGE and before[k] != now.get(k)]
    if changed:
        raise RunDirError(f"{out}: --resume with other settings than the interrupted run's ({', '.join(changed[:8])}"
                          f"{', ...' if len(changed) > 8 else ''}); resume with its own settings (only "
                          f"{', '.join(RESUME_MAY_CHANGE[:5])}, ... may change), or start a new run in another --out")


def clear_run_files(out: Path) -> None:
    """Delete the files a run leaves in ``out``, so that a run started there anew finds no old record."""
    # The figures of every method: the folder may hold a run of another method than the one starting there.
    figures = dict.fromkeys(name for method in METHODS.values() for name in method.hooks.files)
    for name in ("config.yaml", "metrics.jsonl", CHECKPOINT, RESULTS, ADAPTER_FILE, MODEL_FILE, "curves.png",
                 *figures):
        (out / name).unlink(missing_ok=True)
    if (out / TENSORBOARD_DIR).is_dir():  # the old run's curves would show next to the new one's
        shutil.rmtree(out / TENSORBOARD_DIR)


def write_config(path: Path, cfg: TrainConfig, out: Path) -> None:
    """``cfg`` as ``config.yaml`` records it, with the folder it ran in."""
    import yaml

    d = cfg.to_dict()
    d["out"] = str(out)
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    step: int, metrics: list[dict], rng: list[tuple[dict, dict]], config: dict | None = None,
                    hooks: dict | None = None) -> None:
    """Trainable parameters, optimizer state, RNG states (one per rank), progress, the run's settings
    (``config``, checked by --resume) and the method hooks' state (``hooks``: TrainingHooks.state), without
    pickle."""
    # Everything the optimizer holds, trainable now or not (DMLoRA's stage 2 freezes the branches it trained).
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    tensors = {f"model.{n}": p for n, p in model.named_parameters() if id(p) in held}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    rng_info = []
    for rank, (rng_tensors, info) in enumerate(rng):
        for key, value in rng_tensors.items():
            tensors[f"rng.{rank}.{key}"] = value
        rng_info.append(info)
    state = {"epoch": epoch, "scheduler": {"step": step}, "param_groups": opt["param_groups"],
             "metrics": metrics, "rng": rng_info, "threads": torch.get_num_threads(), "config": config,
             "hooks": hooks or {}}
    atomic_save_file(tensors, path, {"format": "mlae-checkpoint-1", "state": json.dumps(state)})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state (epoch, metrics, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                name = key[len("model."):]
                if name not in params:
                    raise TrainingError(f"{path}: parameter {name} does not exist in this model")
                params[name].copy_(value)
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    if rank < len(state["rng"]):
        prefix = f"rng.{rank}."
        set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, state["rng"][rank])
    return state


# --------------------------------------------------------------------------------------------- figures


def _optional_pyplot(path: Path):
    """pyplot, or None with a note when matplotlib is missing: plots are a convenience, results.json and
    metrics.jsonl are the record."""
    try:
        return pyplot()
    except ImportError:
        print(f"note: matplotlib is not installed; no {path.name} (pip install matplotlib to get it)",
              file=sys.stderr)
        return None


def save_figure(path: Path, draw: Callable[[Any], Any]) -> None:
    """The figure ``draw(plt)`` returns, as a PNG at ``path`` (nothing but a note without matplotlib)."""
    plt = _optional_pyplot(path)
    if plt is not None:
        save_png(draw(plt), path)


def draw_curves(plt, metrics: list[dict], eval_name: str):
    """Loss and top-1 per epoch (curves.png)."""
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(epochs, [m["train_top1"] for m in metrics], label="train")
    evals = [(m["epoch"], m[f"{eval_name}_top1"]) for m in metrics if m[f"{eval_name}_top1"] is not None]
    ax_acc.plot([e for e, _ in evals], [a for _, a in evals], marker="o", label=eval_name)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1")
    ax_acc.legend()
    fig.tight_layout()
    return fig
