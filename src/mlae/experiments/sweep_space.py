"""The search space of a sweep: which settings are searched, over which values or ranges (``--param``,
``--space``), with the MLAE paper's 6 × 6 grid as the default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..recipes import RecipeError, get_method, parse_setting, read_yaml, setting_parser

__all__ = ["Param", "DEFAULT_SPACE", "DEFAULT_RANGES", "parse_param", "load_space", "build_space"]

# The MLAE paper's search grid (expert dropout p × coefficient init).
DEFAULT_SPACE = {"dropout": (0.0, 0.1, 0.3, 0.5, 0.7, 0.9), "coeff_init": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)}
# TPE's default: the same box, continuous.
DEFAULT_RANGES = {"dropout": "0:0.9", "coeff_init": "0.125:4:log"}
NOT_SEARCHABLE = {"dataset", "method", "method_options", "out", "runs_dir", "split", "resume", "overwrite",
                  "progress", "device", "threads", "data_root", "cache"}


@dataclass(frozen=True)
class Param:
    """One searched setting: discrete ``values``, or a range ``low..high`` (log-scaled, or integer)."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if self.values is not None:  # a value listed twice would train its grid points twice
            seen = [repr(v) for v in self.values]  # converted already: 0 and 0.0 are both 0.0 here
            twice = sorted({s for s in seen if seen.count(s) > 1})
            if twice:
                raise RecipeError(f"{self.name}: {', '.join(twice)} listed twice; list each value once")

    def suggest(self, trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> Any:
        if self.values is not None:
            return list(self.values)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "") + (":int" if self.integer else "")


def _converter(name: str, method: str):
    from ..engine import TrainConfig

    options = {o.name: o for o in get_method(method).options}
    if name in options:
        return options[name].type
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_SEARCHABLE
    if name not in fields:
        raise RecipeError(f"cannot search {name!r}: not an option of method {method!r} nor a training setting "
                          f"(choose from {', '.join(sorted(options) + sorted(fields))})")
    return setting_parser(name)


def parse_param(text: str, method: str) -> Param:
    """``dropout=0,0.5`` (values), ``coeff_init=0.25:4:log`` (log range), ``lr=1e-4:1e-2:log``, ``rank=2:16:int``."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not spec.strip():
        raise RecipeError(f"--param takes NAME=V1,V2,... or NAME=LOW:HIGH[:log][:int], not {text!r}")
    return _param(name, spec.strip(), method)


def _param(name: str, spec: Any, method: str) -> Param:
    convert = _converter(name, method)
    if isinstance(spec, dict):
        return Param(name, low=parse_setting(name, float, spec["low"]), high=parse_setting(name, float, spec["high"]),
                     log=bool(spec.get("log", False)),
                     integer=bool(spec.get("int", False)))
    if isinstance(spec, (list, tuple)):
        return Param(name, values=tuple(v if isinstance(v, (list, bool)) else parse_setting(name, convert, str(v))
                                        for v in spec))
    spec = str(spec)
    if ":" in spec:
        low, high, *flags = spec.split(":")
        if set(flags) - {"log", "int"}:
            raise RecipeError(f"{name}={spec}: a range is LOW:HIGH[:log][:int]")
        p = Param(name, low=parse_setting(name, float, low), high=parse_setting(name, float, high), log="log" in flags,
                  integer="int" in flags)
        if not p.low < p.high or (p.log and p.low <= 0):
            raise RecipeError(f"{name}={spec}: need LOW < HIGH (and LOW > 0 for :log)")
        return p
    return Param(name, values=tuple(parse_setting(name, convert, v.strip()) for v in spec.split(",") if v.strip()))


def load_space(path: str, method: str) -> list[Param]:
    """A YAML mapping ``name: [values]`` or ``name: "low:high[:log]"`` or ``name: {low:, high:, log:, int:}``."""
    data = read_yaml(path, "search space", "--space")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the search space must map setting names to values or ranges")
    return [_param(str(k).replace("-", "_"), v, method) for k, v in data.items()]


def build_space(method: str, sampler: str = "grid", space: str | None = None,
                params: Sequence[str] = ()) -> list[Param]:
    """The searched settings: the ``space`` file's, then the ``params`` (``NAME=SPEC``) over them; with neither, the
    paper's grid (``sampler="grid"``) or the same box as ranges (``"tpe"``)."""
    found: dict[str, Param] = {}
    if space:
        found.update((p.name, p) for p in load_space(space, method))
    given: set[str] = set()
    for text in params or []:
        p = parse_param(text, method)
        if p.name in given:  # the later one would silently replace the earlier
            raise RecipeError(f"--param {p.name} given twice; list all its values in one --param "
                              f"({p.name}=A,B,C)")
        given.add(p.name)
        found[p.name] = p  # over the --space file's
    if not found:
        if method != "mlae":  # the default space is MLAE's p and c_i: another method names what it searches
            raise RecipeError(f"with no --param or --space the sweep searches MLAE's dropout and coeff_init; for "
                              f"--method {method} name what to search, e.g. --param lr=1e-4,5e-4,2e-3")
        if sampler == "grid":
            found = {k: _param(k, list(v), method) for k, v in DEFAULT_SPACE.items()}
        else:
            found = {k: _param(k, v, method) for k, v in DEFAULT_RANGES.items()}
    if sampler == "grid":
        ranges = [p.name for p in found.values() if p.values is None]
        if ranges:
            raise RecipeError(f"--sampler grid needs lists of values, not ranges ({', '.join(ranges)}); "
                              "use --sampler tpe for ranges")
    return list(found.values())
