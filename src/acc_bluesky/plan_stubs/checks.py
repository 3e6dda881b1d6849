"""Checks of tool parameters at the call (and so at queue submission): exact types, finite numbers, bounds.

Every tool plan's parameters are checked by the scaffold before anything else happens, from their annotations
(an ``int`` is an int: 2.7 is refused, not truncated; a ``float`` is a finite number; a ``bool`` is a bool) and,
for the parameters that count things, from :data:`BOUNDS`: the same table the queue server's parameter
annotations are generated from. Upper bounds come from the profile (``tools.limits``), with the defaults below::

    tools:
      limits: {max_average: 100, max_steps: 51, max_iterations: 20, max_count: 10000, max_turns: 100000,
               max_settle: 60.0}
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BOUNDS", "DEFAULT_LIMITS", "Bound", "ParameterError", "bound_of", "check_parameters", "limits_of"]


class ParameterError(ValueError):
    """A tool parameter of the wrong type or out of range: nothing was moved, no run was recorded."""


#: Upper bounds of counting parameters, overridable per profile in ``tools.limits``.
DEFAULT_LIMITS: dict[str, float] = {"max_average": 100, "max_steps": 51, "max_iterations": 20,
                                    "max_count": 10000, "max_turns": 100000, "max_settle": 60.0,
                                    "max_delay": 3600.0}


@dataclass(frozen=True)
class Bound:
    """Range of a parameter: ``low`` (inclusive unless ``open_low``), ``high`` (a number or a ``tools.limits``
    key), what it means."""

    low: float | None = None
    high: float | str | None = None
    meaning: str = ""
    open_low: bool = False


#: Bounds of parameters by name (the same name means the same thing in every tool).
BOUNDS: dict[str, Bound] = {
    "n_avg": Bound(1, "max_average", "readings averaged per point"),
    "n_steps": Bound(1, "max_steps", "steps on each side"),
    "steps": Bound(3, "max_steps", "scan points"),
    "max_iter": Bound(1, "max_iterations", "iterations at most"),
    "num": Bound(1, "max_count", "number of readings"),
    "turns": Bound(1, "max_turns", "turns"),
    "settle": Bound(0, "max_settle", "wait after each move [s]"),
    "delay": Bound(0, "max_delay", "time between readings [s]"),
    "gain": Bound(0, 1, "fraction of the correction applied", open_low=True),
    "tol": Bound(0, None, "convergence threshold", open_low=True),
    "tikhonov": Bound(0, None, "Tikhonov regularisation"),
    "max_step": Bound(0, None, "largest move per iteration [A]", open_low=True),
    "min_improvement": Bound(0, 0.99, "least improvement per iteration"),
    "n_sv": Bound(1, None, "number of singular values"),
    "fraction": Bound(0, 1, "fraction of the correction applied", open_low=True),
    "dp_max": Bound(0, 0.05, "largest momentum deviation of the scan", open_low=True),
    "order": Bound(1, 3, "polynomial order of the fit"),
    "n_correctors": Bound(3, 4, "correctors of the bump"),
    # beam-based alignment (bba engineer)
    "dk": Bound(0, 0.2, "relative quadrupole step", open_low=True),
    "block_size": Bound(1, 64, "quadrupoles per block"),
    "max_distance": Bound(0, None, "largest BPM-quadrupole distance [m]", open_low=True),
}


def limits_of(profile) -> dict[str, float]:
    """``DEFAULT_LIMITS`` with the profile's ``tools.limits`` over them."""
    out = dict(DEFAULT_LIMITS)
    if profile is not None:
        out.update({k: float(v) for k, v in profile.tool_defaults("limits").items()})
    return out


def bound_of(name: str, profile=None) -> tuple[float | None, float | None, bool] | None:
    """``(low, high, open_low)`` of parameter ``name`` with the profile's limits, or None if unbounded."""
    b = BOUNDS.get(name)
    if b is None:
        return None
    high = limits_of(profile)[b.high] if isinstance(b.high, str) else b.high
    return b.low, high, b.open_low


def _kinds(annotation: Any) -> tuple[set[type], bool]:
    """The scalar types an annotation admits (int, float, bool, str) and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        none = False
        for a in typing.get_args(annotation):
            if a is type(None):
                none = True
            else:
                k, n = _kinds(a)
                kinds |= k
                none |= n
        return kinds, none
    if annotation in (int, float, bool, str):
        return {annotation}, False
    if annotation is type(None):
        return set(), True
    return {object}, False  # sequences, mappings, Any, devices: checked by the tool itself


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_scalar(plan: str, name: str, value: Any, kinds: set[type]) -> None:
    if float in kinds and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
            and not math.isfinite(float(value)):
        raise ParameterError(f"{plan}: {name} must be a finite number, got {value!r}; nothing was moved")
    if object in kinds:
        return
    if bool in kinds and isinstance(value, (bool, np.bool_)):
        return
    if int in kinds and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return
    if float in kinds and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        if not math.isfinite(float(value)):
            raise ParameterError(f"{plan}: {name} must be a finite number, got {value!r}; nothing was moved")
        return
    if str in kinds and isinstance(value, str):
        return
    words = {int: "an integer", float: "a number", bool: "a bool (True or False)", str: "a string"}
    want = " or ".join(sorted({words.get(k, k.__name__) for k in kinds}))
    hint = " (no silent truncation: give a whole number)" if int in kinds and isinstance(value, numbers.Real) \
        and float not in kinds else ""
    raise ParameterError(f"{plan}: {name} must be {want}, got {_describe(value)}{hint}; nothing was moved")


def _check_bound(plan: str, name: str, value: Any, profile) -> None:
    rng = bound_of(name, profile)
    if rng is None or not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    low, high, open_low = rng
    v = float(value)
    bad_low = low is not None and (v <= low if open_low else v < low)
    bad_high = high is not None and v > high
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        where = f" (profile tools.limits.{BOUNDS[name].high})" if isinstance(BOUNDS[name].high, str) else ""
        raise ParameterError(f"{plan}: {name} ({BOUNDS[name].meaning}) must be {' and '.join(x for x in (lo, hi) if x)}"
                             f"{where}, got {value!r}; nothing was moved")


def check_parameters(plan: str, hints: Mapping[str, Any], arguments: Mapping[str, Any], profile=None) -> None:
    """Raise :class:`ParameterError` for the first parameter of the wrong type or out of its bounds."""
    for name, value in arguments.items():
        if name in ("machine", "md") or name not in hints:
            continue
        kinds, none_ok = _kinds(hints[name])
        if value is None:
            if not none_ok and object not in kinds and name in BOUNDS:
                raise ParameterError(f"{plan}: {name} must be given (got None); nothing was moved")
            continue
        _check_scalar(plan, name, value, kinds)
        _check_bound(plan, name, value, profile)
        if isinstance(value, Sequence) and not isinstance(value, str) and kinds == {object}:
            for v in value:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ParameterError(f"{plan}: {name} holds a non-finite number ({v!r}); nothing was moved")
