"""`mlae train`, `mlae eval`, `mlae predict` and `mlae export`, and the train options other commands share.

Option precedence for `train`: the method's and TrainConfig's defaults < the `--config` recipe (its
`per_dataset` entry for the dataset included) < options given on the command line. `--resume` starts from the
run folder's own `config.yaml` instead of the defaults and the recipe.

The train options are defined once, as data (:func:`train_option_specs`): :func:`add_train_options` adds them
to `train`'s parser and to those of `compare`, `sweep` and `analyze ablation` (which leave some out or refuse
them), and :func:`train_argv` writes options back as the flags that parse to them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..attention import ATTENTION_CHOICES
from ..errors import InputError
from ..hardware import CPU_AUTO_PRECISION, THREADS_RULE
from ..recipes import METHODS, config_from_options


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_predict(subparsers)
    _register_export(subparsers)


# --------------------------------------------------------------------------------------------- train options


@dataclass(frozen=True)
class OptionSpec:
    """One `mlae train` option: its help group, flags and the rest of ``add_argument``'s arguments."""

    group: str
    flags: tuple[str, ...]
    kwargs: dict

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")  # argparse's rule


def train_option_specs() -> list[OptionSpec]:
    """Every `mlae train` option in help order (built on each call: methods may be registered at any time)."""
    from ..engine import HEAD_INITS, NORMALIZE_CHOICES, TrainConfig

    d = TrainConfig()
    specs: list[OptionSpec] = []

    def add(group: str, *flags: str, **kwargs) -> None:
        specs.append(OptionSpec(group, flags, kwargs))

    g = "task and method"
    add(g, "--dataset", metavar="SPEC", help=f"dataset spec (default {d.dataset}; e.g. digits, vtab:cifar or "
        "fgvc:CUB with --data-root, folder:PATH)")
    add(g, "--method", choices=list(METHODS), help=f"fine-tuning method (default {d.method})")
    add(g, "--config", metavar="FILE", help="YAML recipe (e.g. configs/vtab_mlae.yaml); command-line options "
        "override it")
    add(g, "--data-root", metavar="DIR", help="folder holding the datasets")
    add(g, "--no-cache", dest="cache", action="store_false", help="decode the images afresh and write no cache "
        "file (default: decoded images are cached next to the data, or in ~/.cache/mlae)")
    add(g, "--split", choices=["test", "val"], help="test: train on train+val, report test (default); val: hold "
        "out a validation split and report it")
    add(g, "--skip-bad-images", action="store_true", help="folder datasets: train without the images that cannot "
        "be read (listed in results.json) instead of stopping")

    g = "method options (each applies to the methods named in brackets)"
    seen: dict[str, list[str]] = {}
    options = {}
    for method in METHODS.values():
        for opt in method.options:
            seen.setdefault(opt.name, []).append(method.name)
            options.setdefault(opt.name, opt)
    for name, opt in options.items():
        defaults = {m: _shown(METHODS[m].defaults()[name]) for m in seen[name]}
        default = next(iter(defaults.values())) if len(set(defaults.values())) == 1 else ", ".join(
            f"{m}: {v}" for m, v in defaults.items())
        if opt.flag is not None:  # a boolean switched by its flag, whose help says what it does and the default
            add(g, opt.cli_flag, dest=name, action="store_const", const=not opt.default,
                help=f"{opt.help} [{', '.join(seen[name])}]")
        else:
            add(g, opt.cli_flag, dest=name, type=opt.type, choices=opt.choices, nargs=opt.nargs,
                help=f"{opt.help} [{', '.join(seen[name])}; default {default}]")

    g = "backbone"
    add(g, "--backbone", metavar="NAME|PATH", help="timm model name or checkpoint file (default: the embedded ViT)")
    add(g, "--no-pretrained", dest="pretrained", action="store_false", help="random initial weights")
    add(g, "--arch", help="timm architecture of a checkpoint file")
    add(g, "--img-size", type=int, help="input size (default: the backbone's)")
    add(g, "--patch-size", type=int, help="patch size (default: the backbone's)")
    add(g, "--drop-path", type=float, help=f"stochastic depth rate (default {d.drop_path})")
    add(g, "--normalize", choices=list(NORMALIZE_CHOICES), help="input mean/std: backbone = the backbone's own "
        "pretrained_cfg, inception = 0.5/0.5 ([-1, 1], the MLAE paper), imagenet = ImageNet's; auto = backbone for "
        "the embedded ViT, imagenet otherwise (default auto)")
    add(g, "--head-init", choices=list(HEAD_INITS), help="the new classifier head: timm = what the installed timm "
        "draws (trunc-normal 0.02), zero = zeros as timm 0.4 did (default timm)")

    g = "optimisation"
    add(g, "--epochs", type=int, help=f"training epochs (default {d.epochs})")
    add(g, "--warmup-epochs", type=int, help=f"linear warmup before the cosine decay (default {d.warmup_epochs})")
    add(g, "--batch-size", type=int, help=f"global batch size (default {d.batch_size})")
    add(g, "--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    add(g, "--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    add(g, "--seed", type=int, help=f"random seed (default {d.seed})")
    add(g, "--precision", choices=["auto", "bf16", "fp32"], help=f"auto: bf16 autocast on CUDA where supported, and on {CPU_AUTO_PRECISION}; else fp32 "
           "(default auto)")
    add(g, "--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add(g, "--attention", choices=list(ATTENTION_CHOICES), help="attention kernel: auto = math on a CPU under bf16 "
        "(its fused backward is slow there), fused elsewhere (default auto)")
    add(g, "--threads", dest="threads", type=int, metavar="N", help="CPU threads for torch (default or 0: the cores "
        "not kept busy by other programs)")
    add(g, "--workers", dest="threads", type=_deprecated_workers, help=argparse.SUPPRESS)  # the old name

    g = "run folder"
    add(g, "--out", metavar="DIR", help="run folder (default runs/<dataset>_<method>_s<seed>, with a suffix when it "
        "exists)")
    add(g, "--resume", action="store_true", help="continue the interrupted run in --out (default: "
        "runs/<dataset>_<method>_s<seed>)")
    add(g, "--overwrite", action="store_true", help="replace a finished run in --out (default: "
        "runs/<dataset>_<method>_s<seed>)")
    add(g, "--checkpoint-every", type=int, help=f"epochs between checkpoints (default {d.checkpoint_every})")
    add(g, "--eval-every", type=int, help="epochs between evaluations; the last epoch is always evaluated "
        "(default 0: about four evaluations per run)")
    add(g, "--quiet", dest="progress", action="store_false", help="no progress bar or summary")
    add(g, "--tensorboard", action="store_true", help="also log loss, accuracy, lr and MLAE's coefficient "
        "statistics to <out>/tensorboard (needs the tensorboard package; metrics.jsonl stays the record)")
    return specs


class _Refuse(argparse.Action):
    """A `mlae train` option that a command replaces (or cannot honour): using it is a usage error with a hint."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs):
        self.hint = hint
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} does not apply here{self.hint}")


def _kept(leave_out: tuple[str, ...], refuse: dict[str, str] | None) -> list[OptionSpec]:
    return [s for s in train_option_specs() if not any(f in leave_out or f in (refuse or {}) for f in s.flags)]


def add_train_options(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = (),
                      refuse: dict[str, str] | None = None) -> None:
    """Add the `mlae train` options (flags, types, help and groups) to ``parser``, except the flags in
    ``leave_out`` (the command defines its own) and in ``refuse`` (flag -> hint: giving it is a usage error that
    says what to use instead; kept as such, it also stops argparse from reading ``--dataset`` as an abbreviation
    of a command's ``--datasets``). Options not given stay out of the parsed namespace."""
    groups: dict[str, Any] = {}
    for spec in _kept(leave_out, refuse):
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        groups[spec.group].add_argument(*spec.flags, default=argparse.SUPPRESS, **spec.kwargs)
    for flag, hint in (refuse or {}).items():
        parser.add_argument(flag, action=_Refuse, hint=hint, dest=argparse.SUPPRESS, default=argparse.SUPPRESS)


def train_options(args: argparse.Namespace, leave_out: tuple[str, ...] = (),
                  refuse: dict[str, str] | None = None) -> dict[str, Any]:
    """The train options given on a command line parsed with ``add_train_options(parser, leave_out, refuse)``."""
    dests = {spec.dest for spec in _kept(leave_out, refuse)}
    return {k: v for k, v in vars(args).items() if k in dests}


def train_argv(options: dict[str, Any]) -> list[str]:
    """`mlae train` flags that parse back to ``options`` (the inverse of parsing, to print a command line).
    Keys without a flag are skipped; a switch given a value its flag cannot set is an error."""
    argv: list[str] = []
    for spec in train_option_specs():
        if spec.dest not in options or spec.kwargs.get("help") is argparse.SUPPRESS:
            continue
        value, flag, action = options[spec.dest], spec.flags[0], spec.kwargs.get("action")
        if action in ("store_true", "store_false", "store_const"):
            const = {"store_true": True, "store_false": False}.get(action, spec.kwargs.get("const"))
            if value != const:
                raise InputError(f"{spec.dest}={value!r} has no command-line flag ({flag} sets {const!r})")
            argv.append(flag)
        elif spec.kwargs.get("nargs") in ("+", "*"):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


# --------------------------------------------------------------------------------------------- train


def _register_train(subparsers) -> None:
    from ..engine import DEFAULT_DATASET

    p = subparsers.add_parser(
        "train", help="fine-tune a backbone on a task (with no options: the main job, minutes on a CPU)",
        description="Fine-tune a vision transformer with MLAE or a baseline. With no options: MLAE on the embedded "
        f"'{DEFAULT_DATASET}' task with the embedded backbone, in a few minutes on a CPU.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_options(p)
    p.set_defaults(func=run_train)


def _shown(value) -> str:
    """A default as it is typed on the command line: ``qkv,proj`` and ``none``, not Python's ``['qkv']``."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _deprecated_workers(text: str) -> int:
    print("mlae: warning: --workers is deprecated and will be removed; it sets torch threads, use --threads",
          file=sys.stderr)
    return int(text)


def config_from_args(args: argparse.Namespace):
    """Merge defaults, recipe and explicit command-line options into a TrainConfig."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    return config_from_options(given, recipe=getattr(args, "config", None))


def run_train(args: argparse.Namespace) -> int:
    from ..engine import train

    try:
        cfg = config_from_args(args)
        train(cfg)
    except KeyboardInterrupt as err:
        message = _interrupted(getattr(err, "run_dir", None))
        if message:
            print(message, file=sys.stderr)
        return 130
    except Exception as err:
        return _fail(err)
    return 0


def _interrupted(out: Path | None) -> str | None:
    """What Ctrl-C leaves: the command that continues from the last checkpoint, or that there is none yet (None
    on the other ranks of a torchrun job: rank 0 says it once)."""
    import os
    import shlex

    from ..rundir import CHECKPOINT, RESULTS

    if os.environ.get("RANK", "0") != "0":
        return None
    if out is None:
        return "interrupted"
    if (out / RESULTS).exists():
        return f"interrupted after the run had finished: its results are in {out}"
    if not (out / CHECKPOINT).exists():
        return f"interrupted before the first checkpoint: nothing to resume in {out}"
    flags = f"--resume --out {shlex.quote(str(out))}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"interrupted; continue from the last checkpoint with the same torchrun command and {flags}"
    return f"interrupted; continue from the last checkpoint with: mlae train {flags}"


def _integer(minimum: int, rule: str):
    """An argparse type: an integer >= ``minimum``; anything else is a usage error that says ``rule``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}")
        return value

    return parse


positive_int = _integer(1, "an integer >= 1")


def expert_indices(text: str) -> list[int]:
    """eval --experts: comma-separated 0-based expert numbers, each once."""
    index = _integer(0, "comma-separated expert numbers >= 0 such as 0,2")
    values = [index(t.strip()) for t in text.split(",") if t.strip()]
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"expert {', '.join(map(str, twice))} listed twice in {text!r}; list each once")
    return values


# --threads of eval and predict, read as train's (TrainConfig checks it there): N >= 1, or 0 for auto.
threads_count = _integer(0, THREADS_RULE)


def _fail(err: Exception) -> int:
    """Print a user error (an mlae.MLAEError, or the operating system refusing a file: full disk, read-only
    folder, no permission) as one line; anything else is a bug and keeps its traceback."""
    from ..errors import MLAEError, os_error_message

    if isinstance(err, MLAEError):
        message = str(err)
    elif isinstance(err, OSError) and err.errno is not None:
        message = os_error_message(err)
    else:
        raise err
    print(f"mlae: error: {message}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------- eval


def _register_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="top-1 accuracy of a trained adapter (or fully fine-tuned model)")
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter.safetensors (or model.safetensors) "
                   "of a run, the run folder, or a merged export (`mlae export --format merged`)")
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (default: the one the adapter was trained on)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets (default: the one the adapter "
                   "was trained with)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode the images afresh and write no "
                   "cache file")
    p.add_argument("--split", choices=["test", "val"], default="test", help="test: the test set (default); val: the "
                   "validation split (VTAB-1k: val200)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help=f"auto: bf16 autocast on CUDA where supported, and on {CPU_AUTO_PRECISION}; "
                   "else fp32")
    p.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention kernel (auto: math on a CPU under bf16, fused elsewhere)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", metavar="JSON", help="also write the result to this JSON file (a new one: see "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--experts", metavar="I,J,...", type=expert_indices,
                   help="MoLE only: keep these experts (0-based, in --experts-from order); the gate weights are "
                   "renormalised over them")
    p.add_argument("--threads", type=threads_count, metavar="N", help="CPU threads for torch (default or 0: the "
                   "cores not kept busy by other programs)")
    p.set_defaults(func=run_eval)


def _json_out(path: str | None, overwrite: bool) -> Path | None:
    """``--out`` of eval and predict, checked before the work: an existing file (a run's results.json or
    config.yaml, say) is replaced only with ``--overwrite``, and a folder never."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise InputError(f"--out {target} is a folder; name a JSON file to write, e.g. {target / 'eval.json'}")
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    return target


def _set_threads(threads: int | None) -> None:
    import torch

    from ..hardware import auto_threads

    torch.set_num_threads(threads or auto_threads())


def _write_json(target: Path, data) -> None:
    from ..files import atomic_write_text

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(data, indent=2) + "\n")


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_file

    try:
        out = _json_out(args.out, args.overwrite)
        _set_threads(args.threads)
        result = evaluate_file(args.adapter, dataset=args.dataset, data_root=args.data_root, split=args.split,
                               precision=args.precision, device=args.device, experts=args.experts,
                               attention=args.attention, cache=args.cache)
    except Exception as err:
        return _fail(err)
    print(f"{result['dataset']} ({result['eval_split']}, {result['images']} images): top-1 "
          f"{100 * result['top1']:.2f}%")
    if out is not None:
        try:
            _write_json(out, result)
        except OSError as err:
            return _fail(err)
    return 0


# --------------------------------------------------------------------------------------------- predict


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify image files with a trained adapter, by class name")
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter.safetensors (or model.safetensors) "
                   "of a run, the run folder, or a merged export (`mlae export --format merged`)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (every image under them)")
    p.add_argument("--top", type=positive_int, default=1, help="classes to list per image")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", metavar="JSON", help="also write the predictions to this JSON file (a new one: see "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--threads", type=threads_count, metavar="N", help="CPU threads for torch (default or 0: the "
                   "cores not kept busy by other programs)")
    p.set_defaults(func=run_predict)


def _check_not_an_input(out: Path | None, images: list[str]) -> None:
    """predict --out must not be one of the images, nor lie in an image folder: --overwrite would replace an
    image with the JSON, or the next prediction over that folder would meet it."""
    if out is None:
        return
    where = out.resolve()
    for image in map(Path, images):
        if where == image.resolve():
            raise InputError(f"--out {out} is one of the images to predict; choose --out elsewhere")
        if image.is_dir() and image.resolve() in where.parents:
            raise InputError(f"--out {out} is inside the image folder {image} to predict; choose --out elsewhere")


def run_predict(args: argparse.Namespace) -> int:
    from ..evaluation import predict_files

    try:
        out = _json_out(args.out, args.overwrite)
        _check_not_an_input(out, args.images)
        _set_threads(args.threads)
        predictions = predict_files(args.adapter, args.images, top=args.top, device=args.device)
    except Exception as err:
        return _fail(err)
    for item in predictions:
        print(item["image"] + "\t" + "\t".join(f"{c['name']} {c['probability']:.3f}" for c in item["top"]))
    if out is not None:
        try:
            _write_json(out, predictions)
        except OSError as err:
            return _fail(err)
    return 0


# --------------------------------------------------------------------------------------------- export


def _register_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="fold an adapter into a plain timm checkpoint, or write a PEFT "
                              "LoRA adapter")
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter.safetensors of a run, or the run "
                   "folder")
    p.add_argument("--format", choices=["merged", "peft"], default="merged",
                   help="merged: the merged model's state_dict, loadable by plain timm (a .safetensors file, or, "
                   "for any other --out, a folder that timm.create_model('local-dir:FOLDER') loads with its "
                   "input size and normalisation); peft: a Hugging Face PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, metavar="PATH", help="file or folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..export import export_file

    try:
        path = export_file(args.adapter, args.format, args.out, overwrite=args.overwrite)
    except Exception as err:
        return _fail(err)
    print(f"wrote {path}")
    return 0
