"""Sim backend: soft signals whose getters and setters call the twin (hardware units).

Every read asks the twin (what a BPM or a power supply would show now). A monitored signal (``subscribe``,
``observe_value``, a move's watcher) is updated whenever the twin's state changes: the twin calls back, and the
backend refreshes the monitored value in the event loop once per change (N sets, one refresh). Devices built on
this backend are not staged into ophyd-async's cache (:attr:`SimBackend.stage_signals` is False): in the twin
every read is an acquisition, with its own noise, as an unstaged read on a real BPM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW, SoftSignalBackend

from ...twin import Twin

__all__ = ["SimBackend", "TwinSignalBackend"]

FloatArray = Array1D[np.float64]


class TwinSignalBackend(SoftSignalBackend):
    """A getter/setter soft signal bound to a twin, whose monitor follows the twin's changes of state."""

    def __init__(self, datatype, twin: Twin, getter: Callable[[], Any], setter: Callable[[Any], Any] | None = None,
                 units: str | None = None, precision: int | None = None, initial: Any = None):
        # ``initial``: a value of the right shape until the first read (every read asks the twin)
        super().__init__(datatype, getter() if initial is None else initial, units, precision, getter=getter,
                         setter=setter)
        self._twin = twin
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False

    async def get_setpoint(self):
        """A setpoint signal's setpoint is what the twin holds now (moves may go straight to the twin)."""
        if self._setter is None:
            return await super().get_setpoint()
        return self.converter.write_value(self._getter())

    def set_callback(self, callback) -> None:
        if callback is not None:
            self.set_value(self._getter())  # the monitor starts from the present value, not the last one read
            self._loop = asyncio.get_running_loop()
            self._unsubscribe = self._twin.subscribe(self._changed)
        elif self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        super().set_callback(callback)

    def _changed(self) -> None:  # in the thread that changed the twin, under its lock: only schedule
        if self._pending or self._loop is None:
            return
        self._pending = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.call_soon(self._refresh)
        else:
            self._loop.call_soon_threadsafe(self._refresh)

    def _refresh(self) -> None:
        self._pending = False
        if self.callback is not None:
            self.set_value(self._getter())


class SimBackend:
    """Makes the signals of every device from a :class:`~acc_bluesky.twin.Twin`, and their fast puts.

    ``*_put`` methods return the coroutine function a device awaits to move a setpoint: on the twin a put is a
    synchronous call, so it goes straight to the twin (no per-put timeout and retry context to guard it).
    """

    local_puts = True  # a put completes in this process (no network): plan_stubs.move may put directly

    mode = "sim"
    #: Reads are acquisitions: devices do not stage their signals into a cache (see the module docstring).
    stage_signals = False

    def __init__(self, twin: Twin):
        self.twin = twin
        self.profile = twin.profile

    def _r(self, datatype, getter, units: str, precision: int | None = None, initial: Any = None) -> SignalR:
        return SignalR(TwinSignalBackend(datatype, self.twin, getter, units=units, precision=precision,
                                         initial=0.0 if initial is None and datatype is float else initial))

    def _rw(self, datatype, getter, setter, units: str, precision: int | None = None, initial: Any = None
            ) -> SignalRW:
        return SignalRW(TwinSignalBackend(datatype, self.twin, getter, setter, units=units, precision=precision,
                                          initial=0.0 if initial is None and datatype is float else initial))

    # magnets ---------------------------------------------------------------------------------------
    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        t = self.twin
        return self._rw(float, lambda: t.get_setpoint(family, index),
                        lambda v: t.set_setpoint(family, v, index), t.family(family).spec.units)

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        t = self.twin
        return self._r(float, lambda: t.get_readback(family, index), t.family(family).spec.units)

    def family_setpoints(self, family: str) -> SignalRW[FloatArray]:
        t = self.twin
        n = len(t.family(family).refpts)
        return self._rw(FloatArray, lambda: t.get_setpoint(family),
                        lambda v: t.set_setpoint(family, np.asarray(v, dtype=float)), t.family(family).spec.units,
                        initial=np.zeros(n))

    def family_readbacks(self, family: str) -> SignalR[FloatArray]:
        t = self.twin
        return self._r(FloatArray, lambda: t.get_readback(family), t.family(family).spec.units,
                       initial=np.zeros(len(t.family(family).refpts)))

    def magnet_put(self, family: str, index: int, signal: SignalRW) -> Callable[[float], Any]:
        t = self.twin

        async def put(value: float) -> None:
            t.set_setpoint(family, float(value), index)

        return put

    def family_put(self, family: str, signal: SignalRW) -> Callable[[np.ndarray], Any]:
        t = self.twin

        async def put(values: np.ndarray) -> None:
            t.set_setpoint(family, np.asarray(values, dtype=float))

        return put

    # BPMs ------------------------------------------------------------------------------------------
    def orbit(self, plane: str) -> SignalR[FloatArray]:
        t = self.twin
        k = "xy".index(plane)
        return self._r(FloatArray, lambda: t.read_bpms()[k], "m", initial=np.zeros(t.nbpm))

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        t = self.twin
        k = "xy".index(plane)
        return self._r(float, lambda: float(t.read_bpms()[k][index]), "m")

    # RF, tune, beam --------------------------------------------------------------------------------
    def rf_frequency(self) -> SignalRW[float]:
        t = self.twin
        return self._rw(float, lambda: t.rf_frequency_setpoint, t.set_rf_frequency, "Hz", 3)

    def rf_put(self, signal: SignalRW) -> Callable[[float], Any]:
        t = self.twin

        async def put(value: float) -> None:
            t.set_rf_frequency(float(value))

        return put

    def rf_voltage(self) -> SignalRW[float]:
        t = self.twin
        return self._rw(float, lambda: t.rf_voltage_setpoint, t.set_rf_voltage, "V")

    def tune(self, plane: str) -> SignalR[float]:
        t = self.twin
        k = "xy".index(plane)
        return self._r(float, lambda: float(t.read_tunes()[k]), "", 5)

    def beam_current(self) -> SignalR[float]:
        return self._r(float, self.twin.beam_current, "A", 4)

    def beam_lifetime(self) -> SignalR[float]:
        return self._r(float, self.twin.beam_lifetime, "s", 0)

    # --- tbt: the beam devices (BPM acquisition modes, TbT readout, pinger, injection, losses; twin/beam.py) ----
    #: the twin has an injected beam and a pinger: the machine builds its beam devices
    beam_devices = True
    INJECTION_KNOBS = ("x", "px", "y", "py", "energy")

    def bpm_mode(self) -> SignalRW[str]:
        b = self.twin.beam
        return self._rw(str, lambda: b.mode, lambda v: b.set_mode(str(v)), "", initial="orbit")

    def bpm_turns(self) -> SignalRW[int]:
        b = self.twin.beam

        def set_turns(v) -> None:
            if b.mode == "orbit":
                raise ValueError("the BPMs are in orbit mode (one closed orbit): set the mode to 'trajectory' or "
                                 "'tbt' before the number of turns")
            b.set_mode(b.mode, turns=int(v))

        return self._rw(int, lambda: int(b.turns), set_turns, "turns", initial=1)

    def tbt(self, plane: str) -> SignalR[np.ndarray]:
        """(nbpm, turns) readings [m] of the last acquisition (BPM after BPM)."""
        t = self.twin
        k = "xy".index(plane)

        def get() -> np.ndarray:
            acq = t.beam.last
            if acq is None:
                return np.full((t.nbpm, 1), np.nan)
            return np.ascontiguousarray((acq.x if k == 0 else acq.y).T)

        return self._r(np.ndarray, get, "m", initial=np.full((t.nbpm, 1), np.nan))

    def bpm_acquire(self) -> Callable[[], Any]:
        b = self.twin.beam

        async def acquire() -> None:
            b.trigger()

        return acquire

    def pinger_kick(self, plane: str) -> SignalRW[float]:
        b = self.twin.beam
        k = "xy".index(plane)

        def set_kick(v) -> None:
            kick = b.kick.copy()
            kick[k] = float(v)
            b.set_kick(kick, b.kicker)

        return self._rw(float, lambda: float(b.kick[k]), set_kick, "rad", 9)

    def pinger_fire(self) -> Callable[[], Any]:
        b = self.twin.beam

        async def fire() -> None:
            b.kick_stored()

        return fire

    def injection_trim(self, knob: str) -> SignalRW[float]:
        b = self.twin.beam
        if knob == "energy":
            return self._rw(float, lambda: float(b.injection_energy), b.set_injection_energy, "", 9)
        k = ("x", "px", "y", "py").index(knob)

        def set_trim(v) -> None:
            trim = b.injection_trim.copy()
            trim[k] = float(v)
            b.set_injection(trim)

        return self._rw(float, lambda: float(b.injection_trim[k]), set_trim, "m" if knob in ("x", "y") else "rad", 9)

    def injection_fire(self) -> Callable[[], Any]:
        b = self.twin.beam

        async def fire() -> None:
            b.inject()

        return fire

    def loss(self, what: str) -> SignalR:
        """What the beam-loss monitor says of the last acquisition (see :class:`~acc_bluesky.devices.BeamLosses`)."""
        b = self.twin.beam

        def info() -> dict[str, Any]:
            return {} if b.last is None else b.last.transmission()

        if what == "turn":
            return self._r(int, lambda: int(-1 if info().get("lost_turn") is None else info()["lost_turn"]), "turn",
                           initial=-1)
        if what == "element":
            return self._r(int, lambda: int(-1 if info().get("lost_element") is None else info()["lost_element"]),
                           "", initial=-1)
        if what == "element_name":
            return self._r(str, lambda: str(info().get("lost_element_name", "")), "", initial="")
        if what == "s":
            return self._r(float, lambda: float(info().get("lost_s", float("nan"))), "m", 3)
        if what == "bpms":
            return self._r(int, lambda: int(info().get("bpms_reached", 0)), "BPM passages", initial=0)
        if what == "turns":
            return self._r(float, lambda: float(info().get("turns_reached", 0.0)), "turns", 3)
        if what == "transmission":
            return self._r(float, lambda: float(info().get("final_intensity", 0.0)), "", 3)
        raise ValueError(f"unknown loss-monitor quantity {what!r}")
    # --- end tbt ---
