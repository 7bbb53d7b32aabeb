"""A sweep's reports, from the study's current state: trials.csv, trials.md, best.yaml (a recipe for
``mlae train --config``) and heatmap.png."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..data import protocol_splits
from ..files import atomic_write_text
from ..rundir import RESULTS
from ..trained import absolute_spec
from ..utils import pyplot, save_png
from .sweep_space import Param

__all__ = ["best_trial", "trial_rows", "write_reports"]


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
    if final is None and (out / "final" / RESULTS).exists() and best is not None:
        done = yaml.safe_load((out / "final" / "config.yaml").read_text())
        if all(done.get(k) == v for k, v in best.params.items()):
            final = json.loads((out / "final" / RESULTS).read_text())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    train, val, train_val = protocol_splits(str(base.get("dataset")))
    lines = [f"# mlae sweep: {study.study_name}", "",
             f"{base.get('method')} on {base.get('dataset')}, {base.get('epochs')} epochs, sampler {sampler}; "
             f"trials train on {train} and are scored on {val} (top-1 after the last epoch; pruned trials show "
             f"their last reported value). The best configuration is then retrained on {train_val} and tested "
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
        # `mlae train --config best.yaml` may run from another folder than the sweep did: paths become absolute
        if recipe.get("data_root"):
            recipe["data_root"] = str(Path(recipe["data_root"]).expanduser().resolve())
        if recipe.get("dataset"):
            recipe["dataset"] = absolute_spec(str(recipe["dataset"]))
        head = [f"# mlae sweep {study.study_name}: best of {counts.get('COMPLETE', 0)} completed trials, selected on "
                f"{val} (trained on {train})",
                f"# trial {best.number}: val top-1 {100 * best.value:.2f}%; "
                + ", ".join(f"{k}={v}" for k, v in best.params.items())]
        if final is not None:
            head.append(f"# retrained on {train_val}: test top-1 {100 * final['top1']:.2f}% (final/results.json)")
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
