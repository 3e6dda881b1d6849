"""BPMs, the orbit, RF, tune monitor and beam current."""

from __future__ import annotations

import numpy as np
from bluesky.protocols import Movable
from ophyd_async.core import AsyncStatus, StandardReadableFormat

from ..profile import Limits
from .described import Described
from .vector import NamedVector

__all__ = ["Bpm", "Orbit", "RfCavity", "TuneMonitor", "BeamCurrent"]


class Bpm(Described):
    """One beam position monitor: ``x``, ``y`` in m (NaN when the beam is lost or the BPM is dead)."""

    DESCRIPTIONS = {"x": "horizontal beam position read by this BPM (offset, gain, roll and noise included)",
                    "y": "vertical beam position read by this BPM (offset, gain, roll and noise included)"}

    def __init__(self, backend, index: int, name: str = "") -> None:
        self.index = index
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.x = backend.bpm(index, "x")
            self.y = backend.bpm(index, "y")
        super().__init__(name=name)


class Orbit(Described):
    """All BPMs read in one go: ``x`` and ``y`` arrays [m]; ``channel[i]`` is BPM i.

    Attributes ``refpts`` (lattice indices), ``names`` and ``good`` (in-service mask) come from the profile.
    """

    DESCRIPTIONS = {"x": "horizontal closed orbit read by every BPM, in the order of the profile's BPM names",
                    "y": "vertical closed orbit read by every BPM, in the order of the profile's BPM names"}

    def __init__(self, backend, refpts, names: list[str], good: np.ndarray, name: str = "") -> None:
        self.refpts = np.asarray(refpts)
        self.names = list(names)
        self.good = np.asarray(good, dtype=bool)
        with self.add_children_as_readables():
            self.x = backend.orbit("x")
            self.y = backend.orbit("y")
        self.channel = NamedVector({i: Bpm(backend, i) for i in range(len(self.refpts))}, "BPM", self.names)
        super().__init__(name=name)

    def __len__(self) -> int:
        return len(self.refpts)


class RfCavity(Described, Movable[float]):
    """RF: ``frequency`` [Hz] (``set`` moves it, limits checked) and ``voltage`` [V]."""

    DESCRIPTIONS = {"frequency": "RF frequency setpoint (sets the beam energy through the momentum compaction)",
                    "voltage": "total RF accelerating voltage"}

    def __init__(self, backend, frequency_limits: Limits, voltage_limits: Limits, name: str = "") -> None:
        self.frequency_limits = frequency_limits
        self.voltage_limits = voltage_limits
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.frequency = backend.rf_frequency()
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.voltage = backend.rf_voltage()
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Move the RF frequency to ``value`` [Hz]."""
        self.frequency_limits.check(f"{self.name or 'rf'}.frequency", value, "Hz")
        await self.frequency.set(float(value))


class TuneMonitor(Described):
    """Fractional tunes ``x``, ``y``."""

    DESCRIPTIONS = {"x": "horizontal fractional betatron tune", "y": "vertical fractional betatron tune"}

    def __init__(self, backend, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.x = backend.tune("x")
            self.y = backend.tune("y")
        super().__init__(name=name)


class BeamCurrent(Described):
    """Stored ``current`` [A] and ``lifetime`` [s]."""

    DESCRIPTIONS = {"current": "stored beam current (0 when the beam is lost)", "lifetime": "beam lifetime"}

    def __init__(self, backend, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.current = backend.beam_current()
        with self.add_children_as_readables():
            self.lifetime = backend.beam_lifetime()
        super().__init__(name=name)
