"""Hardware <-> physics unit conversions (MML's hw2physics / physics2hw).

A calibration maps a hardware value (A, Hz, V) to a physics value (rad, m^-2, m^-3, ...) at a reference beam
energy. Magnet strengths scale as 1/Brho, so at another energy the physics value is multiplied by
``reference_energy / energy``.
"""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Calibration", "Limits", "LimitError"]


class LimitError(ValueError):
    """A setpoint past its limit, refused before anything moved."""


class Limits(BaseModel):
    """Hardware limits of a setpoint: ``[low, high]`` in hardware units."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float = -np.inf
    high: float = np.inf

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, v):
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"limits must be [low, high], got {list(v)}")
            v = {"low": v[0], "high": v[1]}
        if isinstance(v, dict):  # given limits are finite numbers: a NaN would switch the limit off
            v = dict(v)
            for k in ("low", "high"):
                if k not in v:
                    continue
                x = v[k]
                if isinstance(x, str):  # YAML 1.1 reads 352.15e6 (no exponent sign) as a string
                    try:
                        x = v[k] = float(x)
                    except ValueError:
                        raise ValueError(f"limits.{k} must be a number in hardware units, got {x!r}") from None
                if isinstance(x, bool) or not isinstance(x, numbers.Real):
                    raise ValueError(f"limits.{k} must be a number in hardware units, got {x!r}")
                if not np.isfinite(x):
                    raise ValueError(f"limits.{k} must be a finite number, got {x!r} (omit the limit instead of "
                                     "giving .nan or .inf)")
        return v

    @model_validator(mode="after")
    def _ordered(self):
        if np.isnan(self.low) or np.isnan(self.high):
            raise ValueError(f"limits must be numbers, got [{self.low}, {self.high}]")
        if not self.low < self.high:
            raise ValueError(f"limits must have low < high, got [{self.low}, {self.high}]")
        return self

    def check(self, device: str, value, units: str = "", names=None) -> None:
        """Raise :class:`LimitError` naming the device, the value and the limit if ``value`` is outside.

        For an array of setpoints (a family), ``names`` (one per value) lets the message name the first offender;
        without them it gives its index in the family (1-based, as the device names)."""
        if isinstance(value, float) and self.low <= value <= self.high:  # one setpoint within (NaN compares False)
            return
        v = np.asarray(value, dtype=float)
        bad = ~np.isfinite(v) | (v < self.low) | (v > self.high)
        if not np.any(bad):
            return
        where = device
        if v.ndim:
            i = int(np.flatnonzero(bad)[0])
            n = int(np.count_nonzero(bad))
            who = names[i] if names is not None and i < len(names) else f"#{i + 1}"
            where = f"{device} {who}" + (f" (and {n - 1} more)" if n > 1 else "")
            worst = float(v.flat[i])
        else:
            worst = float(v)
        if not np.isfinite(worst):
            raise LimitError(f"{where}: setpoint {worst!r} is not a finite number; nothing was changed")
        raise LimitError(
            f"{where}: setpoint {worst:g} {units} is outside the limits [{self.low:g}, {self.high:g}] {units}; "
            "nothing was changed. Use a smaller step or check the profile's limits."
        )


class Calibration(BaseModel):
    """Hardware -> physics conversion of one family.

    Exactly one of:

    - ``linear: c``: physics = c * hw
    - ``poly: [c0, c1, c2, ...]``: physics = c0 + c1 hw + c2 hw^2 + ... (monotonic over the limits)
    - ``table: {hw: [...], physics: [...]}``: piecewise-linear interpolation (monotonic)

    ``reference_energy`` [eV] is the energy at which the table holds (default: the profile's energy).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    linear: float | None = None
    poly: list[float] | None = None
    table: dict[Literal["hw", "physics"], list[float]] | None = None
    reference_energy: float | None = Field(default=None, gt=0)
    physics_units: str = ""
    hardware_units: str = "A"

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("linear", "poly", "table") if getattr(self, k) is not None]
        if len(kinds) == 0:
            object.__setattr__(self, "linear", 1.0)
        elif len(kinds) > 1:
            raise ValueError(f"a calibration has exactly one of linear, poly, table; got {kinds}")
        if self.linear is not None and self.linear == 0:
            raise ValueError("a linear calibration factor cannot be 0")
        if self.poly is not None and (len(self.poly) < 2 or all(c == 0 for c in self.poly[1:])):
            raise ValueError("a poly calibration needs at least [c0, c1] with a non-zero slope")
        if self.table is not None:
            hw, ph = self.table.get("hw"), self.table.get("physics")
            if hw is None or ph is None or len(hw) != len(ph) or len(hw) < 2:
                raise ValueError("a table calibration needs hw and physics lists of the same length >= 2")
            if np.any(np.diff(hw) <= 0):
                raise ValueError("table.hw must be strictly increasing")
            d = np.diff(ph)
            if not (np.all(d > 0) or np.all(d < 0)):
                raise ValueError("table.physics must be strictly monotonic")
        return self

    @property
    def kind(self) -> str:
        return "linear" if self.linear is not None else ("poly" if self.poly is not None else "table")

    def _scale(self, energy: float | None, default_energy: float | None) -> float:
        ref = self.reference_energy or default_energy
        if energy is None or ref is None:
            return 1.0
        return ref / energy

    def hw2physics(self, hw, energy: float | None = None, default_energy: float | None = None):
        """Physics value of hardware value(s) ``hw`` at beam ``energy`` [eV]."""
        x = np.asarray(hw, dtype=float)
        if self.linear is not None:
            y = self.linear * x
        elif self.poly is not None:
            y = np.polynomial.polynomial.polyval(x, self.poly)
        else:
            y = np.interp(x, self.table["hw"], self.table["physics"], left=np.nan, right=np.nan)
            y = np.where(np.isnan(y), self._extrapolate(x, "hw", "physics"), y)
        y = y * self._scale(energy, default_energy)
        return float(y) if np.ndim(y) == 0 else y

    def physics2hw(self, physics, energy: float | None = None, default_energy: float | None = None):
        """Hardware value of physics value(s) at beam ``energy`` [eV] (inverse of :meth:`hw2physics`)."""
        y = np.asarray(physics, dtype=float) / self._scale(energy, default_energy)
        if self.linear is not None:
            x = y / self.linear
        elif self.poly is not None:
            x = self._poly_inverse(y)
        else:
            hw, ph = np.asarray(self.table["hw"]), np.asarray(self.table["physics"])
            if ph[0] > ph[-1]:
                hw, ph = hw[::-1], ph[::-1]
            x = np.interp(y, ph, hw, left=np.nan, right=np.nan)
            x = np.where(np.isnan(x), self._extrapolate(y, "physics", "hw"), x)
        return float(x) if np.ndim(x) == 0 else x

    def _extrapolate(self, x, src: str, dst: str):
        a, b = np.asarray(self.table[src]), np.asarray(self.table[dst])
        if a[0] > a[-1]:
            a, b = a[::-1], b[::-1]
        lo = b[0] + (x - a[0]) * (b[1] - b[0]) / (a[1] - a[0])
        hi = b[-1] + (x - a[-1]) * (b[-1] - b[-2]) / (a[-1] - a[-2])
        return np.where(x < a[0], lo, hi)

    def _poly_inverse(self, y):
        c = np.asarray(self.poly, dtype=float)
        x = (y - c[0]) / c[1]  # linear guess, then Newton
        dc = np.polynomial.polynomial.polyder(c)
        for _ in range(50):
            f = np.polynomial.polynomial.polyval(x, c) - y
            step = f / np.polynomial.polynomial.polyval(x, dc)
            x = x - step
            if np.all(np.abs(step) <= 1e-14 * (1 + np.abs(x))):
                break
        return x

    def slope(self, hw=0.0, energy: float | None = None, default_energy: float | None = None):
        """d(physics)/d(hw) at ``hw``: the factor that turns a hardware step into a physics step."""
        h = 1e-6 * max(1.0, float(np.max(np.abs(hw))) if np.size(hw) else 1.0)
        return (self.hw2physics(np.asarray(hw) + h, energy, default_energy)
                - self.hw2physics(np.asarray(hw) - h, energy, default_energy)) / (2 * h)
