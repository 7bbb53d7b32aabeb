"""Fine-tuning methods by name, and YAML recipes.

A :class:`Method` says which options it takes and how to turn a model into one trained with that method.
New methods plug in with :func:`register_method`; the ``mlae train`` options and the YAML keys follow.

A recipe is a flat YAML mapping of :class:`mlae.engine.TrainConfig` fields and method options, plus an
optional ``per_dataset:`` mapping (dataset name -> overrides) applied when training on that dataset::

    method: mlae
    lr: 5.0e-4
    experts: 8
    per_dataset:
      cifar: {dropout: 0.7, coeff_init: 2}
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .adapters.mlae import MASK_GRANULARITIES, MASKINGS
from .patterns import PATTERN_NAMES
from .errors import InputError

__all__ = [
    "METHODS",
    "Method",
    "Option",
    "RecipeError",
    "dataset_key",
    "get_method",
    "load_recipe",
    "register_method",
    "resolve_recipe",
]


class RecipeError(InputError):
    """A recipe or method option that cannot be used."""


@dataclass(frozen=True)
class Option:
    """One method option: the YAML key ``name`` and the command-line flag ``--name-with-dashes``."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple | None = None
    # For booleans: the flag that sets the option to the opposite of its default (e.g. --no-adaptive); ``help``
    # then says what the flag does.
    flag: str | None = None
    # argparse nargs for list-valued options (e.g. "+" for --experts-from A B C).
    nargs: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: ``prepare(model, options)`` makes ``model`` trainable the method's way."""

    name: str
    help: str
    prepare: Callable[[nn.Module, dict], nn.Module]
    options: tuple[Option, ...] = ()
    # True when the trained weights fit in an adapter file (mlae.save_adapter: adapters and head); False saves
    # the whole model.
    adapter: bool = True
    # True when some trainable parameters may sit out a step (e.g. dropped DMLoRA branches): DDP must look for them.
    skips_parameters: bool = False

    def defaults(self) -> dict:
        return {opt.name: opt.default for opt in self.options}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`; an option shared with another method must be declared identically."""
    for other in METHODS.values():
        for opt in method.options:
            for known in other.options:
                if known.name == opt.name and (known.cli_flag, known.type, known.choices) != (
                        opt.cli_flag, opt.type, opt.choices):
                    raise RecipeError(f"option {opt.name!r} of {method.name!r} clashes with {other.name!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"not a boolean: {text!r}")


def _dropout(text: str | float) -> float | str:
    """A masking probability, or ``auto`` (learned while training)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    return float(text)


def _modules(text: str | list) -> list[str]:
    return list(text) if isinstance(text, (list, tuple)) else [t for t in re.split(r"[,\s]+", text) if t]


TARGETS = Option("target_modules", _modules, ["qkv"], "comma-separated names (or name patterns) of the nn.Linear "
                 "layers to adapt")
RANK = Option("rank", int, 8, "LoRA rank")
ALPHA = Option("alpha", float, 8.0, "LoRA alpha (the update is scaled by alpha / rank)")


def _prepare_mlae(model: nn.Module, options: dict) -> nn.Module:
    import mlae

    return mlae.apply(model, mlae.MLAEConfig(**options))


def _prepare_lora(model: nn.Module, options: dict) -> nn.Module:
    import mlae

    options = dict(options)
    options["dropout"] = options.pop("lora_dropout", 0.0)
    return mlae.apply(model, mlae.LoRAConfig(**options))


def _prepare_linear(model: nn.Module, options: dict) -> nn.Module:
    import mlae

    mlae.freeze_backbone(model, train_head=True)
    return model


def _prepare_full(model: nn.Module, options: dict) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register_method(Method("mlae", "Masked LoRA Experts", _prepare_mlae, (
    Option("experts", int, 8, "number of experts per adapted layer"),
    Option("expert_rank", int, 1, "rank of each expert"),
    Option("dropout", _dropout, 0.5, "expert dropout probability p of the stochastic masks, or auto: learned per "
           "layer in the same run"),
    Option("dropout_learner", str, "variational", "with --dropout auto: variational (Gaussian noise) or concrete "
           "(binary masks, straight-through gradient)", choices=("variational", "concrete")),
    Option("dropout_init", float, 0.1, "with --dropout auto: the initial p"),
    Option("dropout_per_expert", _bool, False, "with --dropout auto: learn one p per expert instead of per layer",
           flag="--dropout-per-expert"),
    Option("coeff_init", float, 1.0, "initial expert coefficient c_i"),
    Option("adaptive", _bool, True, "freeze the expert coefficients at --coeff-init (default: they train)",
           flag="--no-adaptive"),
    Option("masking", str, "stochastic", "expert masking: stochastic (drop each expert with probability "
           "--dropout), fixed (keep the --pattern's expert counts) or mixed (both)", choices=MASKINGS),
    Option("pattern", str, "uniform", "per-layer pattern of expert dropout rates (stochastic masking) or "
           "expert counts (fixed, mixed; random only there); a per-layer list in a YAML recipe",
           choices=PATTERN_NAMES),
    Option("mask_granularity", str, "batch", "batch: one mask per forward, shared by the batch; sample: one per "
           "sample", choices=MASK_GRANULARITIES),
    Option("scale", float, 1.0, "global scale s of the update"),
    TARGETS,
)))
register_method(Method("lora", "LoRA", _prepare_lora, (RANK, ALPHA, TARGETS)))
register_method(Method("lora-dropout", "LoRA with dropout on the adapter input", _prepare_lora, (
    RANK, ALPHA, Option("lora_dropout", float, 0.1, "dropout probability on the LoRA input"), TARGETS,
)))
register_method(Method("linear", "linear probe: train the classification head only", _prepare_linear))
register_method(Method("full", "full fine-tuning of every weight", _prepare_full, adapter=False))


def _prepare_dmlora(model: nn.Module, options: dict) -> nn.Module:
    import mlae

    return mlae.apply(model, mlae.DMLoRAConfig(**options))


def _prepare_mole(model: nn.Module, options: dict) -> nn.Module:
    from .adapters.mole import from_adapters

    if not options["experts_from"]:
        raise RecipeError("--method mole needs the trained adapters to mix: --experts-from A B ...")
    return from_adapters(model, _modules(options["experts_from"]), granularity=options["granularity"],
                         temperature=options["temperature"])


# The engine switches to stage 2 itself (DMLoRAConfig.stage2_fraction) and re-wraps DDP then. Dropped branches
# still get a (zero) gradient, so DDP need not look for unused parameters.
register_method(Method("dmlora", "Dropout Mixture LoRA: branches, gradual branch dropout, two-stage scalars",
                       _prepare_dmlora, (
    Option("branches", int, 4, "number of parallel LoRA branches K"),
    RANK,
    Option("rank_per_branch", _bool, False, "give every branch the full rank (default: split it over the branches)",
           flag="--rank-per-branch"),
    dataclasses.replace(ALPHA, default=16.0),  # α of stage 1 and initial α_l: "large" (twice LoRA's usual α = r)
    Option("branch_dropout", float, 0.5, "final branch dropout probability p_max"),
    Option("schedule", str, "linear", "growth of the branch dropout over stage 1",
           choices=("linear", "cosine", "constant")),
    Option("rescale", _bool, True, "do not scale the kept branches by 1/(1-p) in training (default: they are "
           "scaled)", flag="--no-rescale"),
    Option("stage2_fraction", float, 0.1, "share of training in stage 2 (per-layer scales only, lr / 10)"),
    TARGETS,
)))
# The balance loss comes from mlae.aux_losses as "balance"; the engine weighs it by `balance_weight`.
register_method(Method("mole", "Mixture of LoRA Experts: learned gates over frozen trained adapters", _prepare_mole, (
    Option("experts_from", str, [], "trained adapters to mix (mlae .safetensors files or PEFT LoRA folders)",
           nargs="+"),
    Option("granularity", str, "block", "one gate per adapted layer, per block or for the whole network",
           choices=("layer", "block", "network")),
    Option("temperature", float, 1.0, "gate softmax temperature τ"),
    Option("balance_weight", float, 0.01, "weight of the gating balance loss"),
)))


def dataset_key(spec: str) -> str:
    """The dataset name a recipe's ``per_dataset`` section is keyed by: ``/data/vtab-1k/cifar/`` -> ``cifar``,
    ``suite:digits`` -> ``digits``, ``fgvc:CUB_200_2011`` -> ``cub_200_2011``."""
    name = os.path.basename(os.path.normpath(str(spec)))
    return name.rsplit(":", 1)[-1].lower()


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a YAML recipe into a dict (``per_dataset`` kept as is)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of option: value")
    per_dataset = data.get("per_dataset", {})
    if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
        raise RecipeError(f"{path}: per_dataset must map dataset names to mappings of option: value")
    return data


def resolve_recipe(recipe: dict, dataset: str | None) -> dict:
    """Flatten a recipe for ``dataset``: its ``per_dataset[dataset]`` entries override the general ones."""
    flat = {k: v for k, v in recipe.items() if k != "per_dataset"}
    if dataset is not None:
        per_dataset = {str(k).lower(): v for k, v in recipe.get("per_dataset", {}).items()}
        flat.update(per_dataset.get(dataset_key(dataset), {}))
    return flat


def config_from_options(options: dict, recipe: str | os.PathLike | None = None):
    """A :class:`mlae.engine.TrainConfig` from options as ``mlae train`` takes them (TrainConfig fields and method
    options by name, only those given), with its precedence: the method's and TrainConfig's defaults < ``recipe``
    (its ``per_dataset`` entry for the dataset included) < ``options``. With ``options["resume"]`` the run
    folder's own ``config.yaml`` takes the place of the defaults and the recipe. Method options that the chosen
    method does not take are an error; a recipe written for another method keeps only its general settings."""
    from .engine import TrainConfig, _default_out

    base: dict = {}
    if options.get("resume"):
        out = Path(options["out"]) if "out" in options else _default_out(TrainConfig(**{
            k: v for k, v in options.items() if k in ("dataset", "method", "seed")}))
        if (out / "config.yaml").exists():
            base = load_recipe(out / "config.yaml")
    elif recipe:
        loaded = load_recipe(recipe)
        base = resolve_recipe(loaded, options.get("dataset", loaded.get("dataset", TrainConfig.dataset)))
    method = get_method(options.get("method", base.get("method", TrainConfig.method)))
    own = set(method.defaults())
    fields = set(TrainConfig.__dataclass_fields__)
    bad = [k for k in options if k not in fields and k not in own]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise RecipeError(f"{flags} do(es) not apply to method {method.name!r}")
    if base.get("method", method.name) != method.name:
        # The recipe was written for another method: keep its general settings, drop its method options.
        base = {k: v for k, v in base.items() if k in fields or k in own}
    return TrainConfig.from_dict({**base, **options})
