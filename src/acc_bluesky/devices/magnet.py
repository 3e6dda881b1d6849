"""Magnets and magnet families: setpoints/readbacks in hardware units, strengths in physics units."""

from __future__ import annotations

import numpy as np
from bluesky.protocols import Movable
from ophyd_async.core import (
    AsyncStatus,
    StandardReadableFormat,
    derived_signal_r,
)

from ..profile import Family
from .described import Described
from .vector import NamedVector

__all__ = ["Magnet", "Corrector", "MagnetFamily"]


class Magnet(Described, Movable[float]):
    """One magnet power supply: ``setpoint``/``readback`` in A, ``strength`` in physics units.

    ``set(value)`` takes amperes; a value past the profile's limits is refused before anything moves.
    """

    def __init__(self, backend, family: Family, index: int, energy: float, name: str = "") -> None:
        spec = family.spec
        self.family_name = family.name
        self.index = index
        self.device_name = family.device_names[index]
        self.element_name = family.element_names[index]
        self.refpt = int(family.refpts[index])
        self.calibration = spec.calibration
        self.limits = spec.limits
        self.units = spec.units
        self.physics_units = spec.physics_units or spec.calibration.physics_units
        self.energy = energy
        self.in_service = index not in family.bad
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback = backend.magnet_readback(family.name, index)
        with self.add_children_as_readables():
            self.setpoint = backend.magnet_setpoint(family.name, index)
        cal, e = self.calibration, energy

        def to_physics(readback: float) -> float:
            return float(cal.hw2physics(readback, e, e))

        with self.add_children_as_readables():
            self.strength = derived_signal_r(to_physics, derived_units=self.physics_units, derived_datatype=float,
                                             readback=self.readback)
        super().__init__(name=name)

    def describe_signal(self, child: str) -> str | None:
        what = f"{self.device_name} ({self.element_name}, {self.family_name})"
        return {"setpoint": f"power-supply setpoint of {what}",
                "readback": f"power-supply current delivered to {what}",
                "strength": f"field strength of {what}: the readback through the calibration, at the beam energy",
                }.get(child)

    def to_physics(self, hw):
        """Hardware value(s) [A] -> physics (rad, m^-2, ...) at the machine energy."""
        return self.calibration.hw2physics(hw, self.energy, self.energy)

    def to_hw(self, physics):
        """Physics value(s) -> hardware [A] at the machine energy."""
        return self.calibration.physics2hw(physics, self.energy, self.energy)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Move the setpoint to ``value`` [A] (limits checked first)."""
        self.limits.check(self.device_name, value, self.units)
        await self.setpoint.set(float(value))


class Corrector(Magnet):
    """A steering magnet (or a kick winding): setpoint and readback in A, ``strength`` (kick) in rad."""


class MagnetFamily(NamedVector, Movable[np.ndarray]):
    """A family of magnets (a ``DeviceVector``) with its lattice indices and names.

    ``setpoints``/``readbacks`` read or write the whole family at once (one put, one recomputation);
    ``set(array)`` moves all setpoints together after checking every limit.
    """

    def __init__(self, backend, family: Family, energy: float, name: str = "") -> None:
        cls = Corrector if family.spec.type in ("hcor", "vcor") else Magnet
        super().__init__({i: cls(backend, family, i, energy) for i in range(len(family))}, family.name,
                         family.device_names)
        self.family_name = family.name
        self.type = family.spec.type
        self.refpts = np.asarray(family.refpts)
        self.names = list(family.device_names)
        self.element_names = list(family.element_names)
        self.calibration = family.spec.calibration
        self.limits = family.spec.limits
        self.units = family.spec.units
        self.physics_units = family.spec.physics_units or family.spec.calibration.physics_units
        self.energy = energy
        self.good = family.good
        self.setpoints = backend.family_setpoints(family.name)
        self.readbacks = backend.family_readbacks(family.name)
        self.set_name(name)

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
        await self.setpoints.set(v)
