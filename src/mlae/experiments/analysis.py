"""The MLAE paper's analyses of trained runs, as functions of run folders (``mlae analyze``):

- :func:`analyze_similarity`: expert cosine similarity per adapted layer and overall (paper Fig. 4, appendix A.4)
  and the E×E similarity matrix of one layer or the mean over layers (Fig. 5), for one or more runs.
- :func:`analyze_attention`: CLS-token attention of one block with only expert ``i``'s update active (Fig. 6),
  next to the backbone without adapters and the fine-tuned model (:mod:`mlae.experiments.attention_maps`).
- :func:`analyze_dropout`: the masking probability that ``--dropout auto`` learned, per adapted layer over the
  epochs and as a profile over depth next to the paper's incremental / decremental patterns (appendix A.5).

Each writes its figures and tables into a folder and returns them as :class:`Analysis`; the pieces (e.g.
:func:`similarity_report` of a model in memory, the ``plot_*`` figures) are usable on their own. The ablation
tables are :mod:`mlae.experiments.ablations`.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import InputError, MissingFileError, MLAEError, MLAEWarning
from ..rundir import check_outside_datasets
from ..trained import ADAPTER_FILE, MODEL_FILE, load_trained, read_weights_metadata, what_folder
from ..utils import pyplot, save_png
from .attention_maps import attention_maps, plot_attention, sample_images

__all__ = ["Analysis", "analyze_similarity", "analyze_attention", "analyze_dropout", "resolve_run", "expand_runs",
           "series_of", "run_labels", "similarity_report", "plot_similarity", "by_dataset", "plot_by_dataset",
           "plot_matrix", "write_similarity", "attention_maps", "plot_attention", "dropout_history",
           "plot_dropout_history", "plot_dropout_profile"]

MEAN = "mean"  # --layer value / row label of the mean over adapted layers


class Analysis(NamedTuple):
    """What an analysis found: ``data`` as its JSON file holds it, ``markdown`` as its .md file."""

    data: dict
    markdown: str


# --------------------------------------------------------------------------------------------- runs


def resolve_run(run: str | Path) -> Path:
    """The adapter file of a run: ``run`` itself or ``run/adapter.safetensors``."""
    path = Path(run)
    if path.is_dir():
        if not (path / ADAPTER_FILE).exists():
            if (path / MODEL_FILE).exists() and (path / "config.json").exists():  # timm's local-dir layout
                other = ("a merged export (`mlae export`): its adapters are merged into the weights; name the run "
                         "folder it was exported from")
            elif (path / MODEL_FILE).exists():
                other = "it holds a fully fine-tuned model: no adapters to analyse"
            else:
                other = what_folder(path)
            raise MissingFileError(f"{path} has no {ADAPTER_FILE} ({other})")
        return path / ADAPTER_FILE
    if not path.exists():
        raise MissingFileError(f"run folder or adapter file not found: {path}")
    return path


def expand_runs(runs: list[str | Path]) -> list[Path]:
    """RUN arguments: run folders, adapter files, or ``mlae compare`` output folders (standing for every finished
    adapter run in their ``runs/<variant>/<dataset>/s<seed>`` folders)."""
    return [run for run, _ in _expand(runs)]


def _expand(runs: list[str | Path]) -> list[tuple[Path, bool]]:
    """:func:`expand_runs`, each run with whether it was found in an `mlae compare` folder (not named)."""
    out = []
    for run in map(Path, runs):
        if run.is_dir() and not (run / ADAPTER_FILE).exists() and (run / "runs").is_dir():
            found = sorted(p.parent for p in run.glob(f"runs/*/*/s*/{ADAPTER_FILE}"))
            if not found:
                raise MissingFileError(f"{run} is an `mlae compare` folder without finished adapter runs")
            out += [(p, True) for p in found]
        else:
            out.append((run, False))
    return out


def _each_usable(runs: list[tuple[Path, bool]], names: list[str],
                 analyse: Callable[[str, Path], Any]) -> dict[str, Any]:
    """``{label: analyse(label, run)}``. A run found in an `mlae compare` folder that the analysis cannot use (LoRA runs
    have no learned p, for one) is left out with a warning; a run named on its own still stops the analysis."""
    results, skipped = {}, []
    for label, (run, found) in zip(names, runs):
        try:
            results[label] = analyse(label, run)
        except MLAEError as err:
            if not found:
                raise
            skipped.append(f"{'/'.join(run.parts[-3:])} ({str(err).removeprefix(f'{run}: ')})")  # variant/data/seed
    if skipped and not results:
        raise InputError(f"no run of the compare folder can be used: {'; '.join(skipped)}")
    if skipped:
        warnings.warn(f"left out {len(skipped)} run(s) this analysis cannot use: {'; '.join(skipped)}", MLAEWarning,
                      stacklevel=3)
    return results


def series_of(path: Path, meta: dict, label: str | None = None) -> str:
    """The method a run stands for in per-dataset summaries: ``label`` if given, else the variant folder of an
    ``mlae compare`` layout (``runs/<variant>/<dataset>/s<seed>/adapter.safetensors``), else the run's method."""
    if label:
        return label
    parts = path.parent.parts
    if len(parts) >= 4 and parts[-4] == "runs" and re.fullmatch(r"s\d+", parts[-1]):
        return parts[-3]
    return str(meta.get("method") or "?")


def run_labels(runs: list[str | Path]) -> list[str]:
    """Short distinct labels: the run folder names, with parent folders prepended until they are distinct."""
    dirs = [Path(r) if Path(r).is_dir() else Path(r).parent for r in runs]
    for depth in range(1, max(len(d.resolve().parts) for d in dirs) + 1):
        labels = ["/".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate(labels)]


def _runs_and_labels(runs: list[str | Path],
                     labels: str | list[str] | None) -> tuple[list[tuple[Path, bool]], list[str]]:
    """The RUN arguments expanded (:func:`_expand`), and one distinct label each (``labels``: "A,B,..." or a list;
    default: the folder names)."""
    runs = _expand(runs)
    names = (labels.split(",") if isinstance(labels, str) else list(labels)) if labels else run_labels(
        [run for run, _ in runs])
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise InputError(f"--labels needs {len(runs)} distinct names, got {labels!r}")
    return runs, names


def _load(path: Path) -> tuple[nn.Module, dict]:
    import mlae

    model, meta = load_trained(path)
    mlae.unmerge(model)  # the attention columns need the frozen weight and the update apart
    return model, meta


def _filename(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


# --------------------------------------------------------------------------------------------- similarity


def _offdiag(sim: torch.Tensor) -> torch.Tensor:
    return sim[~torch.eye(sim.shape[0], dtype=torch.bool)]


def _nanmean(values) -> float:
    t = torch.as_tensor(list(values), dtype=torch.float64)
    return float(t.nanmean()) if t.numel() else float("nan")


def _select_layer(names: list[str], layer: str | int | None) -> str | None:
    """``None``/"mean" -> None (mean over layers); an index into the adapted layers; a name or name suffix."""
    if layer is None or layer == MEAN:
        return None
    if isinstance(layer, int) or re.fullmatch(r"-?\d+", str(layer)):
        i = int(layer)
        if not -len(names) <= i < len(names):
            raise InputError(f"--layer {i} is out of range: the run adapts {len(names)} layers")
        return names[i]
    found = [n for n in names if n == layer or n.endswith("." + str(layer))]
    if len(found) != 1:
        raise InputError(f"--layer {layer!r} matches {len(found)} adapted layers; choose one of: "
                         f"{', '.join(names)}")
    return found[0]


def similarity_report(model: nn.Module, layer: str | int | None = None) -> dict:
    """Expert similarity of one model: per layer and overall mean cosine (the paper's number, from
    :func:`mlae.expert_similarity`) and mean |cosine| (signs can cancel in the plain mean), plus the E×E matrix
    of ``layer`` (default: the mean over layers, NaN-padded where layers have fewer experts)."""
    import mlae

    layers = list(mlae.adapter_layers(model))
    if not layers:
        raise InputError("the model has no adapter layers (a linear probe or full fine-tuning run?)")
    try:
        per_layer = mlae.expert_similarity(model, per_layer=True)
        matrices = {name: mlae.similarity_matrix(lay).double() for name, lay in layers}
    except TypeError as err:  # e.g. MoLE: gated, input-dependent updates have no fixed experts
        raise InputError(f"no expert similarity for {type(layers[0][1]).__name__}: {err}") from None
    rows = {name: {"mean": per_layer[name],
                   "mean_abs": _nanmean(_offdiag(m).abs()) if m.shape[0] > 1 else float("nan"),
                   "experts": int(m.shape[0])} for name, m in matrices.items()}
    chosen = _select_layer(list(matrices), layer)
    if chosen is None:
        e = max(m.shape[0] for m in matrices.values())
        padded = torch.full((len(matrices), e, e), float("nan"), dtype=torch.float64)
        for i, m in enumerate(matrices.values()):
            padded[i, :m.shape[0], :m.shape[0]] = m
        matrix = padded.nanmean(0)
    else:
        matrix = matrices[chosen]
    return {"mean": _nanmean(r["mean"] for r in rows.values()),
            "mean_abs": _nanmean(r["mean_abs"] for r in rows.values()),
            "layers": rows, "matrix_layer": chosen or MEAN, "matrix": matrix.float().tolist()}


def _short(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``3.attn.qkv`` for axis ticks."""
    return re.sub(r"^(blocks|layers?|encoder\.layers?)\.", "", name)


def _all_layers(reports: dict[str, dict]) -> list[str]:
    """The layer names of all reports, in first-seen order (runs may adapt different layers)."""
    names: list[str] = []
    for r in reports.values():
        names += [n for n in r["layers"] if n not in names]
    return names


def _grouped_bars(groups: list[str], series: dict[str, list[float]], xlabel: str, ylabel: str):
    plt = pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.8))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    tilt = len(groups) > 8
    ax.set_xticks(range(len(groups)), groups, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _ylabel(key: str) -> str:
    return "expert cosine similarity" + (" |cos|" if key == "mean_abs" else "")


def plot_similarity(reports: dict[str, dict], key: str = "mean"):
    """Grouped bars: one group per adapted layer plus the overall mean, one series (bar colour) per run."""
    names = _all_layers(reports)
    series = {f"{label} ({key} {r[key]:.3f})": [r["layers"].get(n, {}).get(key, float("nan")) for n in names]
              + [r[key]] for label, r in reports.items()}
    return _grouped_bars([*map(_short, names), "mean"], series, "adapted layer", _ylabel(key))


def by_dataset(reports: dict[str, dict], key: str = "mean") -> dict[str, dict[str, float]]:
    """{series: {dataset: overall similarity averaged over the series' runs (seeds) on that dataset}}."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in reports.values():
        values.setdefault(r["series"], {}).setdefault(r["dataset"], []).append(r[key])
    return {s: {d: _nanmean(v) for d, v in per.items()} for s, per in values.items()}


def plot_by_dataset(table: dict[str, dict[str, float]], key: str = "mean"):
    """Paper Fig. 4: one group per dataset plus the mean over datasets, one series per method."""
    datasets: list[str] = []
    for per in table.values():
        datasets += [d for d in per if d not in datasets]
    series = {s: [per.get(d, float("nan")) for d in datasets] + [_nanmean(per.values())] for s, per in table.items()}
    return _grouped_bars([*datasets, "mean"], series, "dataset", _ylabel(key))


def plot_matrix(report: dict, title: str, absolute: bool = False):
    """Heat map of a report's E×E expert similarity matrix (paper Fig. 5)."""
    plt = pyplot()
    m = torch.tensor(report["matrix"])
    m = m.abs() if absolute else m
    e = m.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * max(e, 6), 0.8 + 0.45 * max(e, 6)))
    im = ax.imshow(m.numpy(), cmap="viridis" if absolute else "coolwarm", vmin=0.0 if absolute else -1.0, vmax=1.0)
    if e <= 16:
        for i in range(e):
            for j in range(e):
                if not math.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ticks = list(range(e))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    where = "mean over layers" if report["matrix_layer"] == MEAN else report["matrix_layer"]
    ax.set_title(f"{title}\n{where}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _markdown(reports: dict[str, dict]) -> str:
    names = _all_layers(reports)
    labels = list(reports)
    lines = []
    for key, title in (("mean", "mean pairwise cosine similarity"), ("mean_abs", "mean pairwise |cosine|")):
        lines += [f"### Expert {title}", "", "| layer | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for n in names:
            cells = [reports[lb]["layers"].get(n, {}).get(key) for lb in labels]
            lines.append(f"| {n} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
        lines += ["| **mean** | " + " | ".join(f"**{reports[lb][key]:.4f}**" for lb in labels) + " |", ""]
    table = by_dataset(reports)
    datasets = sorted({r["dataset"] for r in reports.values()})
    if len(datasets) > 1:
        lines += ["### Overall expert cosine similarity per dataset (mean over seeds)", "",
                  "| dataset | " + " | ".join(table) + " |", "|---|" + "---:|" * len(table)]
        for d in datasets:
            lines.append(f"| {d} | " + " | ".join("" if d not in per else f"{per[d]:.4f}" for per in table.values())
                         + " |")
        lines += ["| **mean** | " + " | ".join(f"**{_nanmean(per.values()):.4f}**" for per in table.values())
                  + " |", ""]
    return "\n".join(lines)


def _json_safe(obj):
    """NaN (e.g. the similarity of a layer with one expert) is not JSON: write null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def write_similarity(reports: dict[str, dict], out: Path, absolute: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "similarity.json"  # an analysis this one replaces (--overwrite): its runs' matrices go too
    try:
        stale = {_filename(label) for label in json.loads(earlier.read_text())} if earlier.exists() else set()
    except (ValueError, TypeError):  # not an analysis' record: nothing is known to be stale
        stale = set()
    key = "mean_abs" if absolute else "mean"
    save_png(plot_similarity(reports, key), out / "similarity.png", dpi=120)
    if len({r["dataset"] for r in reports.values()}) > 1:
        save_png(plot_by_dataset(by_dataset(reports, key), key), out / "similarity_by_dataset.png", dpi=120)
    else:  # one dataset: no such figure, and none of an earlier analysis left beside this one's
        (out / "similarity_by_dataset.png").unlink(missing_ok=True)
    for label, r in reports.items():
        fig = plot_matrix(r, f"{label} ({r.get('method') or '?'}): expert similarity", absolute)
        save_png(fig, out / f"similarity_matrix_{_filename(label)}.png", dpi=120)
    (out / "similarity.json").write_text(json.dumps(_json_safe(reports), indent=2) + "\n")
    (out / "similarity.md").write_text(_markdown(reports))
    for name in stale - {_filename(label) for label in reports}:
        (out / f"similarity_matrix_{name}.png").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- dropout


def dropout_history(run: str | Path) -> dict:
    """The learned masking probability of a ``--dropout auto`` run, from its ``metrics.jsonl``: per layer, one value
    per epoch (the mean over experts when p is learned per expert), the last epoch's values, and the Pearson
    correlation of the last profile with depth (> 0: p grows with depth, the paper's decremental pattern; < 0:
    incremental)."""
    from ..patterns import layer_index

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / "metrics.jsonl"
    if not path.exists():
        raise MissingFileError(f"{folder} has no metrics.jsonl (is it a run folder of `mlae train`?)")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [m for m in lines if any("dropout" in v for v in m.get("learned", {}).values())]
    if not lines:
        raise InputError(f"{folder}: its metrics.jsonl records no learned masking probability (train with "
                         "--method mlae --dropout auto)")
    layers = [name for name, v in lines[-1]["learned"].items() if "dropout" in v]
    p = {name: [_mean(m["learned"][name]["dropout"]) for m in lines] for name in layers}
    final = {name: values[-1] for name, values in p.items()}
    depth = torch.tensor([float(layer_index(n)) for n in layers], dtype=torch.float64)
    last = torch.tensor(list(final.values()), dtype=torch.float64)
    corr = float("nan")
    # A constant profile (the heldout learner: one p for all layers) has no correlation; its float std may not be 0.
    if len(layers) > 1 and depth.std() > 0 and len(set(final.values())) > 1:
        corr = float(torch.corrcoef(torch.stack([depth, last]))[0, 1])
    return {"run": str(folder), "epochs": [m["epoch"] for m in lines], "layers": layers, "p": p, "final": final,
            "per_expert": {n: lines[-1]["learned"][n]["dropout"] for n in layers
                           if isinstance(lines[-1]["learned"][n]["dropout"], list)},
            "depth_correlation": corr}


def _correlation(history: dict) -> str:
    r = history["depth_correlation"]
    return "none" if math.isnan(r) else f"{r:.2f}"  # nan: one p for all layers, no profile to correlate


def _mean(value) -> float:
    return sum(value) / len(value) if isinstance(value, list) else float(value)


def plot_dropout_history(histories: dict[str, dict]):
    """One panel per run: p against the epoch, one line per adapted layer (dark: shallow, light: deep)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories) + 1.2, 3.6), squeeze=False,
                             sharey=True)
    for ax, (label, h) in zip(axes[0], histories.items()):
        colours = plt.cm.viridis([i / max(1, len(h["layers"]) - 1) for i in range(len(h["layers"]))])
        for colour, name in zip(colours, h["layers"]):
            ax.plot(h["epochs"], h["p"][name], color=colour, marker="o" if len(h["epochs"]) < 12 else None,
                    markersize=3, label=_short(name))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("learned masking probability p")
    axes[0][-1].legend(fontsize="x-small", ncol=1 + len(h["layers"]) // 13, loc="best")
    fig.tight_layout()
    return fig


def plot_dropout_profile(histories: dict[str, dict]):
    """The last epoch's p over relative depth, one line per run, beside the paper's stochastic patterns."""
    from ..patterns import DROPOUT_PATTERNS, resample

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in ("incremental", "decremental"):
        ys = resample(DROPOUT_PATTERNS[name], 12)
        ax.plot([i / 11 for i in range(12)], ys, linestyle="--", color="grey", linewidth=1,
                label=f"paper: {name}")
    for label, h in histories.items():
        n = len(h["layers"])
        xs = [i / max(1, n - 1) for i in range(n)]
        ax.plot(xs, list(h["final"].values()), marker="o", label=f"{label} (r = {_correlation(h)})")
    ax.set_xlabel("relative depth of the adapted layer (0 = first)")
    ax.set_ylabel("p after the last epoch")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def _dropout_markdown(histories: dict[str, dict]) -> str:
    layers = _all_layers(histories)
    labels = list(histories)
    lines = ["### Learned masking probability after the last epoch", "", "| layer | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for n in layers:
        cells = [histories[lb]["final"].get(n) for lb in labels]
        lines.append(f"| {n} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("| **correlation with depth** | " + " | ".join(f"**{_correlation(histories[lb])}**"
                                                               for lb in labels) + " |")
    lines += ["", "Correlation > 0: p grows with depth (the paper's decremental pattern); < 0: it falls "
              "(incremental); none: one p for every layer (the heldout learner), which has no depth profile.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- analyses


def _claim(out: str | Path, names: list[str], overwrite: bool, runs: list[Path] = ()) -> Path:
    """The output folder, after checking that none of the files an analysis writes there exists yet (unless
    ``overwrite``): figures of an earlier analysis are not replaced silently; and that it is not inside the
    ``folder:`` dataset one of ``runs`` was trained on (the next run there would read it as a class). Checked
    before any work."""
    out = Path(out)
    specs = []
    for run in runs:
        try:
            specs.append(read_weights_metadata(resolve_run(run)).get("dataset_spec") or "")
        except MLAEError:  # not an adapter run: the analysis leaves it out, or says why it cannot use it
            continue
    check_outside_datasets(out, specs)
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise InputError(f"{out} already holds {', '.join(taken)}; pass --overwrite to replace them or choose "
                         "another --out")
    return out


def analyze_similarity(runs: list[str | Path], out: str | Path, *, layer: str | int | None = MEAN,
                       labels: str | list[str] | None = None, absolute: bool = False,
                       overwrite: bool = False) -> Analysis:
    """Expert similarity of ``runs`` (run folders, adapter files or `mlae compare` folders), one series each
    (``labels``, default the folder names); writes similarity.png / .json / .md and one similarity_matrix_<run>.png
    per run (of ``layer``: an index, a name (suffix) or "mean") into ``out``. ``absolute``: plot mean |cosine|.
    Files of an earlier analysis in ``out`` are an error unless ``overwrite``."""
    runs, names = _runs_and_labels(runs, labels)
    out = _claim(out, ["similarity.png", "similarity.json", "similarity.md", "similarity_by_dataset.png"]
                 + [f"similarity_matrix_{_filename(n)}.png" for n in names], overwrite, [r for r, _ in runs])

    def report(label: str, run: Path) -> dict:
        path = resolve_run(run)
        model, meta = _load(path)
        try:
            return {"adapter": str(path), "method": meta.get("method"), "dataset": meta.get("dataset"),
                    "series": series_of(path, meta, label if labels else None),
                    **similarity_report(model, layer)}
        except ValueError as err:
            raise InputError(f"{run}: {err}") from None

    reports = _each_usable(runs, names, report)
    write_similarity(reports, out, absolute=absolute)
    return Analysis(reports, _markdown(reports))


def analyze_attention(run: str | Path, block: int, out: str | Path, *, images: int = 4,
                      other_blocks: str = "adapted", dataset: str | None = None, data_root: str | None = None,
                      split: str = "test", relative: bool = False, overwrite: bool = False) -> dict:
    """CLS attention maps of ``block`` (0-based, negative from the end) for ``images`` evaluation images of the
    run's task; writes attention_block<B>.png and .json into ``out`` and returns the JSON's content, with
    ``maps`` as a tensor ``[images, columns, *patch grid]``. See :func:`attention_maps` for ``other_blocks`` and
    :func:`plot_attention` for ``relative``. Files of an earlier analysis of that block in ``out`` are an error
    unless ``overwrite``."""
    path = resolve_run(run)
    model, meta = _load(path)
    depth = len(getattr(model, "blocks", ()))
    block = block + depth if -depth <= block < 0 else block
    stem = f"attention_block{block}"
    out = _claim(out, [f"{stem}.png", f"{stem}.json"], overwrite, [path])
    x, shown = sample_images(meta, images, dataset, data_root, split)
    columns, maps = attention_maps(model, x, block, other_blocks)
    label = run_labels([run])[0]
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_attention(shown, columns, maps, f"{label} ({meta.get('method')}): CLS attention, block {block}, "
                         f"other blocks {other_blocks}", relative=relative)
    save_png(fig, out / f"{stem}.png", dpi=120)
    data = {"adapter": str(path), "block": block, "other_blocks": other_blocks, "columns": columns, "maps": maps}
    (out / f"{stem}.json").write_text(json.dumps({**data, "maps": maps.tolist()}) + "\n")
    return data


def analyze_dropout(runs: list[str | Path], out: str | Path, *, labels: str | list[str] | None = None,
                    overwrite: bool = False) -> Analysis:
    """The masking probability that ``--dropout auto`` runs learned (:func:`dropout_history`), one panel each;
    writes dropout.png, dropout_profile.png, dropout.json and dropout.md into ``out`` (files of an earlier analysis
    there are an error unless ``overwrite``)."""
    runs, names = _runs_and_labels(runs, labels)
    out = _claim(out, ["dropout.png", "dropout_profile.png", "dropout.json", "dropout.md"], overwrite,
                 [r for r, _ in runs])
    histories = _each_usable(runs, names, lambda label, run: dropout_history(run))
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in (("dropout.png", plot_dropout_history(histories)),
                      ("dropout_profile.png", plot_dropout_profile(histories))):
        save_png(fig, out / name, dpi=120)
    text = _dropout_markdown(histories)
    (out / "dropout.json").write_text(json.dumps(_json_safe(histories), indent=2) + "\n")
    (out / "dropout.md").write_text(text)
    return Analysis(histories, text)
