"""`mlae analyze similarity|attention|dropout|ablation`: the MLAE paper's analyses of trained runs
(:mod:`mlae.experiments.analysis`) and its ablation tables as presets of method variants
(:mod:`mlae.experiments.ablations`), run through compare's machinery.
"""
from __future__ import annotations

import argparse

from .train import _fail, add_train_options, positive_int, train_argv, train_options

__all__ = ["register"]


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


def _wrap(text: str) -> str:
    """Descriptions are wrapped by hand: the raw formatter keeps the epilogs' line breaks."""
    import textwrap

    return textwrap.fill(text, 100)


# --------------------------------------------------------------------------------------------- similarity


def _register_similarity(sub) -> None:
    from ..experiments.analysis import MEAN

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
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier analysis in --out")
    p.set_defaults(func=run_similarity)


def run_similarity(args: argparse.Namespace) -> int:
    from ..experiments.analysis import analyze_similarity

    try:
        found = analyze_similarity(args.runs, args.out, layer=args.layer, labels=args.labels, absolute=args.absolute,
                                    overwrite=args.overwrite)
    except Exception as err:
        return _fail(err)
    print(found.markdown)
    print(f"wrote {args.out}/similarity.png, similarity.json, similarity.md and {len(found.data)} "
          "similarity_matrix_*.png")
    return 0


# --------------------------------------------------------------------------------------------- attention


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
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier analysis in --out")
    p.set_defaults(func=run_attention)


def run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiments.analysis import analyze_attention

    try:
        found = analyze_attention(args.run, args.block, args.out, images=args.images, other_blocks=args.other_blocks,
                                  dataset=args.dataset, data_root=args.data_root, split=args.split,
                                  relative=args.relative, overwrite=args.overwrite)
    except Exception as err:
        return _fail(err)
    stem = f"attention_block{found['block']}"
    print(f"wrote {Path(args.out) / stem}.png ({found['maps'].shape[0]} images × {len(found['columns'])} maps) and "
          f"{stem}.json")
    return 0


# --------------------------------------------------------------------------------------------- dropout


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
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier analysis in --out")
    p.set_defaults(func=run_dropout)


def run_dropout(args: argparse.Namespace) -> int:
    from ..experiments.analysis import analyze_dropout

    try:
        found = analyze_dropout(args.runs, args.out, labels=args.labels, overwrite=args.overwrite)
    except Exception as err:
        return _fail(err)
    print(found.markdown)
    print(f"wrote {args.out}/dropout.png, dropout_profile.png, dropout.json and dropout.md")
    return 0


# --------------------------------------------------------------------------------------------- ablation


# Train options the preset or the comparison replaces (flag -> what to use instead).
REFUSED = {"--dataset": "; use --datasets", "--method": "; the preset chooses the methods", "--seed": "; use --seeds",
           "--resume": " (mlae compare resumes by itself)", "--overwrite": " (delete a run folder to redo it)",
           "--quiet": " (each run's output goes to its train.log)",
           "--dropout": "; the preset's variants set the masking probability from --p"}
LEAVE_OUT = ("--out", "--config")  # the ablation's own


def _register_ablation(sub) -> None:
    from ..experiments.ablations import DEFAULT_P, PRESETS

    p = sub.add_parser(
        "ablation",
        help="run one of the paper's ablation tables as a preset of method variants (through mlae compare)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Presets of labelled method variants reproducing the MLAE paper's ablations on our data: "
        "components (Table 5), masking (Table 4), rank (Table 12), coeff-init (Table 14), dropout (Table 15), "
        "input-dropout (expert masking vs LoRA input dropout vs none). A preset is run by `mlae compare` (finished "
        "runs are skipped, so the command can be repeated); train options (--epochs, --backbone, --config, ...) "
        "apply to every variant. --list shows the presets' variants, --dry-run the compare command."),
        epilog="example: mlae analyze ablation rank --datasets suite:all --seeds 0,1 --out runs/ablation_rank "
        "--epochs 20")
    add_train_options(p, LEAVE_OUT, REFUSED)
    p.add_argument("preset", nargs="?", choices=PRESETS, help="which ablation: " + ", ".join(PRESETS))
    g = p.add_argument_group("ablation")
    g.add_argument("--list", action="store_true", help="print the presets and their variants, then exit")
    g.add_argument("--p", dest="p", type=float, default=DEFAULT_P, help="masking probability of the variants that "
                   f"need one (default {DEFAULT_P}, the best average of Table 15)")
    g.add_argument("--datasets", metavar="SPECS", help="comma-separated dataset specs (e.g. suite:all)")
    g.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default 0)")
    g.add_argument("--out", dest="compare_out", metavar="DIR", help="output folder of the comparison")
    g.add_argument("--jobs", type=positive_int, metavar="N", help="runs in parallel (see mlae compare --help)")
    g.add_argument("--config", metavar="FILE", help="YAML recipe for every run")
    g.add_argument("--dry-run", action="store_true", help="print the mlae compare command instead of running it")
    p.set_defaults(func=run_ablation)


def run_ablation(args: argparse.Namespace) -> int:
    import shlex

    from ..errors import InputError
    from ..experiments.ablations import compare_argv, format_presets, preset, run_ablation as run_preset
    from ..experiments.variants import parse_seeds
    from .compare import report

    options = train_options(args, LEAVE_OUT, REFUSED)
    try:
        if args.list:
            print(format_presets(args.p))
            return 0
        missing = [flag for flag, v in (("PRESET", args.preset), ("--datasets", args.datasets),
                                        ("--out", args.compare_out)) if not v]
        if missing:
            raise InputError(f"ablation needs {', '.join(missing)} (or --list)")
        datasets = [d for d in args.datasets.split(",") if d.strip()]
        seeds = parse_seeds(args.seeds)
        if args.dry_run:
            extra = train_argv(options) + (["--jobs", str(args.jobs)] if args.jobs else []) + (
                ["--config", args.config] if args.config else [])
            print("mlae " + shlex.join(compare_argv(preset(args.preset, args.p), datasets, seeds, args.compare_out,
                                                    extra)))
            return 0
    except Exception as err:
        return _fail(err)
    return report(lambda: run_preset(args.preset, datasets, seeds, args.compare_out, p=args.p, options=options,
                                     config=args.config, jobs=args.jobs))
