"""Magnets and magnet families: ophyd-async movables in hardware units, settable in physics units too.

``m.hcor[3]`` is a :class:`Corrector`: ``bps.mv(m.hcor[3], 0.2)`` moves its setpoint to 0.2 A;
``bps.mv(m.hcor[3].strength, 1e-5)`` moves it to the setpoint that gives 1e-5 rad (the profile's calibration at the
beam energy, MML's ``setsp(..., 'Physics')``). A value past the limits is refused before anything moves. A family
(``m.hcor``, ``m.quad["QF2"]``) is readable and movable as arrays in both units (``setpoints`` [A],
``strengths`` [rad, m^-2, ...]).
"""

from __future__ import annotations

import asyncio
import dataclasses
from functools import cached_property
from typing import Any

import numpy as np
from ophyd_async.core import (
    Array1D,
    AsyncStatus,
    DerivedSignalFactory,
    MovableLogic,
    StandardMovable,
    Transform,
)

from ..profile import Family
from .described import Described, formats
from .vector import NamedVector

__all__ = ["Magnet", "Corrector", "MagnetFamily"]

FloatArray = Array1D[np.float64]

# Calibrations of the strength signals, by key: one Transform class for every magnet (a class per magnet, as
# ``derived_signal_rw`` makes, costs a pydantic model each: 1 s for the 900 magnets of EBS).
_CALIBRATIONS: dict[str, tuple[Any, float]] = {}


def _calibration_key(calibration, energy: float) -> str:
    key = f"{id(calibration)}:{energy!r}"
    _CALIBRATIONS[key] = (calibration, float(energy))
    return key


class _Strength(Transform):
    """A magnet's strength [physics units] from its setpoint [A] through the profile's calibration."""

    calibration: str

    def raw_to_derived(self, *, setpoint: float) -> dict[str, float]:
        cal, e = _CALIBRATIONS[self.calibration]
        return {"strength": float(cal.hw2physics(setpoint, e, e))}


class _Strengths(Transform):
    """A family's strengths from its setpoints."""

    calibration: str

    def raw_to_derived(self, *, setpoints: FloatArray) -> dict[str, FloatArray]:
        cal, e = _CALIBRATIONS[self.calibration]
        return {"strengths": np.asarray(cal.hw2physics(np.asarray(setpoints, dtype=float), e, e), dtype=float)}


@dataclasses.dataclass
class _MagnetLogic(MovableLogic[float]):
    """How a power supply moves: limits checked, the setpoint put, and (ramped supplies only) the readback
    followed until it is within ``tolerance`` of the target."""

    magnet: Any = None

    async def check_move(self, new_position: float) -> None:
        m = self.magnet
        m.limits.check(m.name or m.device_name, new_position, m.units)

    async def get_units_precision(self) -> tuple[str | None, int | None]:
        return self.magnet.units, 6

    async def calculate_timeout(self, old_position: float, new_position: float) -> float | None:
        rate = self.magnet.ramp_rate
        if not rate:
            return None
        return abs(float(new_position) - float(old_position)) / rate + 10.0

    async def move(self, new_position: float, timeout) -> None:
        m = self.magnet
        await m._put(float(new_position))
        if not m.ramp_rate:
            return
        # a ramped supply: the move completes when the readback arrives (progress bars follow it)
        tol = m.tolerance
        period = min(0.05, max(tol / m.ramp_rate, 0.005))
        while abs(float(await self.readback.get_value()) - float(new_position)) > tol:
            left = timeout()
            if left is not None and left <= 0:
                rb = float(await self.readback.get_value())
                raise TimeoutError(f"{m.name}: readback {rb:g} {m.units} did not reach the setpoint "
                                   f"{float(new_position):g} {m.units} (ramp {m.ramp_rate:g} {m.units}/s)")
            await asyncio.sleep(period)

    async def stop(self) -> None:
        """Hold the supply where it is: the setpoint goes to the present readback."""
        if self.magnet.ramp_rate:
            await self.magnet._put(float(await self.readback.get_value()))


class Magnet(Described, StandardMovable[float]):
    """One magnet power supply: ``setpoint`` and ``readback`` [A], ``strength`` (the setpoint in physics units).

    ``set(value)`` moves the setpoint to ``value`` [A] (limits checked first; a watchable status: progress bars
    follow the readback of ramped supplies); ``strength.set(k)`` moves it to the setpoint of strength ``k``
    (rad, m^-2, m^-3 ... at the beam energy). Read, it gives the readback (named as the device), the setpoint
    and the strength. ``s`` [m] and ``refpt`` (lattice index) say where it is.
    """

    def __init__(self, backend, family: Family, index: int, energy: float, s: float = float("nan"),
                 name: str = "") -> None:
        spec = family.spec
        self.family_name = family.name
        self.index = index
        self.device_name = family.device_names[index]
        self.element_name = family.element_names[index]
        self.refpt = int(family.refpts[index])
        self.s = float(s)
        self.calibration = spec.calibration
        self.limits = spec.limits
        self.units = spec.units
        self.physics_units = spec.physics_units or spec.calibration.physics_units
        self.ramp_rate = spec.ramp_rate
        span = spec.limits.high - spec.limits.low
        self.tolerance = 1e-6 * span if np.isfinite(span) and span > 0 else 1e-6
        self.energy = energy
        self.in_service = index not in family.bad
        hinted, plain = formats(backend)
        with self.add_children_as_readables(hinted):
            self.readback = backend.magnet_readback(family.name, index)
        with self.add_children_as_readables(plain):
            self.setpoint = backend.magnet_setpoint(family.name, index)
        self._put = backend.magnet_put(family.name, index, self.setpoint)
        self.local_puts = bool(getattr(backend, "local_puts", False))  # the twin: no network between put and done

        async def set_strength(value: float) -> None:
            await self.set(self.to_hw(value))

        factory = DerivedSignalFactory(_Strength, set_strength, setpoint=self.setpoint,
                                       calibration=_calibration_key(self.calibration, energy))
        with self.add_children_as_readables(plain):
            self.strength = factory.derived_signal_rw(float, "strength", units=self.physics_units)
        super().__init__(name=name)

    @cached_property
    def movable_logic(self) -> _MagnetLogic:
        return _MagnetLogic(self.setpoint, self.readback, magnet=self)

    def describe_signal(self, child: str) -> str | None:
        what = f"{self.device_name} ({self.element_name}, {self.family_name}, s = {self.s:.3f} m)"
        return {"setpoint": f"power-supply setpoint of {what}",
                "readback": f"power-supply current delivered to {what}",
                "strength": f"field strength of {what}: the setpoint through the calibration, at the beam energy "
                            "(the readback in physics units: to_physics(readback))",
                }.get(child)

    def to_physics(self, hw):
        """Hardware value(s) [A] -> physics (rad, m^-2, ...) at the machine energy."""
        return self.calibration.hw2physics(hw, self.energy, self.energy)

    def to_hw(self, physics):
        """Physics value(s) -> hardware [A] at the machine energy."""
        return self.calibration.physics2hw(physics, self.energy, self.energy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, element={self.element_name!r}, s={self.s:.3f} m)"


class Corrector(Magnet):
    """A steering magnet (or a kick winding): setpoint and readback in A, ``strength`` (kick) in rad.

    ``plane`` is ``"x"`` (hcor families) or ``"y"`` (vcor).
    """

    def __init__(self, backend, family: Family, index: int, energy: float, s: float = float("nan"),
                 name: str = "") -> None:
        self.plane = "x" if family.spec.type == "hcor" else "y"
        super().__init__(backend, family, index, energy, s, name)


class MagnetFamily(NamedVector, Described):
    """A family of magnets: a ``DeviceVector`` of :class:`Magnet` (``fam[i]``, ``fam["QF2_003"]``), readable and
    movable as a whole.

    ``setpoints`` [A] (read-write), ``readbacks`` [A] and ``strengths`` (physics units, read-write) are arrays in
    the order of ``names``; reading the family gives the three. ``set(array)`` moves every setpoint at once (one put,
    one recomputation) after checking every limit; ``strengths.set(array)`` does the same in physics units.
    Attributes ``refpts``, ``s`` [m], ``names``, ``element_names``, ``good`` (in-service mask) come from the profile.
    """

    def __init__(self, backend, family: Family, energy: float, s=None, name: str = "") -> None:
        cls = Corrector if family.spec.type in ("hcor", "vcor") else Magnet
        s = np.full(len(family), np.nan) if s is None else np.asarray(s, dtype=float)
        super().__init__({i: cls(backend, family, i, energy, s=float(s[i])) for i in range(len(family))},
                         family.name, family.device_names)
        self.family_name = family.name
        self.type = family.spec.type
        self.refpts = np.asarray(family.refpts)
        self.s = s
        self.element_names = list(family.element_names)
        self.calibration = family.spec.calibration
        self.limits = family.spec.limits
        self.units = family.spec.units
        self.physics_units = family.spec.physics_units or family.spec.calibration.physics_units
        self.energy = energy
        self.good = family.good
        self.description = family.spec.description
        hinted, plain = formats(backend)
        self.setpoints = backend.family_setpoints(family.name)
        self.readbacks = backend.family_readbacks(family.name)
        self.add_readables([self.setpoints, self.readbacks], plain)
        self._put = backend.family_put(family.name, self.setpoints)

        async def set_strengths(values: FloatArray) -> None:
            await self.set(self.to_hw(np.asarray(values, dtype=float)))

        factory = DerivedSignalFactory(_Strengths, set_strengths, setpoints=self.setpoints,
                                       calibration=_calibration_key(self.calibration, energy))
        with self.add_children_as_readables(plain):
            self.strengths = factory.derived_signal_rw(FloatArray, "strengths", units=self.physics_units)
        self.set_name(name)

    def describe_signal(self, child: str) -> str | None:
        what = f"every magnet of family {self.family_name} ({len(self)} {self.type}), in the order of its names"
        return {"setpoints": f"power-supply setpoints of {what}",
                "readbacks": f"power-supply currents delivered to {what}",
                "strengths": f"field strengths of {what} (setpoints through the calibration, at the beam energy)",
                }.get(child)

    def to_physics(self, hw):
        return self.calibration.hw2physics(hw, self.energy, self.energy)

    def to_hw(self, physics):
        return self.calibration.physics2hw(physics, self.energy, self.energy)

    @AsyncStatus.wrap
    async def set(self, value) -> None:
        """Move all setpoints to ``value`` [A] (array of the family's length); limits checked first."""
        v = np.asarray(value, dtype=float)
        if v.shape != (len(self),):
            raise ValueError(f"{self.family_name}: expected {len(self)} setpoints, got shape {v.shape}")
        self.limits.check(self.family_name, v, self.units, names=self.names)
        await self._put(v)

    async def locate(self) -> dict[str, np.ndarray]:
        """``{"setpoint": array, "readback": array}`` [A] (bluesky's ``Location``)."""
        sp, rb = await asyncio.gather(self.setpoints.get_value(), self.readbacks.get_value())
        return {"setpoint": np.asarray(sp, dtype=float), "readback": np.asarray(rb, dtype=float)}

    def __repr__(self) -> str:
        return f"MagnetFamily({self.family_name!r}, {self.type}, {len(self)} magnets: {self.names[0]} ...)"
