"""Sim backend: soft signals whose getters/setters call the twin (hardware units)."""

from __future__ import annotations

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW, soft_signal_r_and_setter, soft_signal_rw

from ...twin import Twin

__all__ = ["SimBackend"]


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
        sig, _ = soft_signal_r_and_setter(
            float, float(t.get_readback(family, index)), units=t.family(family).spec.units,
            getter=lambda: t.get_readback(family, index))
        return sig

    def family_setpoints(self, family: str) -> SignalRW[Array1D[np.float64]]:
        t = self.twin
        return soft_signal_rw(
            Array1D[np.float64], t.get_setpoint(family), units=t.family(family).spec.units,
            getter=lambda: t.get_setpoint(family),
            setter=lambda v: t.set_setpoint(family, np.asarray(v, dtype=float)),
        )

    def family_readbacks(self, family: str) -> SignalR[Array1D[np.float64]]:
        t = self.twin
        sig, _ = soft_signal_r_and_setter(
            Array1D[np.float64], t.get_readback(family), units=t.family(family).spec.units,
            getter=lambda: t.get_readback(family))
        return sig

    # BPMs ------------------------------------------------------------------------------------------
    def orbit(self, plane: str) -> SignalR[Array1D[np.float64]]:
        t = self.twin
        k = "xy".index(plane)
        sig, _ = soft_signal_r_and_setter(
            Array1D[np.float64], np.zeros(t.nbpm), units="m", getter=lambda: t.read_bpms()[k])
        return sig

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        t = self.twin
        k = "xy".index(plane)
        sig, _ = soft_signal_r_and_setter(float, 0.0, units="m", getter=lambda: float(t.read_bpms()[k][index]))
        return sig

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
        sig, _ = soft_signal_r_and_setter(float, 0.0, units="", precision=5,
                                          getter=lambda: float(t.read_tunes()[k]))
        return sig

    def beam_current(self) -> SignalR[float]:
        t = self.twin
        sig, _ = soft_signal_r_and_setter(float, 0.0, units="A", getter=t.beam_current)
        return sig

    def beam_lifetime(self) -> SignalR[float]:
        t = self.twin
        sig, _ = soft_signal_r_and_setter(float, 0.0, units="s", getter=t.beam_lifetime)
        return sig
