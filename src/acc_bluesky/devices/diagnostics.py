"""BPMs, the orbit, RF, tune monitor and beam current."""

from __future__ import annotations

import numpy as np
from bluesky.protocols import Locatable, Location
from ophyd_async.core import Array1D, AsyncStatus, StandardReadableFormat, derived_signal_r

from ..profile import Limits
from .described import Described, formats
from .vector import NamedVector

__all__ = ["Bpm", "Orbit", "RfCavity", "TuneMonitor", "BeamCurrent"]

FloatArray = Array1D[np.float64]


def _rms(v: FloatArray) -> float:
    a = np.asarray(v, dtype=float)
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


class Bpm(Described):
    """One beam position monitor: ``x``, ``y`` in m (NaN when the beam is lost or the BPM is dead).

    ``index`` (position in the machine's BPM order), ``refpt`` (lattice index) and ``s`` [m] say where it is.
    """

    DESCRIPTIONS = {"x": "horizontal beam position read by this BPM (offset, gain, roll and noise included)",
                    "y": "vertical beam position read by this BPM (offset, gain, roll and noise included)"}

    def __init__(self, backend, index: int, refpt: int = -1, s: float = float("nan"), name: str = "") -> None:
        self.index = index
        self.refpt = int(refpt)
        self.s = float(s)
        hinted, _ = formats(backend)
        self.x = backend.bpm(index, "x")
        self.y = backend.bpm(index, "y")
        self.add_readables([self.x, self.y], hinted)  # in this order (a with-block adds them in hash order)
        super().__init__(name=name)

    def __repr__(self) -> str:
        return f"Bpm({self.name!r}, s={self.s:.3f} m)"


class Orbit(Described):
    """All BPMs read in one go: ``x`` and ``y`` arrays [m] in the order of ``names``, with their rms (``x_rms``,
    ``y_rms`` [m], the scalars a live table shows).

    ``orbit["BPM_005"]`` or ``orbit[4]`` is one :class:`Bpm`; ``channel`` is the vector of them. Attributes
    ``refpts`` (lattice indices), ``s`` [m], ``names`` and ``good`` (in-service mask) come from the profile.
    """

    DESCRIPTIONS = {"x": "horizontal closed orbit read by every BPM, in the order of the profile's BPM names",
                    "y": "vertical closed orbit read by every BPM, in the order of the profile's BPM names",
                    "x_rms": "rms of the horizontal orbit over the BPMs that read a number",
                    "y_rms": "rms of the vertical orbit over the BPMs that read a number"}

    def __init__(self, backend, refpts, names: list[str], good: np.ndarray, s=None, name: str = "") -> None:
        self.refpts = np.asarray(refpts)
        self.names = list(names)
        self.good = np.asarray(good, dtype=bool)
        self.s = np.full(len(self.refpts), np.nan) if s is None else np.asarray(s, dtype=float)
        hinted, plain = formats(backend)
        self.x = backend.orbit("x")
        self.y = backend.orbit("y")
        self.x_rms = derived_signal_r(_rms, derived_units="m", derived_precision=9, v=self.x)
        self.y_rms = derived_signal_r(_rms, derived_units="m", derived_precision=9, v=self.y)
        self.add_readables([self.x, self.y], plain)  # in this order: the twin's noise is drawn in read order
        self.add_readables([self.x_rms, self.y_rms], hinted)
        self.channel = NamedVector(
            {i: Bpm(backend, i, int(self.refpts[i]), float(self.s[i])) for i in range(len(self.refpts))}, "BPM",
            self.names)
        super().__init__(name=name)

    def __len__(self) -> int:
        return len(self.refpts)

    def __getitem__(self, key) -> Bpm:
        return self.channel[key]

    def index_of(self, bpm: str | int) -> int:
        return self.channel.index_of(bpm)


class RfCavity(Described, Locatable[float]):
    """RF: ``frequency`` [Hz] (``set`` moves it, limits checked) and ``voltage`` [V]."""

    DESCRIPTIONS = {"frequency": "RF frequency setpoint (sets the beam energy through the momentum compaction)",
                    "voltage": "total RF accelerating voltage"}

    def __init__(self, backend, frequency_limits: Limits, voltage_limits: Limits, name: str = "") -> None:
        self.frequency_limits = frequency_limits
        self.voltage_limits = voltage_limits
        self.units = "Hz"
        hinted, _ = formats(backend)
        with self.add_children_as_readables(hinted):
            self.frequency = backend.rf_frequency()
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.voltage = backend.rf_voltage()
        self._put = backend.rf_put(self.frequency)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Move the RF frequency to ``value`` [Hz] (limits checked first)."""
        self.frequency_limits.check(f"{self.name or 'rf'}.frequency", value, "Hz")
        await self._put(float(value))

    async def locate(self) -> Location[float]:
        f = float(await self.frequency.get_value())
        return Location(setpoint=f, readback=f)


class TuneMonitor(Described):
    """Fractional tunes ``x``, ``y``."""

    DESCRIPTIONS = {"x": "horizontal fractional betatron tune", "y": "vertical fractional betatron tune"}

    def __init__(self, backend, name: str = "") -> None:
        hinted, _ = formats(backend)
        self.x = backend.tune("x")
        self.y = backend.tune("y")
        self.add_readables([self.x, self.y], hinted)
        super().__init__(name=name)


class BeamCurrent(Described):
    """Stored ``current`` [A] and ``lifetime`` [s]."""

    DESCRIPTIONS = {"current": "stored beam current (0 when the beam is lost)", "lifetime": "beam lifetime"}

    def __init__(self, backend, name: str = "") -> None:
        hinted, plain = formats(backend)
        with self.add_children_as_readables(hinted):
            self.current = backend.beam_current()
        with self.add_children_as_readables(plain):
            self.lifetime = backend.beam_lifetime()
        super().__init__(name=name)
