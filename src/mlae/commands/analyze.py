"""`mlae analyze similarity|attention|dropout|ablation`: the MLAE paper's analyses of trained runs.

- ``similarity``: expert cosine similarity per adapted layer and overall (paper Fig. 4, appendix A.4) and the
  E×E similarity matrix of one layer or the mean over layers (Fig. 5), for one or more run folders.
- ``attention``: CLS-token attention of one block with only expert ``i``'s update active (Fig. 6), next to the
  backbone without adapters and the fine-tuned model. The attention weights are computed here from the block's
  qkv output (timm's fused attention never materialises them).
- ``dropout``: the masking probability that ``--dropout auto`` learned, per adapted layer over the epochs and as a
  profile over depth next to the paper's incremental / decremental patterns (appendix A.5).
- ``ablation``: the paper's ablation tables (Tables 4, 5, 12, 14, 15) as presets of method variants
  (:mod:`mlae.ablations`), run through ``mlae compare``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, MissingFileError
from ..utils import pyplot

__all__ = ["register", "resolve_run", "expand_runs", "series_of", "run_labels", "similarity_report",
           "plot_similarity", "by_dataset", "plot_by_dataset", "plot_matrix", "write_similarity", "attention_maps",
           "plot_attention", "dropout_history", "plot_dropout_history", "plot_dropout_profile"]

ADAPTER_FILE = "adapter.safetensors"
MEAN = "mean"  # --layer value / row label of the mean over adapted layers


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="expert similarity, per-expert attention maps, learned masking probabilities and ablation "
        "presets of trained runs",
        description="Analyses of the MLAE paper on run folders written by `mlae train` / `mlae compare`.")
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    _register_similarity(sub)
    _register_attention(sub)
    _register_dropout(sub)
    _register_ablation(sub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


# --------------------------------------------------------------------------------------------- runs


def resolve_run(run: str | Path) -> Path:
    """The adapter file of a run: ``run`` itself or ``run/adapter.safetensors``."""
    path = Path(run)
    if path.is_dir():
        if not (path / ADAPTER_FILE).exists():
            other = " (it holds a fully fine-tuned model: no adapters to analyse)" if (
                path / "model.safetensors").exists() else " (an unfinished run?)"
            raise MissingFileError(f"{path} has no {ADAPTER_FILE}{other}")
        return path / ADAPTER_FILE
    if not path.exists():
        raise MissingFileError(f"run folder or adapter file not found: {path}")
    return path


def expand_runs(runs: list[str | Path]) -> list[Path]:
    """RUN arguments: run folders, adapter files, or ``mlae compare`` output folders (standing for every finished
    adapter run in their ``runs/<variant>/<dataset>/s<seed>`` folders)."""
    out = []
    for run in map(Path, runs):
        if run.is_dir() and not (run / ADAPTER_FILE).exists() and (run / "runs").is_dir():
            found = sorted(p.parent for p in run.glob(f"runs/*/*/s*/{ADAPTER_FILE}"))
            if not found:
                raise MissingFileError(f"{run} is an `mlae compare` folder without finished adapter runs")
            out += found
        else:
            out.append(run)
    return out


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


def _runs_and_labels(runs: list[str], labels: str | None) -> tuple[list[Path], list[str]]:
    """The RUN arguments expanded, and one distinct label each (``--labels A,B,...`` or the folder names)."""
    runs = expand_runs(runs)
    names = labels.split(",") if labels else run_labels(runs)
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise InputError(f"--labels needs {len(runs)} distinct names, got {labels!r}")
    return runs, names


def _load(path: Path) -> tuple[nn.Module, dict]:
    import mlae
    from ..engine import load_trained

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


def _wrap(text: str) -> str:
    """Descriptions are wrapped by hand: the raw formatter keeps the epilogs' line breaks."""
    import textwrap

    return textwrap.fill(text, 100)


def _register_similarity(sub) -> None:
    p = sub.add_parser(
        "similarity", help="expert cosine similarity per layer and overall (paper Fig. 4, 5)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Cosine similarity between the flattened experts c_i·B_i·A_i of each adapted layer, "
        "averaged over expert pairs and layers (paper appendix A.4). LoRA runs: each rank-1 component b_j·a_jᵀ is "
        "an 'expert'. Compare e.g. LoRA, LoRA+Dropout and MLAE trained on the same task."),
        epilog="writes: similarity.png (bars per layer, one series per run), similarity_matrix_<run>.png (the "
        "E×E matrix of --layer per run), similarity.json and similarity.md; for runs on several datasets also "
        "similarity_by_dataset.png (Fig. 4: bars per dataset, one series per method, mean over seeds)\n\n"
        "examples: mlae analyze similarity runs/cifar_lora_s0 runs/cifar_mlae_s0 --out analysis/cifar\n"
        "          mlae analyze similarity runs/compare --out analysis/compare   (a whole `mlae compare` folder)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their adapter.safetensors files), or "
                   "`mlae compare` output folders (all their finished adapter runs)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and tables")
    p.add_argument("--layer", default=MEAN, help="layer of the E×E matrices: an index into the adapted layers "
                   "(0 = first, -1 = last), a module name (suffix) such as blocks.3.attn.qkv, or 'mean' for the "
                   "mean over layers (default)")
    p.add_argument("--labels", metavar="A,B,...", help="series names, one per run (default: the run folder names)")
    p.add_argument("--abs", dest="absolute", action="store_true", help="plot mean |cosine| instead of the signed "
                   "mean (the tables always hold both)")
    p.set_defaults(func=run_similarity)


def run_similarity(args: argparse.Namespace) -> int:
    from .train import _fail

    try:
        runs, labels = _runs_and_labels(args.runs, args.labels)
        reports = {}
        for label, run in zip(labels, runs):
            path = resolve_run(run)
            model, meta = _load(path)
            try:
                reports[label] = {"adapter": str(path), "method": meta.get("method"), "dataset": meta.get("dataset"),
                                  "series": series_of(path, meta, label if args.labels else None),
                                  **similarity_report(model, args.layer)}
            except ValueError as err:
                raise InputError(f"{run}: {err}") from None
        write_similarity(reports, Path(args.out), absolute=args.absolute)
    except Exception as err:
        return _fail(err)
    print(_markdown(reports))
    print(f"wrote {args.out}/similarity.png, similarity.json, similarity.md and {len(reports)} similarity_matrix_*.png")
    return 0


def write_similarity(reports: dict[str, dict], out: Path, absolute: bool = False) -> None:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    key = "mean_abs" if absolute else "mean"
    fig = plot_similarity(reports, key)
    fig.savefig(out / "similarity.png", dpi=120)
    plt.close(fig)
    if len({r["dataset"] for r in reports.values()}) > 1:
        fig = plot_by_dataset(by_dataset(reports, key), key)
        fig.savefig(out / "similarity_by_dataset.png", dpi=120)
        plt.close(fig)
    for label, r in reports.items():
        fig = plot_matrix(r, f"{label} ({r.get('method') or '?'}): expert similarity", absolute)
        fig.savefig(out / f"similarity_matrix_{_filename(label)}.png", dpi=120)
        plt.close(fig)
    (out / "similarity.json").write_text(json.dumps(_json_safe(reports), indent=2) + "\n")
    (out / "similarity.md").write_text(_markdown(reports))


# --------------------------------------------------------------------------------------------- attention


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the block's input is known."""


@contextmanager
def _adapters_off(model: nn.Module):
    """Put every adapter layer's frozen base ``nn.Linear`` back in its place for the duration."""
    import mlae

    swapped = []
    for name, layer in list(mlae.adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
        swapped.append((parent, child, layer))
    try:
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def _attention_input(model: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens ``block.attn`` receives for images ``x`` (the forward stops there)."""
    seen = []

    def hook(module, args):
        seen.append(args[0])
        raise _Captured

    handle = block.attn.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise InputError("the model's forward never reached the chosen block's attention")
    return seen[0]


def _cls_attention(attn: nn.Module, qkv: torch.Tensor, prefix: int, grid: tuple[int, int],
                   has_cls: bool) -> torch.Tensor:
    """Softmax(q·kᵀ) from a qkv output ``[B, N, 3·C]`` as timm's Attention computes it, averaged over heads;
    the CLS query's row over the patch tokens (mean over queries without a class token), as ``[B, *grid]``."""
    b, n, _ = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1).mean(1)  # [B, N, N]
    rows = weights[:, 0] if has_cls else weights[:, prefix:].mean(1)
    return rows[:, prefix:].reshape(b, *grid)


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, block: int,
                   other_blocks: str = "adapted") -> tuple[list[str], torch.Tensor]:
    """CLS attention maps of ``model.blocks[block]`` for input images ``x``: columns ``base`` (the backbone
    without any adapter), ``all experts`` (the fine-tuned model) and ``expert i`` (the block's qkv update cut to
    expert ``i``; LoRA: rank-1 component ``i``). ``other_blocks``: "adapted" keeps the other blocks' adapters
    (``all experts`` is then exactly the fine-tuned model), "base" turns them off so that only the chosen block
    differs from the backbone. Returns (column names, maps ``[images, columns, *patch grid]``)."""
    from ..adapters.base import AdapterLayer

    if other_blocks not in ("adapted", "base"):
        raise InputError(f"other_blocks must be 'adapted' or 'base', got {other_blocks!r}")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise InputError(f"attention maps need a timm VisionTransformer, got {type(model).__name__}")
    if not -len(blocks) <= block < len(blocks):
        raise InputError(f"--block {block} is out of range: the model has {len(blocks)} blocks")
    blk = blocks[block]
    layer = blk.attn.qkv
    if not isinstance(layer, AdapterLayer):
        raise InputError(f"block {block}'s attn.qkv is not adapted in this run (no experts to show)")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_cls = getattr(model, "cls_token", None) is not None
    grid = tuple(model.patch_embed.grid_size)
    model.eval()

    with _adapters_off(model):
        x_base = _attention_input(model, blk, x)
    x_up = _attention_input(model, blk, x) if other_blocks == "adapted" else x_base
    try:
        a, b = (t.detach() for t in layer.factors())
    except TypeError as err:  # e.g. MoLE
        raise InputError(f"no per-expert updates in {type(layer).__name__}: {err}") from None
    base_up = layer.base(x_up)
    columns = ["base", "all experts"]
    outputs = [layer.base(x_base), layer(x_up)]
    start = 0
    for i, size in enumerate(layer.expert_sizes()):
        rows = slice(start, start + size)
        outputs.append(base_up + (x_up @ a[rows].T.to(x_up.dtype)) @ b[:, rows].T.to(x_up.dtype))
        columns.append(f"expert {i + 1}")
        start += size
    maps = torch.stack([_cls_attention(blk.attn, qkv, prefix, grid, has_cls) for qkv in outputs], dim=1)
    return columns, maps


def plot_attention(images: torch.Tensor, columns: list[str], maps: torch.Tensor, title: str = "",
                   relative: bool = False):
    """Grid: one row per image; columns: the image, then each map over the image, min-max scaled per panel.
    ``relative``: every map after the first (``base``) is shown as its difference to it, scaled by its largest
    magnitude (red: more attention than the backbone, blue: less) -- small updates are invisible otherwise."""
    import torch.nn.functional as F

    plt = pyplot()
    n, c = maps.shape[:2]
    size = images.shape[-2:]
    fig, axes = plt.subplots(n, c + 1, figsize=(1.5 * (c + 1), 1.5 * n + (0.4 if title else 0.2)), squeeze=False)
    up = F.interpolate(maps.reshape(n * c, 1, *maps.shape[2:]).float(), size=size, mode="bilinear",
                       align_corners=False).reshape(n, c, *size)
    lo, hi = up.amin((-2, -1), keepdim=True), up.amax((-2, -1), keepdim=True)
    scaled = (up - lo) / (hi - lo).clamp_min(1e-12)
    if relative:
        diff = up[:, 1:] - up[:, :1]
        scaled[:, 1:] = diff / diff.abs().amax((-2, -1), keepdim=True).clamp_min(1e-12)
    for r in range(n):
        img = images[r].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[r, 0].imshow(img)
        for j in range(c):
            axes[r, j + 1].imshow(img)
            style = {"cmap": "RdBu_r", "vmin": -1, "vmax": 1} if relative and j else {"cmap": "jet", "vmin": 0,
                                                                                       "vmax": 1}
            axes[r, j + 1].imshow(scaled[r, j].cpu().numpy(), alpha=0.6 if relative and j else 0.5, **style)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    names = ["image", columns[0], *(f"{name} − {columns[0]}" if relative else name for name in columns[1:])]
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _register_attention(sub) -> None:
    p = sub.add_parser(
        "attention", help="per-expert CLS attention maps of one block (paper Fig. 6)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("For a few test images of the run's dataset: the CLS token's attention to the patches in "
        "block B (softmax(q·kᵀ/√d) from the block's qkv output, averaged over heads) for the backbone without "
        "adapters ('base'), the fine-tuned model ('all experts') and, for each expert i, the fine-tuned model with "
        "block B's qkv update restricted to expert i. LoRA runs show their rank-1 components as experts."),
        epilog="writes: attention_block<B>.png (rows: images; columns: image, base, all experts, expert 1..E) "
        "and attention_block<B>.json (the maps)\n\n"
        "example: mlae analyze attention runs/cifar_mlae_s0 --block 5 --images 4 --out analysis/cifar")
    p.add_argument("run", metavar="RUN", help="run folder (or its adapter.safetensors)")
    p.add_argument("--block", type=int, required=True, help="transformer block (0-based; -1 = last)")
    p.add_argument("--images", type=int, default=4, help="number of test images, taken evenly across the split "
                   "(default 4)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the figure")
    p.add_argument("--other-blocks", choices=["adapted", "base"], default="adapted",
                   help="adapted: the other blocks keep their adapters (default); base: only block B is adapted")
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (default: the run's)")
    p.add_argument("--data-root", metavar="DIR", help="dataset folder (default: the run's)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split to take the images from")
    p.add_argument("--relative", action="store_true", help="show every map after 'base' as its difference to the "
                   "base map (red: more attention, blue: less); the saved maps stay absolute")
    p.set_defaults(func=run_attention)


def _test_images(meta: dict, n: int, dataset: str | None, data_root: str | None, split: str):
    """``n`` evaluation images of the run's task: (model inputs, images in [0, 1] for display)."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD, load_task, prepare_batch
    from ..engine import Inputs

    if n < 1:
        raise InputError(f"--images must be >= 1, got {n}")
    size = int(meta["image_size"])
    task = load_task(dataset or meta.get("dataset_spec") or meta["dataset"],
                     data_root=data_root if data_root is not None else meta.get("data_root"),
                     image_size=size, split=split, seed=int(meta.get("seed", 0)))
    pool = task.eval.images
    index = torch.linspace(0, len(pool) - 1, min(n, len(pool))).round().long().unique()
    raw = pool[index]
    x = Inputs(task.augment, size, torch.device("cpu"), meta.get("input_mean"), meta.get("input_std"))(raw,
                                                                                                       train=False)
    shown = prepare_batch(raw, train=False, augment=task.augment, image_size=size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return x, shown * std + mean


def run_attention(args: argparse.Namespace) -> int:
    from .train import _fail

    try:
        path = resolve_run(args.run)
        model, meta = _load(path)
        x, shown = _test_images(meta, args.images, args.dataset, args.data_root, args.split)
        depth = len(getattr(model, "blocks", ()))
        block = args.block + depth if -depth <= args.block < 0 else args.block
        columns, maps = attention_maps(model, x, block, args.other_blocks)
        label = run_labels([args.run])[0]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plt = pyplot()
        fig = plot_attention(shown, columns, maps, f"{label} ({meta.get('method')}): CLS attention, block "
                             f"{block}, other blocks {args.other_blocks}", relative=args.relative)
        stem = f"attention_block{block}"
        fig.savefig(out / f"{stem}.png", dpi=120)
        plt.close(fig)
        (out / f"{stem}.json").write_text(json.dumps({
            "adapter": str(path), "block": block, "other_blocks": args.other_blocks, "columns": columns,
            "maps": maps.tolist()}) + "\n")
    except Exception as err:
        return _fail(err)
    print(f"wrote {out / stem}.png ({maps.shape[0]} images × {len(columns)} maps) and {stem}.json")
    return 0


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
    if len(layers) > 1 and depth.std() > 0 and last.std() > 0:
        corr = float(torch.corrcoef(torch.stack([depth, last]))[0, 1])
    return {"run": str(folder), "epochs": [m["epoch"] for m in lines], "layers": layers, "p": p, "final": final,
            "per_expert": {n: lines[-1]["learned"][n]["dropout"] for n in layers
                           if isinstance(lines[-1]["learned"][n]["dropout"], list)},
            "depth_correlation": corr}


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
        ax.plot(xs, list(h["final"].values()), marker="o", label=f"{label} (r = {h['depth_correlation']:.2f})")
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
    lines.append("| **correlation with depth** | " + " | ".join(f"**{histories[lb]['depth_correlation']:.2f}**"
                                                               for lb in labels) + " |")
    lines += ["", "Correlation > 0: p grows with depth (the paper's decremental pattern); < 0: it falls "
              "(incremental).", ""]
    return "\n".join(lines)


def _register_dropout(sub) -> None:
    p = sub.add_parser(
        "dropout", help="the masking probability learned by --dropout auto, per layer over training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("For runs trained with `mlae train --method mlae --dropout auto`: the learned expert "
        "masking probability p of every adapted layer after each epoch (from the run's metrics.jsonl), and the last "
        "epoch's profile over depth next to the paper's incremental and decremental dropout patterns (appendix A.5). "
        "With one p per expert (--dropout-per-expert) the figures show the mean over a layer's experts; "
        "dropout.json keeps them all."),
        epilog="writes: dropout.png (p per layer over the epochs, one panel per run), dropout_profile.png, "
        "dropout.json and dropout.md\n\n"
        "example: mlae analyze dropout runs/cifar_mlae_s0 runs/dtd_mlae_s0 --out analysis/dropout")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their adapter.safetensors files), or "
                   "`mlae compare` output folders (all their finished adapter runs)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and tables")
    p.add_argument("--labels", metavar="A,B,...", help="panel names, one per run (default: the run folder names)")
    p.set_defaults(func=run_dropout)


def run_dropout(args: argparse.Namespace) -> int:
    from .train import _fail

    try:
        runs, labels = _runs_and_labels(args.runs, args.labels)
        histories = {label: dropout_history(run) for label, run in zip(labels, runs)}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plt = pyplot()
        for name, fig in (("dropout.png", plot_dropout_history(histories)),
                          ("dropout_profile.png", plot_dropout_profile(histories))):
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
        (out / "dropout.json").write_text(json.dumps(_json_safe(histories), indent=2) + "\n")
        (out / "dropout.md").write_text(_dropout_markdown(histories))
    except Exception as err:
        return _fail(err)
    print(_dropout_markdown(histories))
    print(f"wrote {out}/dropout.png, dropout_profile.png, dropout.json and dropout.md")
    return 0


# --------------------------------------------------------------------------------------------- ablation


ABLATION_OWN = {"analysis", "preset", "list", "p", "datasets", "seeds", "compare_out", "jobs", "config", "dry_run",
                "func", "command"}


def _register_ablation(sub) -> None:
    from ..ablations import DEFAULT_P, PRESETS
    from .compare import refuse_options, train_parent

    p = sub.add_parser(
        "ablation", parents=[train_parent()], conflict_handler="resolve",
        help="run one of the paper's ablation tables as a preset of method variants (through mlae compare)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Presets of labelled method variants reproducing the MLAE paper's ablations on our data: "
        "components (Table 5), masking (Table 4), rank (Table 12), coeff-init (Table 14), dropout (Table 15), "
        "input-dropout (expert masking vs LoRA input dropout vs none). A preset is run by `mlae compare` (finished "
        "runs are skipped, so the command can be repeated); train options (--epochs, --backbone, --config, ...) "
        "apply to every variant. --list shows the presets' variants, --dry-run the compare command."),
        epilog="example: mlae analyze ablation rank --datasets suite:all --seeds 0,1 --out runs/ablation_rank "
        "--epochs 20")
    p.add_argument("preset", nargs="?", choices=PRESETS, help="which ablation: " + ", ".join(PRESETS))
    g = p.add_argument_group("ablation")
    g.add_argument("--list", action="store_true", help="print the presets and their variants, then exit")
    g.add_argument("--p", dest="p", type=float, default=DEFAULT_P, help="masking probability of the variants that "
                   f"need one (default {DEFAULT_P}, the best average of Table 15)")
    g.add_argument("--datasets", metavar="SPECS", help="comma-separated dataset specs (e.g. suite:all)")
    g.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default 0)")
    g.add_argument("--out", dest="compare_out", metavar="DIR", help="output folder of the comparison")
    g.add_argument("--jobs", type=int, metavar="N", help="runs in parallel (see mlae compare --help)")
    g.add_argument("--config", metavar="FILE", help="YAML recipe for every run")
    g.add_argument("--dry-run", action="store_true", help="print the mlae compare command instead of running it")
    refuse_options(p, {"--dataset": "; use --datasets", "--method": "; the preset chooses the methods",
                       "--seed": "; use --seeds", "--resume": " (mlae compare resumes by itself)",
                       "--overwrite": " (delete a run folder to redo it)",
                       "--quiet": " (each run's output goes to its train.log)"})
    p.set_defaults(func=run_ablation, _flags=lambda given: _option_flags(p, given))


def _option_flags(parser: argparse.ArgumentParser, given: dict) -> list[str]:
    """Command-line flags that make ``parser`` parse to ``given`` (the inverse of parsing, for the options)."""
    flags = []
    for action in parser._actions:  # noqa: SLF001 (argparse has no public getter)
        if action.dest not in given or not action.option_strings:
            continue
        value = given[action.dest]
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if action.nargs == 0:  # store_const / store_true / store_false
            flags.append(flag)
        elif action.nargs in ("+", "*"):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def run_ablation(args: argparse.Namespace) -> int:
    import shlex

    from ..ablations import compare_argv, format_presets, preset
    from .train import _fail

    try:
        if args.list:
            print(format_presets(args.p))
            return 0
        missing = [flag for flag, v in (("PRESET", args.preset), ("--datasets", args.datasets),
                                        ("--out", args.compare_out)) if not v]
        if missing:
            raise InputError(f"ablation needs {', '.join(missing)} (or --list)")
        given = {k: v for k, v in vars(args).items() if k not in ABLATION_OWN and k != "_flags"}
        extra = args._flags(given)
        if args.jobs:
            extra += ["--jobs", str(args.jobs)]
        if args.config:
            extra += ["--config", args.config]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        argv = compare_argv(preset(args.preset, args.p), [d for d in args.datasets.split(",") if d.strip()],
                            seeds, args.compare_out, extra)
    except Exception as err:
        return _fail(err)
    if args.dry_run:
        print("mlae " + shlex.join(argv))
        return 0
    from ..cli import main

    return main(argv)
