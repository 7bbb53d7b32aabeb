"""Fine-tuning methods by name, and YAML recipes.

A :class:`Method` says which options it takes and how to turn a model into one trained with that method.
New methods plug in with :func:`register_method`; the ``mlae train`` options and the YAML keys follow. The options
of an adapter method are made from its config class (:func:`config_options`): every field declared with
:func:`mlae.adapters.base.option` is one, so a new field there is a new flag and key without an edit here.

A recipe is a flat YAML mapping of :class:`mlae.engine.TrainConfig` fields and method options, plus an
optional ``per_dataset:`` mapping (dataset name -> overrides) applied when training on that dataset. Its values
are checked against their settings' types when it is read (:func:`load_recipe`): text where a number or a
boolean belongs is read as the setting's flag reads it (``lr: 1e-3``, which YAML 1.1 reads as text, is 0.001);
any other value of the wrong type (``epochs: 1.5``, ``epochs: true``) is an error naming the file and the key::

    method: mlae
    lr: 5.0e-4
    experts: 8
    per_dataset:
      cifar: {dropout: 0.7, coeff_init: 2}
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .adapters import AdapterConfig, DMLoRAConfig, LoRAConfig, MLAEConfig, MoLEConfig
from .adapters.base import TrainingHooks, option_flag
from .adapters.dmlora import DMLoRATraining
from .adapters.mlae import MLAETraining
from .adapters.mole import MoLETraining, from_adapters
from .errors import InputError
from .inject import apply, freeze_backbone
from .trained import CHECKPOINT, checkpoint_settings, expert_source
from .utils import parse_bool, parse_list

__all__ = [
    "METHODS",
    "Method",
    "Option",
    "RecipeError",
    "config_options",
    "dataset_key",
    "get_method",
    "parse_setting",
    "setting_parser",
    "load_recipe",
    "register_method",
    "resolve_recipe",
]

_KINDS = {"int": "an integer", "float": "a number", "dropout": "a probability or auto", "parse_bool": "a boolean "
          "(true/false, yes/no, 1/0)"}


def parse_setting(name: str, convert: Callable[[str], Any], text: str) -> Any:
    """``convert(text)`` for the setting ``name`` as a compare variant or a sweep grid gives it; text that does not
    convert is an error naming the setting and what it takes (``dropout=abc: expected a probability or auto``)."""
    try:
        return convert(text)
    except (ValueError, TypeError) as err:
        kind = _KINDS.get(getattr(convert, "__name__", ""))
        raise RecipeError(f"{name}={text}: expected {kind}" if kind else f"{name}={text}: {err}") from None


class RecipeError(InputError):
    """A recipe or method option that cannot be used."""


# The text parser of a training setting by the kind of its TrainConfig field: the flag's type (argparse's int,
# float), and for a boolean (a switch on the command line) what compare variants and sweep grids take.
_TEXT_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": parse_bool}
_OPTION_KINDS = {int: "int", float: "float", parse_bool: "bool"}  # a method option's kind, by its parser
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "a boolean (true or false)", "str": "a string",
             "dict": "a mapping"}


def _field_kind(name: str) -> tuple[str, bool]:
    """(the kind of TrainConfig field ``name``: "int", "float", "bool", "str", "dict", whether it may be None)."""
    from .adapters.base import annotation_kinds
    from .engine import TrainConfig

    kinds = [k.partition("[")[0] for k in annotation_kinds(TrainConfig.__dataclass_fields__[name].type)]
    return next((k for k in kinds if k != "None"), "None"), "None" in kinds


def setting_parser(name: str) -> Callable[[str], Any]:
    """The parser of the text of the training setting ``name`` (a TrainConfig field), as its command-line flag
    reads it: ``int``, ``float``, a boolean (:func:`mlae.utils.parse_bool`) or the text itself; for a setting that
    may be None (``img_size``), also ``none``/``null``. Recipes, compare variants and sweep grids read text so."""
    kind, optional = _field_kind(name)
    convert = _TEXT_PARSERS.get(kind, str)
    if not optional:
        return convert

    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__  # parse_setting names what the setting takes by it
    return parse


def _shown(value: Any) -> str:
    """A recipe's value as its YAML says it (``true``, ``null``, ``1.5``, ``one``), for error messages."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str) and (not value.strip() or value.strip() != value):
        return repr(value)
    return str(value)


def _typed(kind: str, value: Any, parse: Callable[[str], Any]) -> Any:
    """``value`` as a setting of ``kind`` takes it: text through ``parse`` (its flag's conversion), a whole float as
    an integer (as adapter configs store one); a ValueError where it is of another type (a boolean is no number, a
    number no text)."""
    if isinstance(value, str) and kind in _TEXT_PARSERS:
        return parse(value)
    if kind == "bool" and isinstance(value, bool) or kind == "str" and isinstance(value, str) or (
            kind == "dict" and isinstance(value, dict)):
        return value
    if kind in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind == "float" or isinstance(value, int):
            return value
        if value.is_integer():
            return int(value)
    if kind in _EXPECTED:
        raise ValueError(value)
    return value  # a kind this check does not know: TrainConfig decides


def _typed_settings(values: dict, where: str) -> dict:
    """A recipe's ``values`` with each training setting and method option of the type it takes (see
    :func:`_typed`; a method option's text through its flag's parser, e.g. ``dropout: '0.5'``); ``where`` (the
    file, and the ``per_dataset`` entry) starts the error of one that is not. Keys that are neither are left to
    :func:`config_from_options`, which names them, and so are method options' values that are no text and no
    number or boolean (lists, for one): their adapter config checks them."""
    from .engine import TrainConfig

    options = {o.name: o for m in METHODS.values() for o in m.options}  # one declaration per name (register_method)
    typed = {}
    for key, value in values.items():
        opt, kind = options.get(key), None
        if key in TrainConfig.__dataclass_fields__:
            (kind, optional), parse = _field_kind(key), setting_parser(key)
        elif opt is not None and not opt.nargs and opt.type not in (str, parse_list):
            kind, optional, parse = _OPTION_KINDS.get(opt.type, "text"), False, opt.type
        if kind is None or kind == "text" and not isinstance(value, str) or value is None and optional:
            typed[key] = value
            continue
        try:
            typed[key] = parse(value) if kind == "text" else _typed(kind, value, parse)
        except (ValueError, TypeError):
            expected = _EXPECTED.get(kind) or _KINDS.get(getattr(parse, "__name__", ""), "a valid value")
            raise RecipeError(f"{where}: {key}: {_shown(value)} is not {expected}") from None
    return typed


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
    # What the method adds to the engine's training loop (extra optimizer groups, phases, aux-loss weights,
    # results, figures): a subclass of adapters.base.TrainingHooks, made once per run.
    hooks: type[TrainingHooks] = TrainingHooks

    # Options -> the same options as one run's identity (e.g. MLAE's dropout="auto" settings reset where p is
    # fixed): what stored configurations are compared as (resume, compare's reuse, the study's rows).
    canonical: Callable[[dict], dict] | None = None
    # Raises the error a run with these options (all of them, defaults included) would meet, without a model:
    # for a method that is one adapter config, building that config (an adapters.base.AdapterConfig checks
    # every value); for MoLE, finding its experts' files.
    check: Callable[[dict], Any] | None = None

    def defaults(self) -> dict:
        return {opt.name: opt.default for opt in self.options}

    def check_options(self, options: dict) -> None:
        """Raise the error a run with ``options`` would meet when its adapter config is built (a value out of
        range, a pair that does not go together), without building a model: sweeps check every grid point
        before the first trial trains, and `mlae train` before it loads data."""
        if self.check is not None:
            with warnings.catch_warnings():  # the run itself warns about what it ignores, once
                warnings.simplefilter("ignore")
                self.check({**self.defaults(), **options})

    def canonical_options(self, options: dict) -> dict:
        """This method's options from ``options`` (other keys dropped), with the defaults of those a file written
        before they existed lacks, in their canonical form."""
        full = {**self.defaults(), **{k: v for k, v in options.items() if k in self.defaults()}}
        return self.canonical(full) if self.canonical else full


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


# --------------------------------------------------------------------------------------------- methods


def _option_fields(cls: type[AdapterConfig]) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with adapters.base.option: its own first, then those every config has
    (target_modules), so that a method's help lists what is particular to it first."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def _option_name(f: dataclasses.Field) -> str:
    return f.metadata["name"] or f.name


def config_options(cls: type[AdapterConfig], *, exclude: tuple[str, ...] = (), **defaults: Any) -> tuple[Option, ...]:
    """The options of the config class ``cls``, one per field declared with adapters.base.option, except those
    named in ``exclude``; ``defaults`` replaces the fields' defaults by option name."""
    unknown = set(defaults) - {_option_name(f) for f in _option_fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {', '.join(sorted(unknown))}")
    options = []
    for f in _option_fields(cls):
        name = _option_name(f)
        if name in exclude:
            continue
        default = defaults.get(name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        flag = option_flag(name, default) if isinstance(default, bool) else None  # a switch to the other value
        options.append(Option(name, f.metadata["type"], default, f.metadata["help"], f.metadata["choices"], flag))
    return tuple(options)


def _adapter_method(name: str, help: str, cls: type[AdapterConfig], options: tuple[Option, ...],
                    **kwargs: Any) -> Method:
    """A method that is one adapter config: ``prepare`` is mlae.apply with the options as ``cls``'s fields."""
    fields = {_option_name(f): f.name for f in _option_fields(cls)}

    def config(options: dict) -> AdapterConfig:
        return cls(**{fields.get(k, k): v for k, v in options.items()})

    def prepare(model: nn.Module, options: dict) -> nn.Module:
        return apply(model, config(options))

    return Method(name, help, prepare, options, check=config, **kwargs)


def _prepare_linear(model: nn.Module, options: dict) -> nn.Module:
    freeze_backbone(model, train_head=True)
    return model


def _prepare_full(model: nn.Module, options: dict) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _mole_sources(options: dict) -> list[str]:
    """The experts' files, each found (a run folder stands for its adapter file), before any model is built."""
    if not options["experts_from"]:
        raise RecipeError("--method mole needs the trained adapters to mix: --experts-from A B ...")
    sources = [expert_source(s) for s in parse_list(options["experts_from"])]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise RecipeError(f"--experts-from: {', '.join(missing)} not found (trained adapter files, run folders or "
                          "PEFT adapter folders)")
    resolved = [str(Path(s).resolve()) for s in sources]
    twice = sorted({s for s, r in zip(sources, resolved) if resolved.count(r) > 1})
    if twice:  # two copies of one expert are no mixture of two
        raise RecipeError(f"--experts-from: {', '.join(twice)} names one expert more than once; list each once")
    return sources


def _prepare_mole(model: nn.Module, options: dict) -> nn.Module:
    return from_adapters(model, _mole_sources(options), granularity=options["granularity"],
                         temperature=options["temperature"])


register_method(_adapter_method("mlae", "Masked LoRA Experts", MLAEConfig, config_options(MLAEConfig),
                                hooks=MLAETraining, canonical=MLAEConfig.canonical_options))
register_method(_adapter_method("lora", "LoRA", LoRAConfig, config_options(LoRAConfig, exclude=("lora_dropout",))))
register_method(_adapter_method("lora-dropout", "LoRA with dropout on the adapter input", LoRAConfig,
                                config_options(LoRAConfig, lora_dropout=0.1)))
register_method(Method("linear", "linear probe: train the classification head only", _prepare_linear))
register_method(Method("full", "full fine-tuning of every weight", _prepare_full, adapter=False))
# DMLoRATraining has the engine switch to stage 2 (and wrap the model for DDP again then). Dropped branches still
# get a (zero) gradient, so DDP need not look for unused parameters.
register_method(_adapter_method("dmlora", "Dropout Mixture LoRA: branches, gradual branch dropout, two-stage "
                                "scalars", DMLoRAConfig, config_options(DMLoRAConfig), hooks=DMLoRATraining))
# MoLE's targets are the experts' modules. Its other two options are no MoLEConfig fields: the experts are read
# into the adapter (the config keeps only their paths, as `sources`), and the balance loss's weight is used by the
# training loop only (MoLETraining), not by the model.
register_method(Method("mole", "Mixture of LoRA Experts: learned gates over frozen trained adapters", _prepare_mole, (
    Option("experts_from", str, [], "trained adapters to mix (mlae .safetensors files or run folders, or PEFT "
           "LoRA folders)",
           nargs="+"),
    *config_options(MoLEConfig, exclude=("target_modules",)),
    Option("balance_weight", float, 0.01, "weight of the gating balance loss"),
), hooks=MoLETraining, check=_mole_sources))


def dataset_key(spec: str) -> str:
    """The dataset name a recipe's ``per_dataset`` section is keyed by: ``/data/vtab-1k/cifar/`` -> ``cifar``,
    ``suite:digits`` -> ``digits``, ``fgvc:CUB_200_2011`` -> ``cub_200_2011``."""
    prefix, sep, rest = str(spec).partition(":")
    if sep and prefix == "folder":  # folder:. and folder:.. are named by the folder they stand for (a link by its
        return (os.path.basename(os.path.abspath(os.path.expanduser(rest))) or rest).lower()  # own name)
    name = os.path.basename(os.path.normpath(str(spec)))
    return name.rsplit(":", 1)[-1].lower()


def read_yaml(path: str | os.PathLike, what: str, option: str) -> Any:
    """The content of the YAML file ``path`` that ``option`` named (``what``: "recipe", "search space"); a missing
    file, a folder or invalid YAML is a one-line error."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"{option} {path}: {what} not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{option} {path} is a folder; name the YAML file of the {what}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{option} {path}: not a text file; name the YAML file of the {what}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or "unreadable"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{option} {path}: not valid YAML ({problem}{where})") from None


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a YAML recipe into a dict (``per_dataset`` kept as is), each value of the type its setting takes
    (:func:`_typed_settings`): ``lr: 1e-3`` (text to YAML 1.1) is 0.001, ``epochs: 1.5`` an error."""
    data = read_yaml(path, "recipe", "--config")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of option: value")
    per_dataset = data.get("per_dataset", {})
    if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
        raise RecipeError(f"{path}: per_dataset must map dataset names to mappings of option: value")
    # Every value is checked now, those of other datasets' entries too: before any run folder is made.
    typed = _typed_settings({k: v for k, v in data.items() if k != "per_dataset"}, str(path))
    if "per_dataset" in data:
        typed["per_dataset"] = {name: _typed_settings(entry, f"{path}: per_dataset: {name}")
                                for name, entry in per_dataset.items()}
    return typed


def resolve_recipe(recipe: dict, dataset: str | None) -> dict:
    """Flatten a recipe for ``dataset``: its ``per_dataset[dataset]`` entries override the general ones."""
    flat = {k: v for k, v in recipe.items() if k != "per_dataset"}
    if dataset is not None:
        per_dataset = {str(k).lower(): v for k, v in recipe.get("per_dataset", {}).items()}
        flat.update(per_dataset.get(dataset_key(dataset), {}))
    return flat


def canonical_config(d: dict) -> dict:
    """A stored run configuration (config.yaml, compare.yaml, a checkpoint's record: TrainConfig fields and the
    method's options side by side) with its method's options in canonical form (:meth:`Method.canonical_options`),
    so that two records of one run compare equal across versions that added options or changed a default that
    does not apply."""
    method = METHODS.get(d.get("method"))
    if method is None:
        return dict(d)
    return {**d, **method.canonical_options(d)}


def _interrupted_settings(out: Path) -> dict:
    """The settings an interrupted run in ``out`` was started with, for ``--resume``: its config.yaml (a hand-edited
    one is then refused against the checkpoint's record), or where that is gone or empty, the record its
    checkpoint carries; nothing when neither is there (the run folder check then says what is missing)."""
    config = out / "config.yaml"
    if config.is_file() and config.read_text(errors="replace").strip():
        return load_recipe(config)
    if (out / CHECKPOINT).is_file():
        try:
            recorded = checkpoint_settings(out / CHECKPOINT)
        except (InputError, KeyError, ValueError):  # a damaged checkpoint: the run folder check reports it
            recorded = None
        return recorded or {}
    return {}


def config_from_options(options: dict, recipe: str | os.PathLike | None = None, *, check: bool = True):
    """A :class:`mlae.engine.TrainConfig` from options as ``mlae train`` takes them (TrainConfig fields and method
    options by name, only those given), with its precedence: the method's and TrainConfig's defaults < ``recipe``
    (its ``per_dataset`` entry for the dataset included) < ``options``. With ``options["resume"]`` the run
    folder's own ``config.yaml`` takes the place of the defaults and the recipe. Method options that the chosen
    method does not take are an error; a recipe written for another method keeps only its general settings.
    ``check``: also raise the error the method's options would meet in a run (:meth:`Method.check_options`);
    off for a run that has finished, whose inputs (MoLE's expert files) need not exist any more."""
    from .engine import TrainConfig
    from .rundir import default_out

    base: dict = {}
    if options.get("resume"):
        out = Path(options["out"]) if "out" in options else default_out(TrainConfig(**{
            k: v for k, v in options.items() if k in ("dataset", "method", "seed")}))
        base = _interrupted_settings(out)
    elif recipe:
        loaded = load_recipe(recipe)
        base = resolve_recipe(loaded, options.get("dataset", loaded.get("dataset", TrainConfig.dataset)))
    method = get_method(options.get("method", base.get("method", TrainConfig.method)))
    own = set(method.defaults())
    fields = set(TrainConfig.__dataclass_fields__)
    bad = [k for k in options if k not in fields and k not in own]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        # Name the methods that do take them, and the options of the same family (LoRA+Dropout's --lora-dropout
        # and DMLoRA's --branch-dropout for --dropout), so that the fix is in the message.
        takers = sorted(m.name for m in METHODS.values() if set(bad) <= set(m.defaults()))
        related = sorted({f"--{o.replace('_', '-')} ({m.name})" for m in METHODS.values() for o in m.defaults()
                          for k in bad if o.endswith("_" + k)})
        hint = (f"; taken by {', '.join(takers)}" if takers else "") + (
            f"; related: {', '.join(related)}" if related else "")
        raise RecipeError(f"{flags} do(es) not apply to method {method.name!r}{hint}")
    if base.get("method", method.name) != method.name:
        # The recipe was written for another method: keep its general settings, drop its method options.
        base = {k: v for k, v in base.items() if k in fields or k in own}
    cfg = TrainConfig.from_dict({**base, **options})
    if check:
        method.check_options(cfg.options())  # a value out of range is named now, not after the data has loaded
    # A setting the user gave that the configuration ignores (MLAE's --dropout-learner with a fixed p) is a
    # mistake to point out; stored files that carry such settings load (Method.canonical_options resets them).
    given = cfg.options()
    canonical = method.canonical_options(given)
    ignored = [k for k in options if k in own and canonical[k] != given[k]]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise RecipeError(f"{flags}: not used with these settings (with MLAE they apply to --dropout auto only); "
                          "drop them or add --dropout auto")
    return cfg
