"""Training and evaluation loop: one fine-tuning run from a :class:`TrainConfig` to a run folder (its files:
:mod:`mlae.rundir`; the trained weights file: :mod:`mlae.trained`).

Determinism: the data order and augmentation of epoch ``e`` are drawn from generators seeded by ``(seed, e)``,
and the global RNG states (dropout, drop-path, expert masks) are checkpointed at epoch boundaries, so a run
resumed from a checkpoint ends with the same metrics as an uninterrupted one (same device and thread count).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .adapters.base import Phase, TrainingHooks
from .attention import ATTENTION_CHOICES, set_attention
from .backbones import EMBEDDED, backbone_input_size, card_folder
from .errors import InputError, MLAEError, MLAEWarning, TrainingError
from .files import atomic_write_text
from .hardware import (THREADS_RULE, DistInfo, auto_threads, autocast, init_distributed, resolve_device,
                       resolve_precision)
from .inject import aux_losses, count_parameters, learned_values, set_progress, set_train_size
from .recipes import Method, get_method
from .rundir import (CHECKPOINT, RESULTS, TENSORBOARD_DIR, clear_run_files, draw_curves, load_checkpoint,
                     prepare_run_dir, save_checkpoint, save_figure, write_config)
from .trained import backbone_kwargs, build_backbone, save_weights, weights_metadata
from .utils import get_rng_state, seed_everything

__all__ = ["TrainConfig", "train", "evaluate", "Inputs", "backbone_stats", "resolve_normalize", "init_head",
           "NORMALIZE_CHOICES", "HEAD_INITS", "DEFAULT_DATASET"]

# The no-argument run: a suite task on which the embedded backbone's pretraining clearly helps (docs/BACKBONES.md).
DEFAULT_DATASET = "suite:digits"
EVAL_BATCH = 256  # fixed, so that `mlae eval` reproduces the run's numbers bit for bit
# How inputs are normalised (see backbone_stats); "auto" is what runs made before the option used.
NORMALIZE_CHOICES = ("auto", "backbone", "inception", "imagenet")
HEAD_INITS = ("timm", "zero")
PROTOCOL = ("top1 is the accuracy on the eval split after the LAST epoch (VPT's honest protocol), "
            "not the best of periodic evaluations")


@dataclass
class TrainConfig:
    """Everything one fine-tuning run depends on. Defaults: the MLAE paper's recipe, except ``epochs``."""

    dataset: str = DEFAULT_DATASET   # data spec understood by mlae.data.load_task
    method: str = "mlae"             # a key of mlae.recipes.METHODS
    method_options: dict[str, Any] = field(default_factory=dict)  # overrides of the method's option defaults
    # backbone
    backbone: str | None = None      # None = the embedded ViT; a timm name or a checkpoint path
    pretrained: bool = True
    arch: str | None = None          # timm architecture of a checkpoint path
    img_size: int | None = None
    patch_size: int | None = None
    drop_path: float = 0.1
    normalize: str = "auto"          # input statistics: auto | backbone | inception | imagenet (NORMALIZE_CHOICES)
    head_init: str = "timm"          # the new head: timm (trunc-normal 0.02, timm >= 1.0) | zero (timm 0.4 era)
    # data
    data_root: str | None = None
    cache: bool = True               # keep decoded VTAB-1k / FGVC / folder images in a cache file
    split: str = "test"              # "test": train on train+val, report test; "val": hold out a validation split
    skip_bad_images: bool = False    # folder datasets: train without unreadable images (listed in results.json)
    # optimisation
    epochs: int = 8
    warmup_epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    seed: int = 0
    precision: str = "auto"
    attention: str = "auto"          # auto | fused | math (mlae.attention: math on CPU + bf16, fused elsewhere)
    device: str | None = None
    threads: int = 0                 # torch CPU threads; 0 = auto (the cores not kept busy by other programs)
    # run folder and bookkeeping
    out: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 1
    eval_every: int = 0              # epochs between evaluations; 0 = auto: about 4 points, the last epoch always
    progress: bool = True
    tensorboard: bool = False        # also log to <out>/tensorboard (metrics.jsonl stays the record)

    def __post_init__(self) -> None:
        get_method(self.method)
        for name, choices in (("attention", ATTENTION_CHOICES), ("normalize", NORMALIZE_CHOICES),
                              ("head_init", HEAD_INITS)):
            if getattr(self, name) not in choices:
                raise InputError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.split not in ("test", "val"):
            raise InputError(f"split must be test or val, not {self.split!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} (--{name.replace('_', '-')}) must be >= 1, not {getattr(self, name)!r}")
        if self.eval_every < 0:
            raise InputError(f"eval_every (--eval-every) must be >= 1, or 0 for about four evaluations per run, not "
                             f"{self.eval_every!r}")
        # One check per value, naming it and its flag; `not x > 0` also refuses NaN (every comparison with NaN is
        # False), which would otherwise reach the optimiser or train a run of NaN losses.
        if not self.lr > 0 or math.isinf(self.lr):
            raise InputError(f"lr (--lr) must be a positive number, not {self.lr!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise InputError(f"weight_decay (--weight-decay) must be a number >= 0, not {self.weight_decay!r}")
        if self.warmup_epochs < 0:
            raise InputError(f"warmup_epochs (--warmup-epochs) must be >= 0, not {self.warmup_epochs!r}")
        if not 0 <= self.drop_path < 1:
            raise InputError(f"drop_path (--drop-path, the stochastic depth rate) must be in [0, 1), not "
                             f"{self.drop_path!r}")
        if self.seed < 0:  # numpy's generators (the held-out split, the data folds) take none
            raise InputError(f"seed (--seed) must be an integer >= 0, not {self.seed!r}")
        if self.threads < 0:
            raise InputError(f"threads (--threads) must be {THREADS_RULE}, not {self.threads!r}")
        for name in ("img_size", "patch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} (--{name.replace('_', '-')}) must be >= 1, not {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise InputError("--resume continues the run in --out and --overwrite replaces it: pass one of them")

    @property
    def eval_interval(self) -> int:
        """Epochs between evaluations. Evaluating the test split after every epoch cost about 20 % of a short
        CPU run's training time; four points still show the curve's shape."""
        return self.eval_every or max(1, math.ceil(self.epochs / 4))

    def options(self) -> dict[str, Any]:
        """The method's options: its defaults overridden by ``method_options``."""
        method = get_method(self.method)
        unknown = set(self.method_options) - set(method.defaults())
        if unknown:
            raise InputError(f"method {self.method!r} has no option(s) {', '.join(sorted(unknown))}")
        return {**method.defaults(), **self.method_options}

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping (method options at top level), as written to ``config.yaml``."""
        d = dataclasses.asdict(self)
        d.pop("method_options")
        for transient in ("resume", "overwrite", "progress", "tensorboard"):
            d.pop(transient)
        d.update(self.options())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`: keys that are not fields are options of ``d["method"]``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        options = {**kwargs.pop("method_options", {}), **{k: v for k, v in d.items() if k not in names}}
        known = set(get_method(kwargs.get("method", cls.method)).defaults())
        unknown = set(options) - known
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(sorted(unknown))} for method "
                             f"{kwargs.get('method', cls.method)!r}")
        return cls(**kwargs, method_options=options)


# --------------------------------------------------------------------------------------------- loops


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _order(n: int, seed: int, epoch: int, dist_info: DistInfo) -> torch.Tensor:
    """This rank's share of the seeded permutation of epoch ``epoch`` (padded like DistributedSampler)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if dist_info.enabled:
        size = math.ceil(n / dist_info.world_size) * dist_info.world_size
        perm = torch.cat([perm, perm[: size - n]])[dist_info.rank::dist_info.world_size]
    return perm


def _all_reduce(values: list[float], device: torch.device, dist_info: DistInfo) -> list[float]:
    if not dist_info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class Inputs:
    """Cached uint8 images -> model inputs: the task's crop/flip recipe (``prepare_batch``, which normalises with
    ImageNet statistics), then, for other statistics (``mean``/``std``, see :func:`backbone_stats`), a
    per-channel affine map onto those."""

    augment: str
    image_size: int
    device: torch.device
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        from .data import IMAGENET_MEAN, IMAGENET_STD

        self._affine = None
        if self.mean is not None and (tuple(self.mean), tuple(self.std)) != (IMAGENET_MEAN, IMAGENET_STD):
            m_in, s_in, m, s = (torch.tensor(v, device=self.device).view(1, 3, 1, 1)
                                for v in (IMAGENET_MEAN, IMAGENET_STD, self.mean, self.std))
            self._affine = (s_in / s, (m_in - m) / s)

    def __call__(self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None):
        from . import data  # looked up per call so that benchmarks/overhead.py can time it

        x = data.prepare_batch(images.to(self.device, non_blocking=True), train=train, augment=self.augment,
                               image_size=self.image_size, generator=generator)
        if self._affine is not None:
            x = x * self._affine[0] + self._affine[1]
        return x


def resolve_normalize(normalize: str, backbone: str | None) -> str:
    """The statistics ``normalize`` stands for with ``backbone``. ``auto`` keeps what runs made before the option
    used: the embedded ViT (and a folder written by `mlae pretrain`, whose card says so) its own ([-1, 1], how it
    was pretrained), timm names and checkpoint files ImageNet's (the NOAH-era protocol of VTAB-1k and FGVC code)."""
    if normalize != "auto":
        return normalize
    return "backbone" if backbone in (None, EMBEDDED) or card_folder(backbone) is not None else "imagenet"


def backbone_stats(backbone: str | None, model: nn.Module, normalize: str = "auto") -> tuple[tuple, tuple]:
    """(mean, std) to feed ``backbone`` with: ImageNet's, Inception's (0.5, i.e. [-1, 1]) or, for ``backbone``,
    the model's own ``pretrained_cfg`` (the embedded ViT's card; for a checkpoint file, that of its timm
    architecture's default weights, which need not describe the file)."""
    from .data import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD

    protocol = resolve_normalize(normalize, backbone)
    if protocol == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if protocol == "inception":
        return INCEPTION_MEAN, INCEPTION_STD
    card = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in card or "std" not in card:
        raise InputError(f"--normalize backbone: {backbone or 'the embedded backbone'} declares no mean/std in its "
                         "pretrained_cfg; pass --normalize inception or --normalize imagenet")
    return tuple(float(v) for v in card["mean"]), tuple(float(v) for v in card["std"])


def init_head(model: nn.Module, how: str) -> None:
    """``zero``: zero the new classifier head, as timm 0.4 (the NOAH / SPT generation) did; ``timm``: keep what
    the installed timm drew (trunc-normal std 0.02 since timm 1.0)."""
    if how == "zero":
        with torch.no_grad():
            for p in model.get_classifier().parameters():
                p.zero_()


def evaluate(model: nn.Module, split, inputs: Inputs, *, precision: str, dist_info: DistInfo = DistInfo()) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (sharded over ranks, counts all-reduced)."""
    return _eval_mean(model, split, inputs, precision, dist_info,
                      lambda logits, labels: int((logits.argmax(-1).cpu() == labels).sum()))


def mean_loss(model: nn.Module, split, inputs: Inputs, *, precision: str, dist_info: DistInfo = DistInfo()) -> float:
    """Mean cross-entropy of ``model`` on ``split`` in eval mode (no masks, no augmentation), as :func:`evaluate`
    measures top-1 (sharded over ranks, sums all-reduced)."""
    return _eval_mean(model, split, inputs, precision, dist_info, lambda logits, labels: float(
        F.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum")))


@torch.inference_mode()
def _eval_mean(model: nn.Module, split, inputs: Inputs, precision: str, dist_info: DistInfo, score) -> float:
    """``score(logits, labels)`` summed over ``split`` in eval mode, over all ranks, per image."""
    was_training = model.training
    model.eval()
    index = torch.arange(dist_info.rank, len(split), dist_info.world_size)
    total = 0
    for start in range(0, len(index), EVAL_BATCH):
        idx = index[start:start + EVAL_BATCH]
        with autocast(inputs.device, precision):
            logits = model(inputs(split.images[idx], train=False))
        total += score(logits, split.labels[idx])
    model.train(was_training)
    total, count = _all_reduce([total, len(index)], inputs.device, dist_info)
    return total / max(1.0, count)


def hold_out(train, fraction: float, seed: int) -> tuple[Any, Any, Any]:
    """``(trained, held_out, probe)`` splits of the training split ``train`` for a method that asks for held-out
    images (TrainingHooks.held_out_fraction): a fixed, seeded, class-stratified ``fraction`` of every class is
    held out (at least one image per class), the rest is trained on, and ``probe`` is a fixed seeded subset of
    the trained images of the held-out set's size (where the training-side loss is measured)."""
    from .data.folder import stratified_holdout

    labels = train.labels.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    small = classes[counts < 2].tolist()
    if small:
        raise InputError(f"the training split is too small to hold out one image per class for the held-out "
                         f"controller (class(es) {', '.join(map(str, small[:8]))}{', ...' if len(small) > 8 else ''} "
                         f"have {int(counts.min())} image): train on more images per class, or use "
                         "--dropout-learner variational or concrete")
    keep, held = stratified_holdout(labels, fraction, seed * 1_000_003 + 4099)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 8191)
    probe = np.sort(torch.randperm(len(keep), generator=g)[:len(held)].numpy())
    trained = train.subset(keep)
    return trained, train.subset(held), trained.subset(probe)


def train(cfg: TrainConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune as ``cfg`` says; returns the results dict (also written to ``results.json``).

    ``on_epoch_end(epoch, metrics)`` runs after every epoch (1-based) and may raise to stop the run early
    (e.g. optuna.TrialPruned); the files written so far are kept. The run folder is locked until it returns.
    """
    with contextlib.ExitStack() as stack:
        return _train(cfg, on_epoch_end, stack)


def _train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None, stack: contextlib.ExitStack) -> dict:
    if cfg.warmup_epochs > cfg.epochs:  # cut to the run's length below (_setup): say so
        warnings.warn(f"warmup_epochs (--warmup-epochs) {cfg.warmup_epochs} is longer than the run (--epochs "
                      f"{cfg.epochs}): the learning rate rises for the whole run and never decays", MLAEWarning,
                      stacklevel=3)
    run = _setup(cfg, stack)
    try:
        metrics, first_epoch = _start(run)
        _loop(run, metrics, first_epoch, on_epoch_end)
        return _finish(run, metrics)
    except KeyboardInterrupt as err:
        err.run_dir = run.out  # where the checkpoint is: the command line says how to continue
        raise


@dataclass
class _Run:
    """What the steps of one training run share: where it runs, its data, the prepared model, optimizer and method
    hooks, and its step plan (``phases[0]`` starts at step 0 with the warmup; see TrainingHooks.phases)."""

    cfg: TrainConfig
    method: Method
    dist_info: DistInfo
    device: torch.device
    precision: str
    out: Path | None
    resume: bool
    start_time: float
    task: Any
    inputs: Inputs
    normalize: str
    model: nn.Module
    attention: str
    optimizer: torch.optim.Optimizer
    counts: dict[str, int]
    hooks: TrainingHooks
    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    phases: list[Phase]
    held_out: Any = None  # images held out of training for the method (TrainingHooks.held_out_fraction), or None
    probe: Any = None     # as many training images, where the training-side loss is measured

    def losses(self) -> tuple[float, float]:
        """(eval-mode mean loss on ``probe``, on ``held_out``): what TrainingHooks.end_epoch gets."""
        kwargs = {"precision": self.precision, "dist_info": self.dist_info}
        return (mean_loss(self.model, self.probe, self.inputs, **kwargs),
                mean_loss(self.model, self.held_out, self.inputs, **kwargs))

    def wrap(self) -> nn.Module:
        """The model as the training steps call it: in DistributedDataParallel when several processes train."""
        if not self.dist_info.enabled:
            return self.model
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.method.skips_parameters)

    def schedule(self, step: int) -> tuple[int, float]:
        """(index of the phase ``step`` is in, its learning rate): the phase's cosine from its lr to 0 at the next
        phase's start, after the run's warmup in the first phase."""
        k = max(i for i, phase in enumerate(self.phases) if phase.start <= step)
        start = self.phases[k].start
        end = self.phases[k + 1].start if k + 1 < len(self.phases) else self.total_steps
        return k, lr_at(step - start, end - start, self.warmup_steps if k == 0 else 0, self.phases[k].lr)


def _setup(cfg: TrainConfig, stack: contextlib.ExitStack) -> _Run:
    """Device, run folder, data and the model prepared with its method and optimizer."""
    from .data import load_task

    start_time = time.time()
    method = get_method(cfg.method)
    options = cfg.options()
    dist_info = init_distributed(cfg.device, stack)
    device = resolve_device(cfg.device, dist_info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    out, resume = prepare_run_dir(cfg, stack) if dist_info.is_main else (None, False)
    if dist_info.enabled:
        shared = [out, resume]
        dist.broadcast_object_list(shared, src=0)
        out, resume = shared

    # The data sizes the head and the backbone sizes the images.
    seed_everything(cfg.seed)
    image_size = cfg.img_size or _input_size(cfg)
    task = load_task(cfg.dataset, data_root=cfg.data_root, image_size=image_size, split=cfg.split, seed=cfg.seed,
                     skip_bad=cfg.skip_bad_images, cache=cfg.cache)
    model = build_backbone(cfg.backbone, task.num_classes, cfg.seed, cfg.drop_path, **backbone_kwargs(cfg))
    init_head(model, cfg.head_init)
    normalize = resolve_normalize(cfg.normalize, cfg.backbone)
    inputs = Inputs(task.augment, image_size, device, *backbone_stats(cfg.backbone, model, normalize))
    model = method.prepare(model, options).to(device)
    hooks = method.hooks(model, options)
    # A method's held-out images (MLAE's heldout learner) come out of the training split, never the eval split.
    held_out = probe = None
    fraction = hooks.held_out_fraction()
    if fraction > 0:
        if not fraction <= 0.5:
            raise InputError(f"a method may hold out at most half the training images, not {fraction}")
        train_split, held_out, probe = hold_out(task.train, fraction, cfg.seed)
        task = dataclasses.replace(task, train=train_split)
        if cfg.epochs < 2 and dist_info.is_main:  # end_epoch runs after every epoch but the last: never here
            print(f"mlae: warning: {cfg.method} updates its held-out controller after each epoch but the last, so "
                  "with --epochs 1 it never does: use more epochs, or a fixed setting instead of the learned one",
                  file=sys.stderr)
    set_train_size(model, len(task.train))  # N of per-example regularisers (MLAE's learned p: KL / N)
    attention = set_attention(model, cfg.attention, device=device, precision=precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = count_parameters(model)
    for group in hooks.param_groups():
        optimizer.add_param_group(group)

    per_rank_batch = max(1, cfg.batch_size // dist_info.world_size)
    shard = len(_order(len(task.train), cfg.seed, 0, dist_info))
    steps_per_epoch = math.ceil(shard / per_rank_batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch
    phases = [Phase(0, cfg.lr), *hooks.phases(total_steps, cfg.lr)]
    return _Run(cfg, method, dist_info, device, precision, out, resume, start_time, task, inputs, normalize, model,
                attention, optimizer, counts, hooks, per_rank_batch, steps_per_epoch, total_steps, warmup_steps,
                phases, held_out, probe)


def _input_size(cfg: TrainConfig) -> int:
    """The side of the images the backbone takes, read off an untrained copy. It is built on the meta device (no
    memory, no initialisation: seconds less for a ViT-B), from the same constructor, so it tells the same size; a
    model whose constructor computes with its tensors cannot be built there and is built for real."""
    kwargs = {**backbone_kwargs(cfg), "pretrained": False}
    try:
        with torch.device("meta"):
            probe = build_backbone(cfg.backbone, 1, cfg.seed, **kwargs)
    except MLAEError:
        raise
    except Exception:  # e.g. .item() of a meta tensor in a constructor
        probe = build_backbone(cfg.backbone, 1, cfg.seed, **kwargs)
    return int(backbone_input_size(probe))


def _start(run: _Run) -> tuple[list[dict], int]:
    """Continue from the checkpoint or seed a fresh start, and write the run folder's first files; returns the
    metrics so far and the first epoch to train."""
    cfg, dist_info, out = run.cfg, run.dist_info, run.out
    metrics: list[dict] = []
    first_epoch = 1
    if run.resume:
        state = load_checkpoint(out / CHECKPOINT, run.model, run.optimizer, dist_info.rank)
        metrics, first_epoch = state["metrics"], state["epoch"] + 1
        run.hooks.load_state(state.get("hooks", {}))
        if run.device.type == "cpu" and not cfg.threads:
            torch.set_num_threads(state["threads"])  # CPU results depend on the thread count
    else:
        # Distinct global RNG streams per rank (drop-path, masks) once the model is identical everywhere.
        seed_everything(cfg.seed * 1_000_003 + 7919 * (dist_info.rank + 1))
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not run.resume:
            clear_run_files(out)
        if not run.resume or not (out / "config.yaml").exists():  # a resumed run keeps the record it started with
            write_config(out / "config.yaml", cfg, out)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    return metrics, first_epoch


def _loop(run: _Run, metrics: list[dict], first_epoch: int, on_epoch_end: Callable[[int, dict], None] | None) -> None:
    """Train the epochs from ``first_epoch`` on, appending to ``metrics`` (and metrics.jsonl), checkpointing."""
    cfg, model, optimizer, task, inputs = run.cfg, run.model, run.optimizer, run.task, run.inputs
    dist_info, device, precision, out = run.dist_info, run.device, run.precision, run.out
    steps_per_epoch, per_rank_batch = run.steps_per_epoch, run.per_rank_batch
    aux_weights = run.hooks.aux_loss_weights()
    phase = 0  # the last phase begun in this process (the first has nothing to begin)
    net = run.wrap()

    bar = _progress_bar(cfg, dist_info, run.total_steps, (first_epoch - 1) * steps_per_epoch)
    board = _open_tensorboard(out, first_epoch) if cfg.tensorboard and dist_info.is_main else None
    model.train()
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            order = _order(len(task.train), cfg.seed, epoch, dist_info)
            augment_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + dist_info.rank)
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for i in range(steps_per_epoch):
                step = (epoch - 1) * steps_per_epoch + i
                now, lr = run.schedule(step)
                if now > phase:  # also the phases a resumed run skipped over, in order
                    for begun in run.phases[phase + 1:now + 1]:
                        if begun.begin is not None:
                            begun.begin()
                    net, phase = run.wrap(), now  # DDP must see the parameters that train now
                for group in optimizer.param_groups:
                    group["lr"] = lr
                set_progress(model, step / max(1, run.total_steps - 1))
                idx = order[i * per_rank_batch:(i + 1) * per_rank_batch]
                x = inputs(task.train.images[idx], train=True, generator=augment_rng)
                y = task.train.labels[idx].to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
                aux = sum((aux_weights.get(name, 1.0) * value.float()
                           for name, value in aux_losses(model).items()), torch.zeros((), device=device))
                total = loss + aux
                if dist_info.enabled:
                    check = total.detach().clone()
                    dist.all_reduce(check)
                else:
                    check = total
                if not torch.isfinite(check):
                    raise TrainingError(f"loss became {check.item()} at epoch {epoch}, step {i + 1}/{steps_per_epoch}"
                                        f" (lr {lr:.3g}); try a lower --lr. Files written so far are kept in {out}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                aux_sum += aux.detach() * len(idx)
                correct += (logits.detach().argmax(-1) == y).sum()
                seen += len(idx)
                if bar is not None and (i % 5 == 4 or i == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{seen * dist_info.world_size / (time.perf_counter() - t0):.0f}",
                                    refresh=False)
                if bar is not None:
                    bar.update()
            train_time = time.perf_counter() - t0
            loss_total, aux_total, correct_total, seen_total = _all_reduce(
                [loss_sum.item(), aux_sum.item(), correct.item(), seen], device, dist_info)
            eval_top1 = None
            if epoch % cfg.eval_interval == 0 or epoch == cfg.epochs:
                eval_top1 = evaluate(model, task.eval, inputs, precision=precision, dist_info=dist_info)
            m = {"epoch": epoch, "lr": lr, "train_loss": loss_total / seen_total,
                 "train_top1": correct_total / seen_total, f"{task.eval_name}_top1": eval_top1,
                 "images_per_s": seen_total / train_time,
                 "train_time_s": train_time, "epoch_time_s": time.perf_counter() - t0}
            if aux_weights or aux_total:
                m["aux_loss"] = aux_total / seen_total
            # e.g. MLAE's held-out controller: it sets p for the next epoch, so `learned` below shows the new p.
            # Not after the last epoch: no epoch would train with its decision, and `learned` then reports the p
            # the adapter was trained with last.
            if epoch < cfg.epochs:
                m.update(run.hooks.end_epoch(epoch, run.losses if run.held_out is not None else None))
            learned = learned_values(model)
            if learned:
                m["learned"] = learned  # e.g. MLAE's masking probability per layer, for `mlae analyze dropout`
            metrics.append(m)
            if bar is not None:
                bar.set_description(f"epoch {epoch}/{cfg.epochs}" + (
                    f" {task.eval_name} {eval_top1:.3f}" if eval_top1 is not None else ""))
            rng = [get_rng_state()]
            if dist_info.enabled:
                rng = [None] * dist_info.world_size
                dist.all_gather_object(rng, get_rng_state())
            if dist_info.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
                if epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs:
                    save_checkpoint(out / CHECKPOINT, model, optimizer, epoch, step + 1, metrics, rng, cfg.to_dict(),
                                    run.hooks.state())
            if board is not None:
                _log_tensorboard(board, m, run.hooks)
            if on_epoch_end is not None:
                on_epoch_end(epoch, m)
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()


def _finish(run: _Run, metrics: list[dict]) -> dict:
    """The results of the trained model; the main process writes the weights, figures and results.json."""
    cfg, model, task, dist_info, out = run.cfg, run.model, run.task, run.dist_info, run.out
    # How far the adapter fits its training images, measured as the test split is (eval mode: no masks, no
    # augmentation). The running train_top1 of the last epoch is taken under masking and drop-path, which
    # understates memorisation exactly for the regularised methods.
    train_eval_top1 = evaluate(model, task.train, run.inputs, precision=run.precision, dist_info=dist_info)
    results = _results(cfg, task, metrics, run.counts, run.precision, run.device, dist_info, out, run.start_time)
    results["train_eval_top1"] = train_eval_top1
    results["train_images"] = len(task.train)  # those trained on: less any held out for the method
    if run.held_out is not None:
        results["held_out_images"] = len(run.held_out)
    results["attention"] = run.attention
    if metrics[-1].get("learned"):
        results["learned"] = metrics[-1]["learned"]
    results["normalize"] = run.normalize
    results.update(run.hooks.results())
    if dist_info.is_main:
        save_weights(out, model, run.method.adapter, weights_metadata(cfg, task, run.inputs, run.normalize))
        save_figure(out / "curves.png", lambda plt: draw_curves(plt, metrics, task.eval_name))
        for name, draw in run.hooks.figures(results).items():
            save_figure(out / name, draw)
        atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
        (out / CHECKPOINT).unlink(missing_ok=True)
        if cfg.progress:
            print(_summary(results), flush=True)
    return results


# --------------------------------------------------------------------------------------------- outputs


def _progress_bar(cfg: TrainConfig, dist_info: DistInfo, total: int, initial: int):
    if not (cfg.progress and dist_info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _open_tensorboard(out: Path, first_epoch: int):
    """A SummaryWriter on ``<out>/tensorboard``, or None (with a note) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("mlae: warning: --tensorboard needs the tensorboard package (pip install 'mlae[tensorboard]'); "
              "training without it (metrics.jsonl has every number)", file=sys.stderr)
        return None
    # purge_step: events a killed run logged after its last checkpoint are dropped, so resumed curves do not
    # double back over the epochs that are trained again.
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=first_epoch)


def _log_tensorboard(writer, m: dict, hooks: TrainingHooks) -> None:
    """One epoch's metrics.jsonl line as scalars, plus the method's distributions (e.g. MLAE's expert
    coefficients) as histograms with their mean/std/min/max."""
    for key, value in m.items():
        if key == "learned":  # {layer: {name: value or [values]}}: one scalar per layer (and expert)
            for layer, values in value.items():
                for name, v in values.items():
                    for i, x in enumerate(v if isinstance(v, list) else [v]):
                        writer.add_scalar(f"{name}/{layer}" + (f"/{i}" if isinstance(v, list) else ""), x, m["epoch"])
        elif key != "epoch" and value is not None:
            writer.add_scalar(key, value, m["epoch"])
    for tag, c in hooks.distributions().items():
        for name, value in (("mean", c.mean()), ("std", c.std(correction=0)), ("min", c.min()), ("max", c.max())):
            writer.add_scalar(f"{tag}/{name}", float(value), m["epoch"])
        writer.add_histogram(tag, c, m["epoch"])
    writer.flush()


def _results(cfg, task, metrics, counts, precision, device, dist_info, out, start_time) -> dict:
    key = f"{task.eval_name}_top1"
    last = metrics[-1][key]
    results = {
        "dataset": task.name, "method": cfg.method, "seed": cfg.seed, "eval_split": task.eval_name,
        "top1": last, key: last,
    }
    if task.eval_name != "test":
        results[f"best_{key}"] = max(m[key] for m in metrics if m[key] is not None)
    results.update({
        "protocol": PROTOCOL,
        "epochs": cfg.epochs,
        "params": {k: int(v) for k, v in counts.items()},
        "train_images_per_s": sum(m["images_per_s"] for m in metrics) / len(metrics),
        "wall_time_s": time.time() - start_time,
        "precision": precision, "device": str(device), "world_size": dist_info.world_size,
        "out": str(out), "classes": task.classes,
        **({"skipped_images": task.skipped} if task.skipped else {}),
    })
    return results


def _summary(r: dict) -> str:
    split = r["eval_split"]
    return (f"{r['dataset']} / {r['method']} (seed {r['seed']}): {split} top-1 {100 * r['top1']:.2f}% after the last "
            f"epoch | {r['params']['trainable']:,} trainable params | {r['wall_time_s']:.0f} s, "
            f"{r['train_images_per_s']:.0f} img/s | {r['out']}")
