"""Sim backend: soft signals whose getters/setters call the twin (hardware units)."""

from __future__ import annotations

from typing import Any

import numpy as np
from ophyd_async.core import (
    CALCULATE_TIMEOUT,
    Array1D,
    AsyncStatus,
    CalculatableTimeout,
    SignalR,
    SignalRW,
    SoftSignalBackend,
)

from ...twin import Twin

__all__ = ["LiveSignalR", "LiveSignalRW", "SimBackend"]


class _Live:
    """A soft signal whose getter asks the twin: every read asks it, unless a cached read is asked for explicitly.

    ophyd-async serves a staged or monitored signal from its cache, which a getter-backed soft signal only refreshes
    when its getter runs; a plan that stages its detectors (``bp.count``, ``bp.scan``) would record stale values.
    """

    def _backend_or_cache(self, cached: bool | None = None) -> Any:
        return super()._backend_or_cache(bool(cached))  # type: ignore[misc]


class LiveSignalR(_Live, SignalR):
    """A read-only :class:`_Live` soft signal."""


class LiveSignalRW(_Live, SignalRW):
    """A read-write :class:`_Live` soft signal.

    ``set`` puts straight to the twin: its setter is synchronous, so the timeout and the retry loop of
    ``SignalW.set`` (a ``stamina`` retry context per put, ~0.4 ms) have nothing to guard. A signal made with
    ``attempts > 1`` keeps ophyd-async's own ``set``.
    """

    @AsyncStatus.wrap
    async def set(self, value: Any, timeout: CalculatableTimeout = CALCULATE_TIMEOUT) -> None:
        if self._attempts != 1:
            await SignalRW.set(self, value, timeout)
            return
        await self._connector.backend.put(value)


def soft_signal_rw(datatype, initial_value=None, units: str | None = None, precision: int | None = None, *,
                   getter, setter) -> LiveSignalRW:
    """Like ophyd-async's ``soft_signal_rw`` with a getter and a setter, as a :class:`LiveSignalRW`."""
    return LiveSignalRW(SoftSignalBackend(datatype, initial_value, units, precision, getter=getter, setter=setter))


def soft_signal_r(datatype, initial_value=None, units: str | None = None, precision: int | None = None, *,
                  getter) -> LiveSignalR:
    """A read-only soft signal whose getter asks the twin, as a :class:`LiveSignalR`."""
    return LiveSignalR(SoftSignalBackend(datatype, initial_value, units, precision, getter=getter))


class SimBackend:
    """Makes the signals of every device from a :class:`~acc_bluesky.twin.Twin`."""

    mode = "sim"

    def __init__(self, twin: Twin):
        self.twin = twin
        self.profile = twin.profile

    # magnets ---------------------------------------------------------------------------------------
    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        t = self.twin
        return soft_signal_rw(
            float, float(t.get_setpoint(family, index)), units=t.family(family).spec.units,
            getter=lambda: t.get_setpoint(family, index),
            setter=lambda v: t.set_setpoint(family, v, index),
        )

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        t = self.twin
        return soft_signal_r(
            float, float(t.get_readback(family, index)), units=t.family(family).spec.units,
            getter=lambda: t.get_readback(family, index))

    def family_setpoints(self, family: str) -> SignalRW[Array1D[np.float64]]:
        t = self.twin
        return soft_signal_rw(
            Array1D[np.float64], t.get_setpoint(family), units=t.family(family).spec.units,
            getter=lambda: t.get_setpoint(family),
            setter=lambda v: t.set_setpoint(family, np.asarray(v, dtype=float)),
        )

    def family_readbacks(self, family: str) -> SignalR[Array1D[np.float64]]:
        t = self.twin
        return soft_signal_r(
            Array1D[np.float64], t.get_readback(family), units=t.family(family).spec.units,
            getter=lambda: t.get_readback(family))

    # BPMs ------------------------------------------------------------------------------------------
    def orbit(self, plane: str) -> SignalR[Array1D[np.float64]]:
        t = self.twin
        k = "xy".index(plane)
        return soft_signal_r(
            Array1D[np.float64], np.zeros(t.nbpm), units="m", getter=lambda: t.read_bpms()[k])

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        t = self.twin
        k = "xy".index(plane)
        return soft_signal_r(float, 0.0, units="m", getter=lambda: float(t.read_bpms()[k][index]))

    # RF, tune, beam --------------------------------------------------------------------------------
    def rf_frequency(self) -> SignalRW[float]:
        t = self.twin
        return soft_signal_rw(float, t.rf_frequency_setpoint, units="Hz", precision=3,
                              getter=lambda: t.rf_frequency_setpoint, setter=t.set_rf_frequency)

    def rf_voltage(self) -> SignalRW[float]:
        t = self.twin
        return soft_signal_rw(float, t.rf_voltage_setpoint, units="V",
                              getter=lambda: t.rf_voltage_setpoint, setter=t.set_rf_voltage)

    def tune(self, plane: str) -> SignalR[float]:
        t = self.twin
        k = "xy".index(plane)
        return soft_signal_r(float, 0.0, units="", precision=5, getter=lambda: float(t.read_tunes()[k]))

    def beam_current(self) -> SignalR[float]:
        t = self.twin
        return soft_signal_r(float, 0.0, units="A", getter=t.beam_current)

    def beam_lifetime(self) -> SignalR[float]:
        t = self.twin
        return soft_signal_r(float, 0.0, units="s", getter=t.beam_lifetime)
