"""The beam devices: the BPM system's acquisition modes and turn-by-turn readout, the pinger, the injection
steering and the beam-loss monitor.

- :class:`BpmAcquisition` (``m.tbt``): ``mode`` (``orbit``, ``trajectory``, ``tbt``) and ``turns`` (configuration),
  ``x`` and ``y`` (n_bpm, turns) [m] of the last acquisition (NaN where no beam); ``trigger()`` acquires in the
  present mode (in ``tbt`` mode the timing system fires the pinger, in ``trajectory`` mode the injection).
- :class:`Pinger` (``m.pinger``): kicks ``kick_x``, ``kick_y`` [rad]; ``trigger()`` fires it at the stored beam and the
  BPMs record its turns (the turns of the ``tbt`` mode).
- :class:`Injection` (``m.injection``): the injected beam's trims ``x`` [m], ``px`` [rad], ``y`` [m], ``py`` [rad]
  (the last transfer-line steerers / septum) and ``energy`` (dp/p); ``trigger()`` injects one shot and the BPMs
  record its first turns (the turns of the ``trajectory`` mode).
- :class:`BeamLosses` (``m.losses``): where the beam of the last acquisition was lost: ``turns_reached`` [turns],
  ``bpms_reached``, ``lost_turn`` (-1: not lost), ``lost_element`` (lattice index, -1), ``lost_element_name``,
  ``lost_s`` [m] and ``transmission`` (fraction of the particles at the last BPM of the last turn).

Readables are added in a fixed order (``add_readables`` with a list): the data keys of a run never depend on the
hash order of a set of signals.
"""

from __future__ import annotations

from ophyd_async.core import AsyncStatus, StandardReadableFormat

from .described import Described, formats

__all__ = ["BPM_MODES", "BeamLosses", "BpmAcquisition", "Injection", "Pinger"]

#: acquisition modes of the BPM system
BPM_MODES = ("orbit", "trajectory", "tbt")

CONFIG = StandardReadableFormat.CONFIG_SIGNAL


def _fire_child(device, fire) -> None:
    sig = getattr(fire, "signal", None)  # an EPICS trigger PV: a child, so that it connects with the device
    if sig is not None:
        device.fire = sig


class BpmAcquisition(Described):
    """The BPM system's acquisition: ``mode``, ``turns``, and the readout ``x``, ``y`` (n_bpm, turns) [m]."""

    DESCRIPTIONS = {
        "mode": "BPM acquisition mode: orbit (closed orbit), trajectory (first turns of an injected shot), tbt "
                "(turns after a pinger kick)",
        "turns": "turns acquired in the trajectory and tbt modes (1 in orbit mode)",
        "x": "horizontal turn-by-turn readings (BPM x turn) of the last acquisition; NaN where no beam",
        "y": "vertical turn-by-turn readings (BPM x turn) of the last acquisition; NaN where no beam"}

    def __init__(self, backend, nbpm: int, name: str = "") -> None:
        self.nbpm = int(nbpm)
        _, plain = formats(backend)
        self.mode = backend.bpm_mode()
        self.turns = backend.bpm_turns()
        self.x = backend.tbt("x")
        self.y = backend.tbt("y")
        self.add_readables([self.mode, self.turns], CONFIG)
        self.add_readables([self.x, self.y], plain)  # in this order
        self._acquire = backend.bpm_acquire()
        _fire_child(self, self._acquire)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """One acquisition in the present mode."""
        await self._acquire()


class Pinger(Described):
    """A fast kicker of the stored beam: ``kick_x``, ``kick_y`` [rad]; ``trigger()`` fires it."""

    DESCRIPTIONS = {"kick_x": "horizontal pinger kick fired at the next trigger",
                    "kick_y": "vertical pinger kick fired at the next trigger"}

    def __init__(self, backend, name: str = "") -> None:
        hinted, _ = formats(backend)
        self.kick_x = backend.pinger_kick("x")
        self.kick_y = backend.pinger_kick("y")
        self.add_readables([self.kick_x, self.kick_y], hinted)
        self._fire = backend.pinger_fire()
        _fire_child(self, self._fire)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """Fire the pinger: the BPMs record the turns of their tbt mode."""
        await self._fire()


class Injection(Described):
    """Injection steering (x [m], px [rad], y [m], py [rad], energy [dp/p]); ``trigger()`` injects one shot."""

    KNOBS = ("x", "px", "y", "py", "energy")
    DESCRIPTIONS = {"x": "horizontal position trim of the injected beam", "px": "horizontal angle trim of the "
                    "injected beam", "y": "vertical position trim of the injected beam", "py": "vertical angle trim "
                    "of the injected beam", "energy": "energy trim of the injected beam (dp/p)"}

    def __init__(self, backend, name: str = "") -> None:
        hinted, _ = formats(backend)
        self.x = backend.injection_trim("x")
        self.px = backend.injection_trim("px")
        self.y = backend.injection_trim("y")
        self.py = backend.injection_trim("py")
        self.energy = backend.injection_trim("energy")
        self.add_readables([self.x, self.px, self.y, self.py, self.energy], hinted)
        self._fire = backend.injection_fire()
        _fire_child(self, self._fire)
        super().__init__(name=name)

    def knobs(self) -> list:
        """The five trim signals, in the order of :attr:`KNOBS`."""
        return [self.x, self.px, self.y, self.py, self.energy]

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """Inject one shot: the BPMs record the first turns of their trajectory mode."""
        await self._fire()


class BeamLosses(Described):
    """Where the beam of the last acquisition was lost (a beam-loss / current monitor)."""

    DESCRIPTIONS = {
        "turns_reached": "turns the beam made before it was lost (BPM passages / number of BPMs)",
        "bpms_reached": "BPM passages the beam made before it was lost",
        "lost_turn": "turn (0-based) in which the beam was lost; -1: not lost",
        "lost_element": "lattice index of the element where the beam was lost; -1: not lost",
        "lost_element_name": "name of the element where the beam was lost",
        "lost_s": "position along the lattice where the beam was lost (NaN: not lost)",
        "transmission": "fraction of the particles that reached the last BPM of the last turn"}

    def __init__(self, backend, name: str = "") -> None:
        hinted, plain = formats(backend)
        self.turns_reached = backend.loss("turns")
        self.bpms_reached = backend.loss("bpms")
        self.lost_turn = backend.loss("turn")
        self.lost_element = backend.loss("element")
        self.lost_element_name = backend.loss("element_name")
        self.lost_s = backend.loss("s")
        self.transmission = backend.loss("transmission")
        self.add_readables([self.turns_reached, self.bpms_reached], hinted)
        self.add_readables([self.lost_turn, self.lost_element, self.lost_element_name, self.lost_s,
                            self.transmission], plain)
        super().__init__(name=name)
