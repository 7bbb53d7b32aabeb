"""Method variants: a method plus option overrides, written ``LABEL=METHOD[opt=value,...]``; each is a column of a
comparison (``mlae compare --methods``) and the unit of the ablation presets."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..recipes import RecipeError, get_method, parse_setting, setting_parser

__all__ = ["Variant", "parse_methods", "parse_seeds"]


@dataclass(frozen=True)
class Variant:
    """A column of the comparison: a method and option overrides (method options or TrainConfig fields)."""

    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label.replace("[", "_").replace("]", "")).strip("_")


_VARIANT = re.compile(r"^\s*(?:(?P<label>[^=\[\]]+?)\s*=\s*)?(?P<method>[\w.-]+)\s*(?:\[(?P<opts>.*)\])?\s*$")
# What a variant may not override: the grid's own axes and the run folder's bookkeeping.
_FIXED = ("dataset", "method", "seed", "out", "resume", "overwrite")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise RecipeError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise RecipeError(f"unbalanced '[' in {text!r}")
    return [p.strip() for p in parts + [cur] if p.strip()]


def _parse_value(method_name: str, key: str, text: str) -> Any:
    from ..engine import TrainConfig

    options = {o.name: o for o in get_method(method_name).options}
    if key in options:
        opt = options[key]
        if opt.nargs:
            return [parse_setting(key, opt.type, v) for v in re.split(r"[\s|]+", text) if v]
        value = parse_setting(key, opt.type, text)
        if opt.choices and value not in opt.choices:
            raise RecipeError(f"{method_name}[{key}={text}]: choose from {', '.join(map(str, opt.choices))}")
        return value
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields or key in _FIXED:
        known = sorted(options) + sorted(set(fields) - {*_FIXED, "method_options"})
        raise RecipeError(f"{method_name}[{key}=...]: {method_name!r} has no option {key!r}; known: "
                          f"{', '.join(known)}")
    return parse_setting(key, setting_parser(key), text)


def parse_methods(text: str) -> list[Variant]:
    """``"mlae,mlae[dropout=0,coeff_init=2],nomask=mlae[dropout=0]"`` -> variants (labels unique)."""
    variants = []
    for item in _split_top(text):
        m = _VARIANT.match(item)
        if not m:
            raise RecipeError(f"cannot parse method {item!r}: expected METHOD, METHOD[opt=value,...] or "
                              "LABEL=METHOD[...]")
        method = get_method(m["method"]).name
        overrides: dict[str, Any] = {}
        raw = []
        if m["opts"] is not None:
            for pair in (p for p in re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", m["opts"]) if p.strip()):
                key, sep, value = pair.partition("=")
                key = key.strip().replace("-", "_")
                if not sep or not key:
                    raise RecipeError(f"{item!r}: expected opt=value inside the brackets, got {pair!r}")
                overrides[key] = _parse_value(method, key, value.strip())
                raw.append(f"{key}={value.strip()}")
        label = (m["label"] or "").strip() or (method + (f"[{','.join(raw)}]" if raw else ""))
        variants.append(Variant(label, method, overrides))
    labels = [v.label for v in variants]
    slugs = [v.slug for v in variants]
    if len(set(labels)) != len(labels) or len(set(slugs)) != len(slugs):
        raise RecipeError(f"method labels must be unique (and distinct as folder names): {', '.join(labels)}")
    if not variants:
        raise RecipeError("--methods is empty")
    return variants


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds takes comma-separated integers, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds must list distinct integers, got {text!r}")
    return seeds
