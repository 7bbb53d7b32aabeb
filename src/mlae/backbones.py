"""Backbones: the embedded pretrained ViT, timm model names and local checkpoints.

``create_backbone(name, num_classes=...)`` returns a timm ``VisionTransformer`` whose classifier head has
``num_classes`` outputs, whatever ``name`` is:

* ``None`` / ``"embedded"`` — a small ViT (32×32 input, patch 4) pretrained from scratch on formula-driven
  fractal images (see :mod:`mlae.pretrain`); its weights ship inside the package (``mlae/weights``), so it
  works offline. The default is ``"embedded-v3"`` (12 blocks × width 128); ``"embedded-v2"`` (4 × 192, the
  default before) stays selectable by name (:data:`EMBEDDED_VERSIONS`).
  ``pretrained=False`` gives the same architecture randomly initialised.
* a timm model name, e.g. ``vit_base_patch16_224.orig_in21k`` (the paper's ViT-B/16 ImageNet-21k) — weights
  come from the Hugging Face hub through timm, which needs network access.
* a folder written by ``mlae pretrain --out DIR`` (``embedded_vit.safetensors`` + ``embedded_vit.json``), or
  that weights file itself: the architecture and input statistics come from the card in the folder.
* a local file — Google's ``.npz`` ViT checkpoints (``ViT-B_16.npz`` as VPT/NOAH/SPT load it),
  ``.safetensors``, or ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``: never
  unpickles arbitrary objects). ``arch`` names the timm architecture the file fits (default
  ``vit_base_patch16_224``). Classifier head weights in the file are dropped; the head is new.
"""
from __future__ import annotations

import json
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MLAEError

__all__ = [
    "EMBEDDED",
    "EMBEDDED_VERSIONS",
    "DEFAULT_EMBEDDED",
    "BackboneError",
    "create_backbone",
    "backbone_input_size",
    "embedded_card",
    "card_folder",
    "build_embedded",
    "load_checkpoint",
    "DEFAULT_ARCH",
]

EMBEDDED = "embedded"
# Shipped embedded backbones by version name (folder under mlae/weights; "" = the folder itself). "embedded" is
# the default one. Results name the version, so that they stay reproducible when the default changes.
EMBEDDED_VERSIONS = {"embedded-v2": "", "embedded-v3": "v3"}
DEFAULT_EMBEDDED = "embedded-v3"
DEFAULT_ARCH = "vit_base_patch16_224"  # = timm's old `vit_base_patch16_224_in21k` layout (ViT-B/16)
WEIGHTS_FILE = "embedded_vit.safetensors"
CARD_FILE = "embedded_vit.json"
CHECKPOINT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")
# Head parameter names in timm ViTs and in Google's npz files: never loaded, the head is always new.
_HEAD_PREFIXES = ("head.", "head/", "pre_logits")

# The embedded architecture when no card is shipped (e.g. before the first pretraining run).
EMBEDDED_ARCH: dict[str, Any] = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 192,
    "depth": 4,
    "num_heads": 3,
}
# Seconds to wait for the Hugging Face hub before calling the machine offline (huggingface_hub's own retries
# took 47 s to give up).
HUB_PROBE_TIMEOUT = 3.0
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.5, 0.5, 0.5)


class BackboneError(MLAEError, RuntimeError):
    """A backbone could not be built or its weights could not be loaded (message says why and what to do)."""


# ---------------------------------------------------------------------------------------------- embedded
def _weights_dir() -> Path:
    return Path(str(resources.files("mlae") / "weights"))


def _default_folder() -> Path:
    """The folder of the default embedded version (what ``embedded`` and no ``--backbone`` mean)."""
    return _weights_dir() / EMBEDDED_VERSIONS[DEFAULT_EMBEDDED]


def card_folder(name: str | os.PathLike | None) -> Path | None:
    """The folder of a backbone given as ``mlae pretrain`` output (the folder or its weights file), else None."""
    if name is None or str(name) == EMBEDDED:
        return None
    if str(name) in EMBEDDED_VERSIONS:
        return _weights_dir() / EMBEDDED_VERSIONS[str(name)]
    path = Path(name).expanduser()
    folder = path if path.is_dir() else path.parent if path.name == WEIGHTS_FILE else None
    return folder if folder is not None and (folder / CARD_FILE).is_file() else None


def embedded_card(folder: Path | None = None) -> dict[str, Any]:
    """The JSON card of the embedded weights (architecture, recipe, evaluation) shipped with mlae, or the one in
    ``folder`` (``mlae pretrain`` output); ``{}`` if absent."""
    path = (folder or _default_folder()) / CARD_FILE
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def build_embedded(arch: dict[str, Any] | None = None, *, num_classes: int, drop_path_rate: float = 0.1,
                   mean=EMBEDDED_MEAN, std=EMBEDDED_STD) -> nn.Module:
    """The embedded ViT architecture, randomly initialised (``arch`` as stored in the card)."""
    import timm

    kwargs = dict(arch or EMBEDDED_ARCH)
    model_name = kwargs.pop("model_name")
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                              drop_path_rate=drop_path_rate, **kwargs)
    size = int(kwargs.get("img_size", 32))
    # timm's data helpers (resolve_data_config) read this: 32×32 input, [-1, 1] normalisation.
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {}, input_size=(3, size, size),
                                mean=tuple(mean), std=tuple(std), crop_pct=1.0, interpolation="bicubic",
                                num_classes=num_classes)
    return model


def _create_embedded(num_classes: int, pretrained: bool, drop_path_rate: float,
                     folder: Path | None = None) -> nn.Module:
    card = embedded_card(folder)
    inputs = card.get("input", {})
    model = build_embedded(card.get("arch"), num_classes=num_classes, drop_path_rate=drop_path_rate,
                           mean=inputs.get("mean", EMBEDDED_MEAN), std=inputs.get("std", EMBEDDED_STD))
    if pretrained:
        path = (folder or _default_folder()) / WEIGHTS_FILE
        if not path.is_file():
            raise BackboneError(f"the backbone weights are missing ({path}); reinstall mlae or recreate them "
                                f"with `mlae pretrain --out {path.parent}`" if folder is None else
                                f"the backbone folder {folder} has a card but no weights ({path})")
        _load_into(model, _read_safetensors(path), str(path))
    return model


# ------------------------------------------------------------------------------------------------ public
def create_backbone(name: str | os.PathLike | None = None, *, num_classes: int, pretrained: bool = True,
                    drop_path_rate: float = 0.1, img_size: int | None = None, patch_size: int | None = None,
                    arch: str | None = None) -> nn.Module:
    """Build a ViT backbone with a fresh ``num_classes`` head (see the module docstring for ``name``)."""
    folder = card_folder(name)
    if name is None or str(name) == EMBEDDED or folder is not None:
        size = embedded_card(folder).get("arch", EMBEDDED_ARCH)
        if img_size not in (None, size["img_size"]) or patch_size not in (None, size["patch_size"]) or arch:
            raise BackboneError(f"{folder or 'the embedded backbone'} has the fixed architecture of its card "
                                f"({size['img_size']}×{size['img_size']}, patch {size['patch_size']}); "
                                "img_size/patch_size/arch apply to timm names and checkpoint files")
        return _create_embedded(num_classes, pretrained, drop_path_rate, folder)
    name = str(name)
    extra: dict[str, Any] = {}
    if img_size is not None:
        extra["img_size"] = img_size
    if patch_size is not None:
        extra["patch_size"] = patch_size
    if _looks_like_path(name):
        model = _timm_model(arch or DEFAULT_ARCH, False, num_classes, drop_path_rate, extra)
        return load_checkpoint(model, name) if pretrained else model
    return _timm_model(name, pretrained, num_classes, drop_path_rate, extra)


def backbone_input_size(model: nn.Module) -> int:
    """Side of the square image the model expects (e.g. 32 for the embedded ViT, 224 for ViT-B/16)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, None, None))[1:]
    if isinstance(size, int):
        return size
    if size is None or size[0] is None:
        raise BackboneError(f"cannot tell the input size of {type(model).__name__}")
    if size[0] != size[1]:
        raise BackboneError(f"the model expects non-square {tuple(size)} images")
    return int(size[0])


# -------------------------------------------------------------------------------------------------- timm
def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in name or name.startswith(".") \
        or Path(name).exists()


def _timm_model(name: str, pretrained: bool, num_classes: int, drop_path_rate: float,
                extra: dict[str, Any]) -> nn.Module:
    import timm

    if pretrained and (timm.is_model(name) or name.startswith("hf-hub:")):  # a misspelt name: say that instead
        _check_hub_reachable(name)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                 drop_path_rate=drop_path_rate, **extra)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"unknown backbone {name!r}: not a timm model name (see timm.list_models()), "
                                f"not an existing checkpoint file, and not an embedded version "
                                f"({', '.join([EMBEDDED, *EMBEDDED_VERSIONS])})") from err
        if pretrained:
            raise _download_error(name, err) from err
        raise
    except (OSError, ConnectionError, ValueError) as err:
        if pretrained:
            raise _download_error(name, err) from err
        raise


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds when the hub cannot be reached, instead of after huggingface_hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return  # timm then reads the local Hugging Face cache only, and fails at once if it is not there
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy a direct connection proves nothing
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as err:
        raise BackboneError(
            f"cannot reach the Hugging Face hub ({url.hostname}:{port}: {err}) to download {name!r}. Offline, set "
            "HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache, pass a local checkpoint (e.g. "
            "`--backbone /path/to/ViT-B_16.npz`), or use the embedded backbone (`--backbone embedded`)") from None


def _download_error(name: str, err: BaseException) -> BackboneError:
    return BackboneError(
        f"could not download the pretrained weights of {name!r} ({type(err).__name__}: {err}). This needs "
        "network access to the Hugging Face hub. Offline, pass a local checkpoint instead, e.g. "
        "`--backbone /path/to/ViT-B_16.npz` (Google's ImageNet-21k ViT-B/16, arch vit_base_patch16_224) or a "
        ".safetensors/.pth state dict, or use the embedded backbone (`--backbone embedded`).")


# ----------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local checkpoint into ``model`` (head excluded); raise BackboneError if it does not fit."""
    path = Path(path)
    if path.is_dir():
        raise BackboneError(f"{path} is a folder without {CARD_FILE}: pass a checkpoint file, or a folder written "
                            "by `mlae pretrain --out`")
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        _load_npz(model, path)
        return model
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    _load_into(model, state, str(path))
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated / garbage files
        raise BackboneError(f"cannot read {path} as safetensors (corrupt or not a safetensors file): "
                            f"{err}") from err


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise BackboneError(f"{path} contains pickled Python objects other than tensors; refusing to "
                                "unpickle it (torch.load weights_only=True). Save a plain state_dict, or "
                                "convert it to .safetensors.") from err
        raise BackboneError(f"cannot read {path} as a PyTorch checkpoint (corrupt or wrong format): "
                            f"{err}") from err
    # common wrappers: {"state_dict": ...}, {"model": ...}, {"module": ...}
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_head(key: str) -> bool:
    return key.startswith(_HEAD_PREFIXES)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of everything but the head; a mismatch names the first keys that do not fit."""
    own = {k: v for k, v in model.state_dict().items() if not _is_head(k)}
    state = {k: v for k, v in state.items() if not _is_head(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise BackboneError(_mismatch_message(source, type(model).__name__, missing, unexpected, wrong))
    with torch.no_grad():
        params = dict(model.state_dict())
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def _mismatch_message(source: str, model_name: str, missing: list[str], unexpected: list[str],
                      wrong: list[tuple[str, tuple, tuple]], show: int = 5) -> str:
    def head(items: list[str]) -> str:
        more = f" (+{len(items) - show} more)" if len(items) > show else ""
        return ", ".join(items[:show]) + more

    lines = [f"checkpoint {source} does not fit the {model_name} architecture"
             " (pick the matching timm architecture with `arch=` / `--arch`):"]
    if missing:
        lines.append(f"  missing from the checkpoint: {head(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint: {head(unexpected)}")
    if wrong:
        lines.append("  wrong shape (checkpoint vs model): "
                     + head([f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in wrong]))
    return "\n".join(lines)


def _load_npz(model: nn.Module, path: Path) -> None:
    """Google's ViT ``.npz`` (vision_transformer / big_vision layout), via timm's own converter
    (``VisionTransformer.load_pretrained``)."""
    import numpy as np

    if not callable(getattr(model, "load_pretrained", None)):
        raise BackboneError(f"{path}: Google .npz checkpoints load into timm VisionTransformer models only, not "
                            f"{type(model).__name__}; pick a ViT architecture with `arch=` (e.g. "
                            "vit_base_patch16_224)")
    try:
        with np.load(str(path)) as npz:
            shapes = {k: tuple(npz[k].shape) for k in npz.files}
    except Exception as err:
        raise BackboneError(f"cannot read {path} as a numpy .npz archive (corrupt or wrong format): "
                            f"{err}") from err
    _check_npz_layout(model, path, shapes)
    head = {k: v.clone() for k, v in model.state_dict().items() if _is_head(k)}
    try:
        model.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError) as err:
        raise BackboneError(f"checkpoint {path} does not fit the {type(model).__name__} architecture "
                            f"(pick the matching timm architecture with `arch=`): {type(err).__name__}: "
                            f"{err}") from err
    # timm copies the file's head when its shape happens to match: the head must stay new
    model.load_state_dict(head, strict=False)


def _check_npz_layout(model: nn.Module, path: Path, shapes: dict[str, tuple]) -> None:
    """Compare the npz's embedding and block layout with the model before timm's converter fails inside."""
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in shapes),
                  None)
    if prefix is None:
        raise BackboneError(_mismatch_message(str(path), type(model).__name__, ["embedding/kernel"], [], []))
    missing: list[str] = []
    unexpected: list[str] = []
    wrong: list[tuple[str, tuple, tuple]] = []
    w = model.patch_embed.proj.weight
    expect = {"embedding/kernel": (w.shape[2], w.shape[3], w.shape[1], w.shape[0])}
    if getattr(model, "cls_token", None) is not None:
        expect["cls"] = tuple(model.cls_token.shape)
    depth = len(model.blocks)
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in shapes  # big_vision: blocks stacked
    if stacked:
        n_blocks = shapes[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"][0]
        if n_blocks != depth:
            wrong.append(("Transformer/encoderblock (stacked blocks)", (n_blocks,), (depth,)))
    else:
        present = {k[len(prefix):].split("/")[1] for k in shapes if k.startswith(f"{prefix}Transformer/encoderblock_")}
        wanted = {f"encoderblock_{i}" for i in range(depth)}
        missing += [f"Transformer/{b}/..." for b in sorted(wanted - present, key=lambda b: int(b.split("_")[1]))]
        unexpected += [f"Transformer/{b}/..." for b in sorted(present - wanted, key=lambda b: int(b.split("_")[1]))]
        expect["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = tuple(model.blocks[0].mlp.fc1.weight.shape[::-1])
    for key, shape in expect.items():
        if prefix + key not in shapes:
            missing.append(key)
        elif shapes[prefix + key] != shape:
            wrong.append((key, shapes[prefix + key], shape))
    pos = f"{prefix}pos_embedding" if f"{prefix}pos_embedding" in shapes else \
        f"{prefix}Transformer/posembed_input/pos_embedding"
    if pos not in shapes:
        missing.append(pos[len(prefix):])
    elif shapes[pos][-1] != model.embed_dim:
        wrong.append((pos[len(prefix):], shapes[pos], tuple(model.pos_embed.shape)))
    if missing or unexpected or wrong:
        raise BackboneError(_mismatch_message(str(path), type(model).__name__, missing, unexpected, wrong))
