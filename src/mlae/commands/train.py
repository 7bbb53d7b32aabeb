"""`mlae train`, `mlae eval`, `mlae predict` and `mlae export`.

Option precedence for `train`: the method's and TrainConfig's defaults < the `--config` recipe (its
`per_dataset` entry for the dataset included) < options given on the command line. `--resume` starts from the
run folder's own `config.yaml` instead of the defaults and the recipe.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..attention import ATTENTION_CHOICES
from ..errors import InputError, NotMergeableError
from ..recipes import METHODS, RecipeError, get_method, load_recipe, resolve_recipe


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_predict(subparsers)
    _register_export(subparsers)


# --------------------------------------------------------------------------------------------- train


def _register_train(subparsers) -> None:
    from ..engine import DEFAULT_DATASET, HEAD_INITS, NORMALIZE_CHOICES, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="fine-tune a backbone on a task (with no options: the main job, minutes on a CPU)",
        description="Fine-tune a vision transformer with MLAE or a baseline. With no options: MLAE on the embedded "
        f"'{DEFAULT_DATASET}' task with the embedded backbone, in a few minutes on a CPU.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("task and method")
    g.add_argument("--dataset", metavar="SPEC", help=f"dataset spec (default {d.dataset}; e.g. digits, "
                   "vtab:cifar or fgvc:CUB with --data-root, folder:PATH)")
    g.add_argument("--method", choices=list(METHODS), help=f"fine-tuning method (default {d.method})")
    g.add_argument("--config", metavar="FILE", help="YAML recipe (e.g. configs/vtab_mlae.yaml); command-line "
                   "options override it")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the datasets")
    g.add_argument("--no-cache", dest="cache", action="store_false", help="decode the images afresh and write no "
                   "cache file (default: decoded images are cached next to the data, or in ~/.cache/mlae)")
    g.add_argument("--split", choices=["test", "val"], help="test: train on train+val, report test (default); "
                   "val: hold out a validation split and report it")
    g.add_argument("--skip-bad-images", action="store_true", help="folder datasets: train without the images "
                   "that cannot be read (listed in results.json) instead of stopping")

    g = p.add_argument_group("method options (each applies to the methods named in brackets)")
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
        help_text = f"{opt.help} [{', '.join(seen[name])}; default {default}]"
        if opt.flag is not None:  # a boolean switched by its flag, whose help says what it does and the default
            g.add_argument(opt.cli_flag, dest=name, action="store_const", const=not opt.default,
                           help=f"{opt.help} [{', '.join(seen[name])}]")
        else:
            g.add_argument(opt.cli_flag, dest=name, type=opt.type, choices=opt.choices, nargs=opt.nargs,
                           help=help_text)

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", metavar="NAME|PATH", help="timm model name or checkpoint file (default: the "
                   "embedded ViT)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random initial weights")
    g.add_argument("--arch", help="timm architecture of a checkpoint file")
    g.add_argument("--img-size", type=int, help="input size (default: the backbone's)")
    g.add_argument("--patch-size", type=int, help="patch size (default: the backbone's)")
    g.add_argument("--drop-path", type=float, help=f"stochastic depth rate (default {d.drop_path})")
    g.add_argument("--normalize", choices=list(NORMALIZE_CHOICES), help="input mean/std: backbone = the "
                   "backbone's own pretrained_cfg, inception = 0.5/0.5 ([-1, 1], the MLAE paper), imagenet = "
                   "ImageNet's; auto = backbone for the embedded ViT, imagenet otherwise (default auto)")
    g.add_argument("--head-init", choices=list(HEAD_INITS), help="the new classifier head: timm = what the "
                   "installed timm draws (trunc-normal 0.02), zero = zeros as timm 0.4 did (default timm)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    g.add_argument("--warmup-epochs", type=int, help=f"linear warmup before the cosine decay (default "
                   f"{d.warmup_epochs})")
    g.add_argument("--batch-size", type=int, help=f"global batch size (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast where the "
                   "hardware supports it (default)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--attention", choices=list(ATTENTION_CHOICES), help="attention kernel: auto = math on a CPU "
                   "under bf16 (its fused backward is slow there), fused elsewhere (default auto)")
    g.add_argument("--threads", dest="threads", type=int, help="CPU threads for torch (default: the cores not kept "
                   "busy by other programs)")
    g.add_argument("--workers", dest="threads", type=_deprecated_workers, help=argparse.SUPPRESS)

    g = p.add_argument_group("run folder")
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/<dataset>_<method>_s<seed>, with a "
                   "suffix when it exists)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (default: "
                   "runs/<dataset>_<method>_s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--checkpoint-every", type=int, help=f"epochs between checkpoints (default "
                   f"{d.checkpoint_every})")
    g.add_argument("--eval-every", type=int, help="epochs between evaluations; the last epoch is always "
                   "evaluated (default 0: about four evaluations per run)")
    g.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar or summary")
    g.add_argument("--tensorboard", action="store_true", help="also log loss, accuracy, lr and MLAE's coefficient "
                   "statistics to <out>/tensorboard (needs the tensorboard package; metrics.jsonl stays the record)")
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
    from ..engine import TrainConfig, _default_out

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}

    base: dict = {}
    if given.get("resume"):
        out = Path(given["out"]) if "out" in given else _default_out(TrainConfig(**{
            k: v for k, v in given.items() if k in ("dataset", "method", "seed")}))
        if (out / "config.yaml").exists():
            base = load_recipe(out / "config.yaml")
    elif getattr(args, "config", None):
        recipe = load_recipe(args.config)
        base = resolve_recipe(recipe, given.get("dataset", recipe.get("dataset", TrainConfig.dataset)))
    method = get_method(given.get("method", base.get("method", TrainConfig.method)))
    own = set(method.defaults())
    fields = set(TrainConfig.__dataclass_fields__)
    bad = [k for k in given if k not in fields and k not in own]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise RecipeError(f"{flags} do(es) not apply to method {method.name!r}")
    if base.get("method", method.name) != method.name:
        # The recipe was written for another method: keep its general settings, drop its method options.
        base = {k: v for k, v in base.items() if k in fields or k in own}
    return TrainConfig.from_dict({**base, **given})


def run_train(args: argparse.Namespace) -> int:
    from ..engine import train

    try:
        cfg = config_from_args(args)
        train(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return _fail(err)
    return 0


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
    p.add_argument("--adapter", required=True, metavar="FILE", help="adapter.safetensors (or model.safetensors) "
                   "of a run")
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (default: the one the adapter was trained on)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets (default: the one the adapter "
                   "was trained with)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode the images afresh and write no "
                   "cache file")
    p.add_argument("--split", choices=["test", "val"], default="test", help="test: the test set (default); val: the "
                   "validation split (VTAB-1k: val200)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware supports it")
    p.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention kernel (auto: math on a CPU under bf16, fused elsewhere)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", metavar="JSON", help="also write the result to this JSON file")
    p.add_argument("--experts", metavar="I,J,...", type=lambda t: [int(i) for i in t.split(",") if i.strip()],
                   help="MoLE only: keep these experts (0-based, in --experts-from order); the gate weights are "
                   "renormalised over them")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    try:
        result = evaluate_file(args.adapter, dataset=args.dataset, data_root=args.data_root, split=args.split,
                               precision=args.precision, device=args.device, experts=args.experts,
                               attention=args.attention, cache=args.cache)
    except Exception as err:
        return _fail(err)
    print(f"{result['dataset']} ({result['eval_split']}, {result['images']} images): top-1 "
          f"{100 * result['top1']:.2f}%")
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as err:
            return _fail(err)
    return 0


def evaluate_file(path: str, *, dataset: str | None = None, data_root: str | None = None, split: str = "test",
                  precision: str = "auto", device: str | None = None, experts: list[int] | None = None,
                  attention: str = "auto", cache: bool = True) -> dict:
    from ..adapters.mole import select_experts
    from ..attention import set_attention
    from ..data import load_task
    from ..engine import Inputs, evaluate, load_trained
    from ..utils import resolve_device, resolve_precision

    model, meta = load_trained(path)
    if experts is not None:
        select_experts(model, experts)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    spec = dataset or meta.get("dataset_spec") or meta["dataset"]
    task = load_task(spec, data_root=data_root if data_root is not None else meta.get("data_root"),
                     image_size=int(meta["image_size"]), split=split, seed=int(meta.get("seed", 0)), cache=cache,
                     skip_bad=bool(meta.get("skip_bad_images")) and spec.startswith("folder:"))
    if task.num_classes != int(meta["num_classes"]):
        raise InputError(f"{path} has a {meta['num_classes']}-class head but {task.name} has {task.num_classes} "
                         "classes")
    inputs = Inputs(task.augment, int(meta["image_size"]), dev, meta.get("input_mean"), meta.get("input_std"))
    model = model.to(dev)
    set_attention(model, attention, device=dev, precision=prec)
    top1 = evaluate(model, task.eval, inputs, precision=prec)
    key = f"{task.eval_name}_top1"
    return {"adapter": str(path), "dataset": task.name, "eval_split": task.eval_name, "images": len(task.eval),
            "top1": top1, key: top1, "method": meta.get("method"), "precision": prec,
            "classes": task.classes or meta.get("classes"),
            **({"experts": experts} if experts is not None else {})}


# --------------------------------------------------------------------------------------------- predict


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify image files with a trained adapter, by class name")
    p.add_argument("--adapter", required=True, metavar="FILE", help="adapter.safetensors (or model.safetensors) "
                   "of a run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top", type=int, default=1, help="classes to list per image")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", metavar="JSON", help="also write the predictions to this JSON file")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    try:
        predictions = predict_files(args.adapter, args.images, top=args.top, device=args.device)
    except Exception as err:
        return _fail(err)
    for item in predictions:
        print(item["image"] + "\t" + "\t".join(f"{c['name']} {c['probability']:.3f}" for c in item["top"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(predictions, indent=2) + "\n")
    return 0


def predict_files(path: str, images: list[str], *, top: int = 1, device: str | None = None) -> list[dict]:
    """Top-``top`` classes of each image, named by the class names stored with the weights (the label number
    when the dataset had none), fed exactly as in evaluation."""
    import torch

    from ..data.base import Entry, decode_entries
    from ..data.transforms import cache_size
    from ..engine import EVAL_BATCH, Inputs, load_trained
    from ..utils import resolve_device

    model, meta = load_trained(path)
    dev = resolve_device(device)
    size, augment = int(meta["image_size"]), meta.get("augment", "none")
    names = meta.get("classes") or [str(k) for k in range(int(meta["num_classes"]))]
    split = decode_entries([Entry(Path(p), 0, p) for p in images], cache_size(augment, size), desc="images")
    inputs = Inputs(augment, size, dev, meta.get("input_mean"), meta.get("input_std"))
    model = model.to(dev)
    with torch.inference_mode():
        probs = torch.cat([model(inputs(split.images[i:i + EVAL_BATCH], train=False)).float().softmax(-1).cpu()
                           for i in range(0, len(split), EVAL_BATCH)])
    best = probs.topk(min(top, probs.shape[1]), dim=-1)
    return [{"image": image, "top": [{"label": int(k), "name": names[int(k)], "probability": float(v)}
                                     for v, k in zip(values, labels)]}
            for image, values, labels in zip(images, best.values, best.indices)]


# --------------------------------------------------------------------------------------------- export


def _register_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="fold an adapter into a plain timm checkpoint, or write a PEFT "
                              "LoRA adapter")
    p.add_argument("--adapter", required=True, metavar="FILE", help="adapter.safetensors of a run")
    p.add_argument("--format", choices=["merged", "peft"], default="merged",
                   help="merged: the merged model's state_dict, loadable by plain timm (a .safetensors file, or, "
                   "for any other --out, a folder that timm.create_model('local-dir:FOLDER') loads with its "
                   "input size and normalisation); peft: a Hugging Face PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, metavar="PATH", help="file or folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    try:
        path = export_file(args.adapter, args.format, args.out, overwrite=args.overwrite)
    except Exception as err:
        return _fail(err)
    print(f"wrote {path}")
    return 0


def _file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timm_pretrained_cfg(meta: dict) -> dict:
    """The inputs a merged model expects, in timm's ``pretrained_cfg`` terms (what resolve_data_config reads):
    resized to image_size (FGVC: resized larger, then centre-cropped), [0, 1], normalised with these statistics."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD
    from ..data.transforms import fgvc_cache_size

    size = int(meta["image_size"])
    fgvc = meta.get("augment") == "fgvc"
    return {"input_size": [3, size, size], "mean": list(meta.get("input_mean") or IMAGENET_MEAN),
            "std": list(meta.get("input_std") or IMAGENET_STD), "interpolation": "bilinear" if fgvc else "bicubic",
            "crop_pct": size / fgvc_cache_size(size) if fgvc else 1.0, "crop_mode": "center",
            "num_classes": int(meta["num_classes"]), **({"label_names": meta["classes"]} if meta.get("classes") else {})}


def export_file(adapter: str, fmt: str, out: str, overwrite: bool = False) -> Path:
    """``fmt="merged"``: a ``.safetensors`` ``out`` is one file (timm name, kwargs, pretrained_cfg and provenance in
    its metadata); any other ``out`` is a folder in timm's ``local-dir:`` layout (``config.json`` +
    ``model.safetensors``). ``fmt="peft"``: a PEFT adapter folder. An existing ``out`` needs ``overwrite``."""
    import mlae
    from ..engine import load_trained, merged_state_dict, timm_spec
    from ..utils import atomic_save_file, atomic_write_text

    target = Path(out)
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise InputError(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    model, meta = load_trained(adapter)
    if not all(layer.mergeable for _, layer in mlae.adapter_layers(model)):
        raise NotMergeableError(f"{adapter} is a {meta.get('method')} adapter: its gates weigh the LoRAs anew for "
                                "every input, so it has no merged or single-LoRA form to export; use it as it is "
                                f"(mlae eval --adapter {adapter})")
    if fmt == "peft":
        return mlae.export_peft(model, out)
    mlae.merge(model)
    name, kwargs = timm_spec(meta)
    pretrained_cfg = timm_pretrained_cfg(meta)
    provenance = {"method": meta.get("method"), "source_adapter": str(Path(adapter).resolve()),
                  "source_sha256": _file_sha256(adapter), "backbone": meta.get("backbone"),
                  "dataset": meta.get("dataset"), "classes": meta.get("classes")}
    header = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs, sort_keys=True),
              "num_classes": str(meta["num_classes"]), "image_size": str(meta["image_size"]),
              "input_mean": json.dumps(pretrained_cfg["mean"]), "input_std": json.dumps(pretrained_cfg["std"]),
              # timm.create_model(name, pretrained=True, pretrained_cfg_overlay={**this, "file": path}, **kwargs)
              "pretrained_cfg": json.dumps(pretrained_cfg),
              "mlae_provenance": json.dumps(provenance, sort_keys=True)}
    if target.suffix == ".safetensors":
        return atomic_save_file(merged_state_dict(model), target, header)
    # timm's local-dir layout (timm.models.load_model_config_from_path reads it)
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    config = {"architecture": name.partition(".")[0], "num_classes": int(meta["num_classes"]),
              "pretrained_cfg": pretrained_cfg, "model_args": model_args, "mlae_provenance": provenance}
    atomic_save_file(merged_state_dict(model), target / "model.safetensors", header)
    atomic_write_text(target / "config.json", json.dumps(config, indent=2) + "\n")
    return target
