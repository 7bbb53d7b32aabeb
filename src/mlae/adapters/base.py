"""What every adapter shares: a frozen ``nn.Linear`` plus a trainable update, explicit merge/unmerge.

A method subclasses :class:`AdapterLayer` and implements ``delta(x)`` (the update's output for an input)
and ``factors()`` (the update as a product ``B @ A``; methods whose update is input dependent, like MoLE's
gates, instead override ``delta_weight`` or declare themselves unmergeable). Everything else -- merging, the
finite check, parameter bookkeeping -- lives here once.

A method's file also declares, next to its config fields, what ``mlae train`` shows of them (:func:`option`:
``mlae.recipes`` turns those fields into flags and YAML keys), and what it adds to the training loop
(:class:`TrainingHooks`). This module imports nothing of mlae above ``errors`` and ``utils``: ``mlae.inject`` and
``mlae.io`` build on it.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import numbers
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import InputError, MLAEWarning, NotMergeableError
from ..utils import parse_bool, parse_list

__all__ = ["AdapterConfig", "AdapterLayer", "CONFIGS", "config_from_dict", "adapter_layers", "option", "option_flag",
           "annotation_kinds", "Phase", "TrainingHooks"]

# A field's parser from the command line or a recipe, by the type of its default (option() may name another).
_PARSERS: dict[type, Callable[[Any], Any]] = {bool: parse_bool, int: int, float: float, str: str, list: parse_list}


def option(default: Any, help: str, *, choices: tuple | None = None, type: Callable[[Any], Any] | None = None,
           name: str | None = None) -> Any:
    """A config field that is also a method option of ``mlae train`` (``--flag`` and YAML key): its default,
    the ``help`` of its flag, its ``choices``, the parser of its text (``type``; by default that of the default's
    type: int, float, str, a boolean, a comma-separated list) and, where the field's own name would clash with
    another method's option, the option's ``name``. A boolean becomes a switch, ``--name`` when its default is
    False, ``--no-name`` when it is True (``help`` then says what the switch does). Fields declared with a plain
    default or ``field()`` are no options."""
    metadata = {"help": help, "choices": choices, "type": type or _PARSERS[default.__class__], "name": name}
    if isinstance(default, (list, dict)):  # mutable: every config gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_KIND_NAMES = {"bool": ("True or False", "booleans"), "int": ("an integer", "integers"),
               "float": ("a number", "numbers"), "str": ("a string", "strings"), "list": ("a list", "lists"),
               "dict": ("a dict", "dicts"), "None": ("None", "None")}


def _kind_name(kind: str) -> str:
    base, _, item = kind.partition("[")
    if base == "Literal":
        return " or ".join(map(repr, _literal_values(item) or [item[:-1]]))
    if base == "list" and item:
        return "a list of " + " or ".join(_KIND_NAMES.get(k, ("", k))[1] for k in _split_top(item[:-1]))
    return _KIND_NAMES.get(base, (kind,))[0]


def option_flag(name: str, default: Any) -> str:
    """The command-line flag of option ``name``: a boolean's flag switches it away from its ``default``
    (``--no-adaptive``), any other option's flag takes a value (``--coeff-init``)."""
    return ("--no-" if default is True else "--") + name.replace("_", "-")


def _flag(f: dataclasses.Field) -> str:
    """`` (--flag)`` of an option field, else empty (error messages name both the field and the flag)."""
    return f" ({option_flag(f.metadata.get('name') or f.name, f.default)})" if f.metadata else ""


def annotation_kinds(annotation: Any) -> list[str]:
    """The alternatives of a field annotation as text (``"float | None"`` -> ``["float", "None"]``), whether the
    config's module wrote ``from __future__ import annotations`` (a string) or not (a type or typing object)."""
    if isinstance(annotation, str):
        return _split_top(annotation)
    if annotation is type(None):
        return ["None"]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [k for a in args for k in annotation_kinds(a)]
    if origin is typing.Literal:
        return [f"Literal[{', '.join(map(repr, args))}]"]
    if origin is list and len(args) == 1 or origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return [f"list[{'|'.join(annotation_kinds(args[0]))}]"]
    if origin in (list, tuple):
        return [origin.__name__]  # tuple[int, str]: not checked here; the method's own validation decides
    if isinstance(annotation, type):
        return [annotation.__name__]
    return [str(annotation)]


def _split_top(text: str, sep: str = "|") -> list[str]:
    """``text`` split at ``sep`` outside brackets, each part stripped of surrounding spaces:
    ``"list[int | None] | str"`` -> ``["list[int | None]", "str"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _literal_values(item: str) -> list | None:
    """The values of ``Literal[...]``'s text, or None where they are no Python literals (an Enum member)."""
    try:
        return ast.literal_eval(f"[{item[:-1]}]")
    except (ValueError, SyntaxError):
        return None


def _plain(value: Any) -> Any:
    """NumPy scalars (``np.float32(0.5)``, ``np.bool_(True)``, also inside a list) as the Python values they
    hold: they must compare, print and go into JSON headers as numbers."""
    if type(value) in (list, tuple):  # exactly: a namedtuple is left as it is
        return type(value)(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def _has_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` fits one alternative of a field annotation (``float``, ``list[int]``, ...). An int is a
    float (``alpha=8``), a whole float an int (``rank=8.0``: the integer checks store it as 8), a bool neither."""
    base, _, item = kind.partition("[")
    if base == "None":
        return value is None
    if base == "Literal":  # Literal['auto']: one of the values written, of its type (True is not 1)
        values = _literal_values(item)
        return values is None or any(type(value) is type(v) and value == v for v in values)
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base == "int":
        return isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if base == "float":
        return isinstance(value, (int, float))
    if base == "str":
        return isinstance(value, str)
    if base == "list":
        items = _split_top(item[:-1]) if item else []
        return isinstance(value, (list, tuple)) and (not items or all(any(_has_kind(v, k) for k in items)
                                                                      for v in value))
    if base == "dict":
        return isinstance(value, dict)
    return True  # an annotation this check does not know: the method's own validation decides

# method name -> config class; filled by ``AdapterConfig.__init_subclass__``.
CONFIGS: dict[str, type["AdapterConfig"]] = {}


@dataclass
class AdapterConfig:
    """Fields every method has. Subclasses add their own and set ``method``."""

    method: ClassVar[str] = ""
    target_modules: list[str] = option(["qkv"], "comma-separated names (or name patterns) of the nn.Linear layers "
                                       "to adapt")
    """Qualified module names to adapt: a suffix (``"qkv"`` matches ``blocks.0.attn.qkv``) or a regex that
    fully matches the name (``r"blocks\\.(0|1)\\.attn\\.qkv"``)."""
    train_head: bool = True
    """Keep the classifier head trainable (the adapters are useless for a new task without it)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter. ``None``: the classifier head, found through
    ``model.get_classifier()`` (timm) or the shallowest module named ``head``/``heads``/``classifier``/``fc``/
    ``score`` (torchvision's ``heads``, Hugging Face's ``classifier``); a warning says when none is trainable."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Only a class that names its own method registers: a subclass that inherits ``method`` (a variant
        # made in a notebook or a test) must not replace the method's real config.
        if cls.__dict__.get("method"):
            CONFIGS[cls.method] = cls

    def __post_init__(self):
        self._check_types()
        if not self.train_head and self.modules_to_save:
            raise InputError(f"modules_to_save {self.modules_to_save} names modules to train in full, but "
                             "train_head=False freezes them: drop one of the two")
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise InputError(f"target_modules must be a non-empty list of names/patterns, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def _check_types(self) -> None:
        """Every field's value has a type its annotation allows, so that a string where a number belongs
        (``coeff_init="1"``, ``adaptive="no"``) is an error naming the field, not a TypeError deep inside, nor a
        truthy string taken as True. NumPy scalars become Python numbers (they must go into JSON headers)."""
        for name in ("target_modules", "modules_to_save"):  # one name stands for a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for f in dataclasses.fields(self):
            value, kinds = _plain(getattr(self, f.name)), annotation_kinds(f.type)
            if not any(_has_kind(value, k) for k in kinds):
                raise InputError(f"{f.name}{_flag(f)} must be {' or '.join(map(_kind_name, kinds))}, got {value!r}")
            # A whole float where only an integer belongs (seed=2.0, from a YAML "2.0" or a division) is stored
            # as the integer, so that the config and its JSON header say 2.
            if isinstance(value, float) and "int" in kinds and "float" not in kinds:
                value = int(value)
            setattr(self, f.name, value)

    def _field(self, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(self) if f.name == name)

    def _label(self, name: str) -> str:
        """``name (--flag)`` of a field, for error messages (just ``name`` for a field that is no option)."""
        return name + _flag(self._field(name))

    def _require_positive_int(self, *names: str) -> None:
        """Validate integer-valued fields (a float like 2.0 is accepted and stored as 2; True is not)."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
            setattr(self, name, int(v))

    def _require_scale(self, *names: str) -> None:
        """Validate factors of the update: finite, and not 0. A zero factor multiplies the update and every
        adapter gradient by 0 (``B`` starts at 0): the run would be a linear probe that reports itself as the
        method."""
        for name in names:
            v = getattr(self, name)
            if not math.isfinite(v):
                raise InputError(f"{self._label(name)} must be finite, got {v!r}")
            if v == 0:
                raise InputError(f"{self._label(name)} = 0 multiplies the update and its gradients by 0: the "
                                 "adapter would learn nothing (only the head would train); give a nonzero value "
                                 f"(default {self._field(name).default})")

    # --- what a method provides -------------------------------------------------------------------
    def layer_plan(self, names: list[str]) -> list[dict[str, Any]]:
        """Per-layer constructor arguments for the adapted modules ``names`` (in model order)."""
        return [{} for _ in names]

    def create_layer(self, base: nn.Linear, **layer_kwargs) -> "AdapterLayer":
        raise NotImplementedError

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from :meth:`AdapterConfig.to_dict` output (e.g. the metadata of a saved adapter)."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIGS:
        raise InputError(f"unknown adapter method {method!r}; known: {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"{method} config has unknown fields {unknown}")
    return cls(**d)


class AdapterLayer(nn.Module):
    """A frozen linear layer ``y = W x + b`` plus a trainable update ``ΔW``."""

    mergeable: ClassVar[bool] = True
    # Submodules that exist only for training (MLAE's learned masking probability): checkpoints keep their
    # parameters, adapter files leave them out and keep :meth:`learned_values` in their header instead.
    training_only: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.name = ""  # qualified name in the model, set by inject.apply; used in error messages
        self.merged = False
        self._original_weight: torch.Tensor | None = None
        self._merged_version: int | None = None  # the weight's version counter right after merge

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def init_factors(self, rank: int) -> None:
        """Trainable low-rank factors initialised as in LoRA: ``A`` kaiming-uniform (a=√5), ``B = 0``, so the
        update starts at zero. Stacked experts/branches get the same per-slice init, because the fan-in of
        every ``[k, in]`` slice of ``A`` is ``in``, the same as the whole tensor's."""
        dev = self.base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # --- to implement ----------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution ``ΔW x`` (training-mode masking/dropout included)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``ΔW = B @ A`` at inference: ``A: [R, in]``, ``B: [out, R]`` (all scales folded into B)."""
        raise NotImplementedError

    def expert_sizes(self) -> list[int]:
        """How the ``R`` rank-1 components of :meth:`factors` group into experts (for expert similarity)."""
        return [1] * self.factors()[0].shape[0]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds of this layer: its state less the frozen base and the training-only parts."""
        skip = ("base", *self.training_only)
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] not in skip}

    def learned_values(self) -> dict[str, Any]:
        """JSON-able values learned besides the update (e.g. ``{"dropout": p}``); none by default."""
        return {}

    def restore_learned_values(self, values: dict[str, Any]) -> None:
        """Set what :meth:`learned_values` returned (when an adapter file is loaded)."""

    # --- shared ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                # The update is folded into the frozen weight: a training step would silently train nothing.
                # (No stacklevel: the caller is torch's module machinery; one warning per process is enough.)
                warnings.warn(f"the adapter of {self.name or type(self).__name__} is merged, so training gets "
                              "no gradient for it; call mlae.unmerge(model) before training", MLAEWarning)
            return y
        # apply() on a model already in bf16/fp16 creates fp32 factors (training them in half precision loses
        # Adam's small steps), so outside autocast the update runs in the factors' dtype and is cast back to the
        # layer's, as PEFT does.
        dtype = self.lora_A.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return y + self.delta(x.to(dtype)).to(y.dtype)
        return y + self.delta(x)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` in the base weight's dtype; raises if it is not finite (nothing is changed then)."""
        if not self.mergeable:
            raise NotMergeableError(f"{type(self).__name__} at {self.name or '?'} cannot be merged into its base "
                                    "layer: its update depends on the input")
        w = self.base.weight
        new = (w.float() + self.delta_weight().to(w.device)).to(w.dtype)
        if not torch.isfinite(new).all():
            raise InputError(f"merging the adapter of {self.name or 'this layer'} would write non-finite weights; "
                             "the layer is left unmerged (check the adapter for NaN/inf values)")
        return new

    @torch.no_grad()
    def merge(self, new_weight: torch.Tensor | None = None, keep_original: bool = True) -> None:
        if self.merged:
            return
        new_weight = self.merged_weight() if new_weight is None else new_weight
        # Keeping the original makes unmerge exact (W + ΔW - ΔW is not W in floating point).
        self._original_weight = self.base.weight.detach().clone() if keep_original else None
        self.base.weight.copy_(new_weight)
        self._merged_version = self.base.weight._version  # see original_weight()
        self.merged = True

    def original_weight(self) -> torch.Tensor | None:
        """The weight from before :meth:`merge`, where it still belongs to the merged weight: None when none was
        kept, or when the weight was written since (``load_state_dict`` of another merged model), whose original
        this copy is not."""
        if self._original_weight is None or self.base.weight._version != self._merged_version:
            return None
        return self._original_weight

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.original_weight() is not None:
            self.base.weight.copy_(self._original_weight)
        else:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer of ``model`` with its qualified name, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


# --------------------------------------------------------------------------------------------- training hooks


@dataclass(frozen=True)
class Phase:
    """A stretch of training from step ``start`` on with its own cosine learning-rate decay from ``lr`` (no
    warmup) to 0 where the next phase starts (or training ends). ``begin()`` runs once when training enters the
    phase, also when a resumed run starts inside it; it may make other parameters trainable (the engine wraps the
    model for DDP again afterwards)."""

    start: int
    lr: float
    begin: Callable[[], Any] | None = None


class TrainingHooks:
    """What a method adds to the training loop of :func:`mlae.engine.train`, beyond the model its
    ``Method.prepare`` returns. A method's file subclasses it and ``mlae.recipes`` names the subclass in the
    method's ``Method(hooks=...)``; the engine makes one per run from the prepared model and the method's options,
    and calls each hook at one fixed point. Every default does nothing, so a method overrides what it needs:

    * :meth:`param_groups` -- more AdamW parameter groups (once, after the group of the trainable parameters);
    * :meth:`phases` -- phases after the first, each with its own learning-rate schedule and a start callback;
    * :meth:`aux_loss_weights` -- weights of the model's auxiliary losses (:func:`mlae.aux_losses`) in the loss;
    * :meth:`distributions` -- tensors logged to TensorBoard every epoch (histogram and mean/std/min/max);
    * :meth:`held_out_fraction` -- the fraction of the training images to hold out of training (once, at setup);
    * :meth:`end_epoch` -- called after every epoch but the last, with eval-mode losses on training and held-out
      images;
    * :meth:`state` / :meth:`load_state` -- the hooks' own JSON-able state, kept in checkpoints;
    * :meth:`results` -- entries added to ``results.json`` after training;
    * :meth:`figures` -- PNG files drawn into the run folder after training (see also :attr:`files`).
    """

    # Run-folder files the method writes (its figures): a run started over in the folder deletes them first,
    # whichever method wrote them.
    files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, options: dict[str, Any]):
        self.model, self.options = model, options

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer groups (``{"params": [...], ...}``, AdamW's other settings from the run). They exist
        from the first step, so that checkpoints of every phase have one optimizer layout: parameters that train
        only in a later phase sit in them frozen (no gradient) until then."""
        return []

    def phases(self, total_steps: int, lr: float) -> list[Phase]:
        """The phases after the first, in order of ``start``; the first runs from step 0 with the run's ``lr``
        and warmup. A phase that starts at ``total_steps`` or later never begins."""
        return []

    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss by name in the training loss (1 for those not named)."""
        return {}

    def distributions(self) -> dict[str, torch.Tensor]:
        """Tensors to log to TensorBoard after each epoch, by tag."""
        return {}

    def held_out_fraction(self) -> float:
        """The fraction of the training split (0 to 1/2) the engine sets aside before training, as a fixed, seeded,
        class-stratified subset that is never trained on, to measure :meth:`end_epoch`'s held-out loss on. The
        eval split (val or test) is never used for it. 0 (the default): none, the whole split trains."""
        return 0.0

    def end_epoch(self, epoch: int, losses: Callable[[], tuple[float, float]] | None) -> dict[str, Any]:
        """Called after every epoch but the last (1-based; no epoch follows the last to use a decision), before
        the epoch's metrics and checkpoint are written, on every rank. ``losses()`` returns ``(L_t, L_h)``: the mean cross-entropy in eval mode (no masks, no dropout,
        no augmentation) on a fixed subset of the training images of the held-out set's size, and on the held-out
        set (all-reduced over ranks; computed only when called). ``losses`` is None when nothing is held out.
        The entries returned (JSON-able numbers) are added to the epoch's line of ``metrics.jsonl``."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON-able state the hooks change while training (e.g. a controller's value), saved in checkpoints so
        that a resumed run continues bit-identically; :meth:`load_state` gets it back."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (when a run resumes from a checkpoint)."""

    def results(self) -> dict[str, Any]:
        """JSON-able entries for ``results.json``, taken after the last epoch."""
        return {}

    def figures(self, results: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
        """File name in the run folder -> ``draw(plt)`` returning a matplotlib figure of the finished run
        (``results``: what results.json will hold). Skipped with a note when matplotlib is not installed."""
        return {}
