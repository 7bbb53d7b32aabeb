"""Ablation presets: the MLAE paper's ablation tables as lists of labelled method variants.

A preset is data: each variant (a :class:`~mlae.experiments.variants.Variant`) is a labelled method of
:data:`mlae.recipes.METHODS` plus option overrides, written for ``mlae compare`` as
``LABEL=method[key=value,...]``. :func:`run_ablation` (``mlae analyze ablation PRESET``) runs a preset through
:func:`mlae.experiments.compare.compare`; :func:`compare_argv` is the same comparison as a command line.

=============== ============================ ================================================================
preset          paper                        variants
=============== ============================ ================================================================
components      Table 5                      decomposition only (p=0, frozen c), + adaptive, + mask, + mask +
                                             adaptive (= MLAE), LoRA r=8 as reference
masking         Table 4                      fixed / stochastic / mixed masking × the per-layer patterns
rank            Table 12                     E experts of rank k at constant E·k = 8: 8×1, 4×2, 2×4; LoRA r=8
coeff-init      Table 14                     coefficient init 0.125 … 4
dropout         Table 15                     expert dropout p ∈ {0, .1, .3, .5, .7, .9}
input-dropout   Fig. 4 / §4.3 (LoRA+Dropout) expert masking vs LoRA input dropout vs none, all at rank 8
=============== ============================ ================================================================

Presets that need one masking probability use ``p`` (default 0.5, the paper's best average in Table 15; its
per-dataset values are in Table 10 / ``configs/``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .variants import Variant, parse_methods

__all__ = ["Preset", "PRESETS", "DEFAULT_P", "preset", "method_spec", "methods_text", "compare_argv",
           "format_presets", "run_ablation"]

DEFAULT_P = 0.5
BUDGET = 8  # E·k of every MLAE variant and the LoRA rank of the references: one trainable budget throughout


@dataclass(frozen=True)
class Preset:
    name: str
    paper: str
    help: str
    variants: tuple[Variant, ...]


def method_spec(v: Variant) -> str:
    """``method[key=value,...]``: a variant as ``mlae compare --methods`` writes it (without its label)."""
    if not v.overrides:
        return v.method
    return f"{v.method}[{','.join(f'{k}={_text(val)}' for k, val in v.overrides.items())}]"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _lora(label: str = "lora r8", **options) -> Variant:
    return Variant(label, "lora", {"rank": BUDGET, "alpha": float(BUDGET), **options})


def _mlae(label: str, **options) -> Variant:
    return Variant(label, "mlae", options)


def _components(p: float) -> tuple[Variant, ...]:
    return (
        _mlae("decomposition", dropout=0.0, adaptive=False),
        _mlae("decomposition + adaptive", dropout=0.0, adaptive=True),
        _mlae("decomposition + mask", dropout=p, adaptive=False),
        _mlae("decomposition + mask + adaptive (MLAE)", dropout=p, adaptive=True),
        _lora(),
    )


# Paper Table 4 (appendix A.5): stochastic uniform is MLAE itself; random exists for expert counts only.
_FIXED = ("incremental", "hourglass", "decremental", "protruding", "random")
_STOCHASTIC = ("incremental", "hourglass", "decremental", "protruding", "uniform")


def _masking(p: float) -> tuple[Variant, ...]:
    fixed = [_mlae(f"fixed {pat}", masking="fixed", pattern=pat, dropout=0.0) for pat in _FIXED]
    # The stochastic patterns are per-layer dropout rates (appendix A.5); only "uniform" reads p.
    stochastic = [_mlae(f"stochastic {pat}", masking="stochastic", pattern=pat,
                        **({"dropout": p} if pat == "uniform" else {})) for pat in _STOCHASTIC]
    mixed = [_mlae(f"mixed {pat}", masking="mixed", pattern=pat, dropout=p) for pat in _FIXED]
    return (*fixed, *stochastic, *mixed)


def _rank(p: float) -> tuple[Variant, ...]:
    return (*(_mlae(f"{BUDGET // k}x rank {k}", experts=BUDGET // k, expert_rank=k, dropout=p) for k in (1, 2, 4)),
            _lora())


def _coeff_init(p: float) -> tuple[Variant, ...]:
    return tuple(_mlae(f"coeff {_text(c)}", coeff_init=c, dropout=p) for c in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0))


def _dropout(p: float) -> tuple[Variant, ...]:
    return tuple(_mlae(f"p {_text(q)}", dropout=q) for q in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9))


def _input_dropout(p: float) -> tuple[Variant, ...]:
    return (
        _mlae(f"MLAE expert masking p {_text(p)}", dropout=p),
        Variant(f"LoRA input dropout p {_text(p)}", "lora-dropout",
                {"rank": BUDGET, "alpha": float(BUDGET), "lora_dropout": p}),
        _mlae("MLAE no masking", dropout=0.0),
        _lora("LoRA no dropout"),
    )


_BUILDERS = {
    "components": ("Table 5", "key components: cellular decomposition, expert masking, adaptive coefficients",
                   _components),
    "masking": ("Table 4", "fixed, stochastic and mixed masking with the per-layer patterns of appendix A.5",
                _masking),
    "rank": ("Table 12", f"experts × expert rank at a constant budget E·k = {BUDGET}, LoRA r={BUDGET} as reference",
             _rank),
    "coeff-init": ("Table 14", "initial value of the expert coefficients", _coeff_init),
    "dropout": ("Table 15", "expert-level masking probability p (uniform over layers)", _dropout),
    "input-dropout": ("§4.3, Fig. 4", "expert masking vs LoRA's input dropout vs no dropout, same budget",
                      _input_dropout),
}
PRESETS = tuple(_BUILDERS)


def preset(name: str, p: float = DEFAULT_P) -> Preset:
    """The preset ``name``; ``p`` is the masking probability of the variants that need one."""
    if name not in _BUILDERS:
        raise InputError(f"unknown ablation preset {name!r}; choose from {', '.join(PRESETS)}")
    if not 0 <= p < 1:
        raise InputError(f"p must be in [0, 1), got {p}")
    paper, help_text, build = _BUILDERS[name]
    return Preset(name, paper, help_text, build(float(p)))


def methods_text(preset_: Preset) -> str:
    """Every variant of ``preset_`` as ``mlae compare --methods`` takes them: ``LABEL=METHOD[...],...``."""
    return ",".join(f"{v.label}={method_spec(v)}" for v in preset_.variants)


def compare_argv(preset_: Preset, datasets: list[str], seeds: list[int], out: str,
                 extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``mlae compare`` command line running every variant of ``preset_`` (labelled ``LABEL=METHOD[...]``) on
    ``datasets`` × ``seeds``; ``extra`` are further compare/train options (e.g. ``["--epochs", "20"]``)."""
    return ["compare", "--methods", methods_text(preset_),
            "--datasets", ",".join(datasets), "--seeds", ",".join(str(s) for s in seeds),
            "--out", str(out), *extra]


def format_presets(p: float = DEFAULT_P) -> str:
    """Every preset with its variants, for ``mlae analyze ablation --list``."""
    lines = []
    for name in PRESETS:
        pr = preset(name, p)
        lines.append(f"{name} ({pr.paper}): {pr.help}")
        width = max(len(v.label) for v in pr.variants)
        lines += [f"  {v.label:<{width}}  {method_spec(v)}" for v in pr.variants]
    return "\n".join(lines)


def run_ablation(name: str, datasets: str | list[str], seeds: str | list[int], out: str | Path, *,
                 p: float = DEFAULT_P, options: dict[str, Any] | None = None, config: str | None = None,
                 jobs: int | None = None):
    """Run preset ``name`` as a comparison (see :func:`mlae.experiments.compare.compare` for ``options``,
    ``config`` and ``jobs``): the same runs, folders and tables as ``mlae compare`` with :func:`compare_argv`'s
    command line. Returns the :class:`~mlae.experiments.compare.Comparison`."""
    from .compare import compare

    # The variants go through their --methods text, as on compare's command line: the same labels and values.
    variants = parse_methods(methods_text(preset(name, p)))
    return compare(variants, datasets, seeds, out, options=options, config=config, jobs=jobs)
