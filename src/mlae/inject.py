"""Put adapters into any ``nn.Module`` by module-name patterns; freeze; merge; count parameters."""
from __future__ import annotations

import hashlib
import re
import warnings

import torch
from torch import nn

from .adapters.base import AdapterConfig, AdapterLayer, adapter_layers
from .errors import InputError, MLAEWarning

__all__ = ["apply", "merge", "unmerge", "merge_and_unload", "adapter_layers", "freeze_backbone",
           "head_module_names", "count_parameters", "set_progress", "set_train_size", "aux_losses",
           "learned_values", "backbone_fingerprint"]

CONFIG_ATTR = "mlae_config"          # the applied AdapterConfig, kept on the model
HEADS_ATTR = "mlae_modules_to_save"  # names of fully trained modules (the head)
# What classifier heads are called outside timm: torchvision (ViT `heads.head`, ResNet `fc`, Swin `head`,
# ConvNeXt/EfficientNet `classifier`), Hugging Face (`classifier`, `score`).
HEAD_NAMES = ("head", "heads", "classifier", "fc", "score")


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def head_module_names(model: nn.Module, modules_to_save: list[str] | None = None) -> list[str]:
    """Qualified names of the modules trained in full (by default the classifier head)."""
    names = dict(model.named_modules())
    if modules_to_save is not None:
        found = [n for n in names if n and any(_matches(n, p) for p in modules_to_save)]
        if not found:
            raise InputError(f"modules_to_save {modules_to_save} match no module of {type(model).__name__}")
        return found
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for n, m in names.items():
            if m is head and n and any(True for _ in m.parameters()):
                return [n]
        return []  # e.g. num_classes=0: nothing to train besides the adapters
    # The shallowest modules with a head's name, at most one level down: torchvision's ViT has `heads`
    # (a Sequential holding `heads.head`); deeper matches (an `fc` inside a block) are not heads.
    found = [n for n, m in names.items() if n and n.count(".") <= 1 and n.rpartition(".")[2] in HEAD_NAMES
             and any(True for _ in m.parameters())]
    depth = min((n.count(".") for n in found), default=0)
    return [n for n in found if n.count(".") == depth]


def _warn_if_no_head(model: nn.Module, heads: list[str], train_head: bool) -> None:
    """A new task's head left frozen (or missing) trains nothing useful: say so instead of a random head."""
    if not train_head:
        return
    modules = dict(model.named_modules())
    if not any(p.requires_grad for n in heads for p in modules[n].parameters()):
        warnings.warn(f"no classifier head of {type(model).__name__} is trainable (looked for get_classifier() "
                      f"and modules named {'/'.join(HEAD_NAMES)}): name it with modules_to_save=[...], or pass "
                      "train_head=False if there is none", MLAEWarning, stacklevel=3)


def _set_trainable_heads(model: nn.Module, heads: list[str], train_head: bool) -> None:
    modules = dict(model.named_modules())
    for n in heads:
        modules[n].requires_grad_(train_head)


def freeze_backbone(model: nn.Module, train_head: bool = True, modules_to_save: list[str] | None = None) -> nn.Module:
    """Freeze every parameter except the head (the linear-probe baseline)."""
    model.requires_grad_(False)
    heads = head_module_names(model, modules_to_save)
    _set_trainable_heads(model, heads, train_head)
    _warn_if_no_head(model, heads, train_head)
    setattr(model, HEADS_ATTR, heads)
    return model


def _unsupported_targets(model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> list[str]:
    """Targets whose parent reads their weight directly instead of calling them: an adapter there never runs.
    nn.MultiheadAttention passes ``out_proj.weight`` to F.multi_head_attention_forward (torchvision's ViT)."""
    owners = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
              if isinstance(m, nn.MultiheadAttention)}
    return [n for n, _ in targets if n in owners]


def apply(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adapt ``model`` in place: every ``nn.Linear`` matching ``config.target_modules`` becomes an adapter
    layer; everything else is frozen except the classifier head (``config.train_head``). Returns ``model``."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an adapter config (e.g. mlae.MLAEConfig()), got {type(config).__name__}")
    if getattr(model, CONFIG_ATTR, None) is not None or any(True for _ in adapter_layers(model)):
        raise InputError("this model already has adapters; create a fresh model to apply another config")
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [(n, m) for n, m in linear if any(_matches(n, p) for p in config.target_modules)]
    if not targets:
        examples = ", ".join(n for n, _ in linear[:6]) or "none"
        raise InputError(f"no nn.Linear of {type(model).__name__} matches target_modules {config.target_modules}; "
                         f"Linear modules in this model include: {examples}")
    bad = _unsupported_targets(model, targets)
    if bad:
        raise InputError(f"cannot adapt {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") +
                         ": it is the out_proj of an nn.MultiheadAttention, whose forward reads out_proj.weight "
                         "directly, so an adapter there would never run; target other Linear layers (e.g. the "
                         "MLP's) or narrow target_modules")
    heads = head_module_names(model, config.modules_to_save) if config.train_head or config.modules_to_save else []
    if any(n in heads for n, _ in targets):
        raise InputError(f"target_modules {config.target_modules} also match the head {heads}; "
                         "narrow the patterns or set train_head=False")
    plan = dict(zip([n for n, _ in targets], config.layer_plan([n for n, _ in targets])))

    model.requires_grad_(False)
    for name, base in targets:
        layer = config.create_layer(base, **plan[name])
        layer.name = name
        # A new module starts in training mode; inside a model already in eval mode that would leave masking
        # and dropout active although model.training is False. Take the mode of the layer it replaces.
        layer.train(base.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    _set_trainable_heads(model, heads, config.train_head)
    _warn_if_no_head(model, heads, config.train_head)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, HEADS_ATTR, heads)
    return model


def merge(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Fold every adapter into its base weight (``W ← W + ΔW``): inference then costs exactly the plain
    backbone's. Idempotent. Checks every merged weight is finite before writing any. ``keep_original=False``
    frees the copy of the original weights (unmerge then subtracts ΔW, exact up to rounding). A merged model's
    ``state_dict()`` holds ``W + ΔW`` and the factors: load it only into a model merged the same way (or save
    with :func:`mlae.save_adapter`, right in either state)."""
    todo = [(layer, layer.merged_weight()) for _, layer in adapter_layers(model) if not layer.merged]
    for layer, new in todo:
        layer.merge(new, keep_original=keep_original)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the original base weights. Idempotent."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put each merged base ``nn.Linear`` back where its adapter layer was (PEFT's
    name): the result is the plain model, with the backbone's own state_dict keys and no trace of mlae.
    In place; returns ``model``. Input-dependent adapters (MoLE) have no merged form and are refused."""
    merge(model, keep_original=False)
    for name, layer in list(adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    for attr in (CONFIG_ATTR, HEADS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def backbone_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 of the frozen backbone: every parameter except the adapters' own and the head's, under the
    plain model's names (``x.base.weight`` counts as ``x.weight``), so a plain backbone and the same backbone
    with adapters applied agree. Buffers are left out: running statistics (BatchNorm) move in training even
    when frozen. ``None`` when a layer was merged without keeping its original."""
    layers = dict(adapter_layers(model))
    if any(layer.merged and layer.original_weight() is None for layer in layers.values()):
        return None
    skip = [n + "." for n in getattr(model, HEADS_ATTR, None) or head_module_names(model)]
    h = hashlib.sha256()
    for key, value in model.named_parameters():
        owner, _, rest = key.rpartition(".base.")
        if owner in layers:
            if layers[owner].merged and rest == "weight":
                value = layers[owner].original_weight()
            key = f"{owner}.{rest}"
        elif any(key.startswith(p) for p in skip) or any(key.startswith(n + ".") for n in layers):
            continue  # the head, and the adapters' own tensors
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``adapter``: trainable parameters inside adapter layers (what PEFT papers quote), ``head``: trainable
    parameters of the fully trained modules, ``trainable``: all trainable, ``total``: all parameters."""
    adapter = sum(p.numel() for _, layer in adapter_layers(model) for n, p in layer.named_parameters()
                  if p.requires_grad and not n.startswith("base."))
    modules = dict(model.named_modules())
    heads = getattr(model, HEADS_ATTR, None) or head_module_names(model)  # full fine-tuning marks no heads
    head = sum(p.numel() for n in heads for p in modules[n].parameters() if p.requires_grad)
    return {"adapter": adapter, "head": head,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def set_progress(model: nn.Module, t: float) -> None:
    """Tell the adapters how far training is (``t`` in [0, 1]); methods with schedules (DMLoRA's gradual
    branch dropout) read it, the others ignore it. Call once per training step."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise InputError(f"training progress must be a number in [0, 1], got {t!r}")
    for _, layer in adapter_layers(model):
        if hasattr(layer, "set_progress"):
            layer.set_progress(t)


def set_train_size(model: nn.Module, n: int) -> None:
    """Tell the adapters how many training examples ``n`` there are; methods whose regulariser is the prior term of
    a per-example objective (MLAE with ``dropout="auto"``: KL / N) read it, the others ignore it. Call once before
    training."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the training-set size must be a positive integer, got {n!r}")
    for _, layer in adapter_layers(model):
        if hasattr(layer, "set_train_size"):
            layer.set_train_size(n)


def learned_values(model: nn.Module) -> dict[str, dict]:
    """What the adapters learn besides their updates, by layer name (MLAE with ``dropout="auto"``:
    ``{"blocks.0.attn.qkv": {"dropout": 0.12}, ...}``); empty for methods that learn nothing else."""
    return {name: values for name, layer in adapter_layers(model) if (values := layer.learned_values())}


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary losses of the last forward (e.g. MoLE's gating balance loss), by name. A layer class
    provides them through a ``collect_aux_losses(layers)`` static method that sees all its layers at once,
    because such losses are defined over the whole network, not per layer."""
    by_type: dict[type, list[AdapterLayer]] = {}
    for _, layer in adapter_layers(model):
        if hasattr(type(layer), "collect_aux_losses"):
            by_type.setdefault(type(layer), []).append(layer)
    losses: dict[str, torch.Tensor] = {}
    for cls, layers in by_type.items():
        losses.update(cls.collect_aux_losses(layers))
    return losses
