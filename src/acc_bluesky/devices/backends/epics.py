"""EPICS backend: the same signals on PVs named by the profile's templates (Channel Access or PV Access).

Every read and put has a timeout: a PV whose IOC died or became unreachable raises :class:`PvUnreachable` naming
the PV within the backend's ``timeout`` (reads) or ``put_timeout`` (puts), instead of waiting forever. The timeouts
wrap ophyd-async's public ``CaSignalBackend`` / ``PvaSignalBackend`` (:class:`TimedSignalBackend`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from ophyd_async.core import Array1D, SignalBackend, SignalR, SignalRW

from ...profile import Profile

__all__ = ["EpicsBackend", "PvUnreachable", "TimedSignalBackend", "pv_names"]


class PvUnreachable(ConnectionError):
    """A PV did not answer a read or a put in time (its IOC is down or unreachable); ``pvs`` names it."""

    def __init__(self, message: str, pvs: list[str]):
        super().__init__(message)
        self.pvs = list(pvs)


def _unreachable(pv: str, op: str, timeout: float, err: BaseException) -> PvUnreachable:
    why = "no reply" if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"
    addr = os.environ.get("EPICS_CA_ADDR_LIST", "<unset>")
    return PvUnreachable(
        f"{pv}: {op} failed ({why}; timeout {timeout:g} s). The IOC serving it is down or unreachable "
        f"(EPICS_CA_ADDR_LIST={addr!r}).", [pv])


def _short(value) -> str:
    if isinstance(value, np.ndarray) and value.size > 3:
        return f"<{value.size} values>"
    return repr(value)


class TimedSignalBackend(SignalBackend):
    """Delegates to an ophyd-async EPICS signal backend, with a timeout on every read and put.

    A read that gets no answer within ``timeout`` and a put that does not complete within ``put_timeout`` (or
    whose PV is disconnected: checked within ``timeout`` first) raise :class:`PvUnreachable` naming the PV.
    """

    def __init__(self, inner: SignalBackend, read_pv: str, write_pv: str, timeout: float, put_timeout: float):
        self.inner = inner
        self.read_pv, self.write_pv = read_pv, write_pv
        self.timeout, self.put_timeout = timeout, put_timeout
        super().__init__(inner.datatype)

    def source(self, name: str, read: bool) -> str:
        return self.inner.source(name, read)

    async def connect(self, timeout: float) -> None:
        await self.inner.connect(timeout)

    async def _get(self, coro, what: str):
        try:
            return await asyncio.wait_for(coro, self.timeout)
        except Exception as err:  # noqa: BLE001 - aioca/p4p raise their own kinds; TimeoutError too
            if isinstance(err, TimeoutError) or type(err).__name__ in ("CANothing", "Disconnected", "Timeout"):
                raise _unreachable(self.read_pv, what, self.timeout, err) from err
            raise

    async def get_reading(self):
        return await self._get(self.inner.get_reading(), "read")

    async def get_value(self):
        return await self._get(self.inner.get_value(), "read")

    async def get_setpoint(self):
        return await self._get(self.inner.get_setpoint(), "read of the setpoint")

    async def get_datakey(self, source: str):
        return await self._get(self.inner.get_datakey(source), "describe")

    async def put(self, value) -> None:
        op = f"put of {_short(value)}"
        try:
            await asyncio.wait_for(self.inner.put(value), self.put_timeout)
        except Exception as err:  # noqa: BLE001
            if isinstance(err, TimeoutError) or type(err).__name__ in ("CANothing", "Disconnected", "Timeout"):
                raise _unreachable(self.write_pv, op, self.put_timeout, err) from err
            raise

    def set_callback(self, callback) -> None:
        self.inner.set_callback(callback)


def pv_names(profile: Profile, prefix: str | None = None) -> dict[str, str]:
    """Every PV of a profile: logical key -> PV name (the IOC and the epics backend share this table)."""
    c = profile.spec.controls
    p = c.prefix if prefix is None else prefix
    out: dict[str, str] = {}

    def tpl(spec_pv: dict, key: str, default: str) -> str:
        return spec_pv.get(key, default)

    for fname, fam in profile.families.items():
        sp_t = tpl(fam.spec.pv, "setpoint", c.magnet_setpoint)
        rb_t = tpl(fam.spec.pv, "readback", c.magnet_readback)
        for i in range(len(fam.element_names)):
            kw = profile.pv_fields(fname, i) | {"prefix": p}  # prefix, family, index, device, element, name
            out[f"{fname}:{i + 1:03d}:setpoint"] = sp_t.format(**kw)
            out[f"{fname}:{i + 1:03d}:readback"] = rb_t.format(**kw)
        out[f"{fname}:setpoints"] = tpl(fam.spec.pv, "setpoints", c.family_setpoints).format(prefix=p, family=fname)
        out[f"{fname}:readbacks"] = tpl(fam.spec.pv, "readbacks", c.family_readbacks).format(prefix=p, family=fname)
    bpv = profile.spec.bpm.pv
    for i in range(len(profile.bpm_refpts)):
        kw = profile.bpm_pv_fields(i) | {"prefix": p}
        out[f"BPM:{i + 1:03d}:x"] = tpl(bpv, "x", c.bpm_x).format(**kw)
        out[f"BPM:{i + 1:03d}:y"] = tpl(bpv, "y", c.bpm_y).format(**kw)
    out["orbit:x"] = c.orbit_x.format(prefix=p)
    out["orbit:y"] = c.orbit_y.format(prefix=p)
    rpv = profile.spec.rf.pv
    out["rf:frequency"] = tpl(rpv, "frequency", c.rf_frequency).format(prefix=p)
    out["rf:frequency_rb"] = tpl(rpv, "frequency_rb", c.rf_frequency_rb).format(prefix=p)
    out["rf:voltage"] = tpl(rpv, "voltage", c.rf_voltage).format(prefix=p)
    out["tune:x"] = c.tune_x.format(prefix=p)
    out["tune:y"] = c.tune_y.format(prefix=p)
    out["beam:current"] = c.beam_current.format(prefix=p)
    out["beam:lifetime"] = c.beam_lifetime.format(prefix=p)
    return out


class EpicsBackend:
    """Makes the signals of every device from EPICS PVs (``ca`` by default, or ``pva``).

    Args:
        profile: the profile whose templates name the PVs.
        prefix: PV prefix (default: the profile's ``controls.prefix``).
        protocol: ``"ca"`` or ``"pva"``.
        timeout: connection and read timeout [s].
        put_timeout: put timeout [s] (a put completes once the IOC has processed it; default ``max(timeout, 10)``).
    """

    mode = "epics"
    #: Devices stage their signals (camonitor subscriptions): reads in a staged plan come from the monitors.
    stage_signals = True

    def __init__(self, profile: Profile, prefix: str | None = None, protocol: str = "ca", timeout: float = 5.0,
                 put_timeout: float | None = None):
        if protocol not in ("ca", "pva"):
            raise ValueError(f"protocol must be 'ca' or 'pva', got {protocol!r}")
        self.profile = profile
        self.twin = None
        self.prefix = profile.spec.controls.prefix if prefix is None else prefix
        self.pvs = pv_names(profile, prefix)
        self.protocol = protocol
        self.timeout = timeout
        self.put_timeout = max(timeout, 10.0) if put_timeout is None else put_timeout

    def _backend(self, datatype, key: str, write_key: str | None = None) -> TimedSignalBackend:
        from ophyd_async.epics.core import CaSignalBackend, PvaSignalBackend

        read_pv, write_pv = self.pvs[key], self.pvs[write_key or key]
        cls = CaSignalBackend if self.protocol == "ca" else PvaSignalBackend
        return TimedSignalBackend(cls(datatype, read_pv, write_pv), read_pv, write_pv, self.timeout,
                                  self.put_timeout)

    def _r(self, datatype, key: str) -> SignalR:
        return SignalR(self._backend(datatype, key), timeout=None)

    def _rw(self, datatype, key: str, write_key: str | None = None) -> SignalRW:
        return SignalRW(self._backend(datatype, key, write_key), timeout=None)

    @staticmethod
    def _put(signal: SignalRW) -> Callable[[Any], Any]:
        async def put(value) -> None:
            await signal.set(value, timeout=None)

        return put

    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        return self._rw(float, f"{family}:{index + 1:03d}:setpoint")

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        return self._r(float, f"{family}:{index + 1:03d}:readback")

    def family_setpoints(self, family: str) -> SignalRW[Array1D[np.float64]]:
        return self._rw(Array1D[np.float64], f"{family}:setpoints")

    def family_readbacks(self, family: str) -> SignalR[Array1D[np.float64]]:
        return self._r(Array1D[np.float64], f"{family}:readbacks")

    def magnet_put(self, family: str, index: int, signal: SignalRW):
        return self._put(signal)

    def family_put(self, family: str, signal: SignalRW):
        return self._put(signal)

    def orbit(self, plane: str) -> SignalR[Array1D[np.float64]]:
        return self._r(Array1D[np.float64], f"orbit:{plane}")

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        return self._r(float, f"BPM:{index + 1:03d}:{plane}")

    def rf_frequency(self) -> SignalRW[float]:
        return self._rw(float, "rf:frequency_rb", "rf:frequency")

    def rf_put(self, signal: SignalRW):
        return self._put(signal)

    def rf_voltage(self) -> SignalRW[float]:
        return self._rw(float, "rf:voltage")

    def tune(self, plane: str) -> SignalR[float]:
        return self._r(float, f"tune:{plane}")

    def beam_current(self) -> SignalR[float]:
        return self._r(float, "beam:current")

    def beam_lifetime(self) -> SignalR[float]:
        return self._r(float, "beam:lifetime")

    # --- tbt: the beam devices, on the PVs of ``controls.beam_pvs`` (none when the profile has no such PVs) ------
    @property
    def beam_devices(self) -> bool:
        """The control system serves the beam devices' PVs (the profile says ``controls.beam_pvs``)."""
        return self.profile.spec.controls.beam_pvs is not None

    def _beam_key(self, key: str) -> str:
        spec = self.profile.spec.controls.beam_pvs
        if spec is None:
            raise ValueError(f"{self.profile.name}: no controls.beam_pvs in the profile: the control system serves no "
                             "BPM acquisition mode, pinger, injection or loss-monitor PVs")
        name = f"beam:{key}"
        if name not in self.pvs:
            self.pvs[name] = getattr(spec, key).format(prefix=self.prefix)
        return name

    def bpm_mode(self) -> SignalRW[str]:
        return self._rw(str, self._beam_key("bpm_mode"))

    def bpm_turns(self) -> SignalRW[int]:
        return self._rw(int, self._beam_key("bpm_turns"))

    def tbt(self, plane: str) -> SignalR[Array1D[np.float64]]:
        """Waveform of n_bpm x turns readings [m], BPM after BPM (reshaped by the reader)."""
        return self._r(Array1D[np.float64], self._beam_key(f"tbt_{plane}"))

    def _trigger(self, key: str) -> Callable[[], Any]:
        sig = self._rw(int, self._beam_key(key))
        self._triggers = getattr(self, "_triggers", {})
        self._triggers[key] = sig

        async def fire() -> None:
            await sig.set(1, timeout=None)

        fire.signal = sig  # type: ignore[attr-defined] - the device adds it as a child (connected with it)
        return fire

    def bpm_acquire(self) -> Callable[[], Any]:
        return self._trigger("bpm_acquire")

    def pinger_kick(self, plane: str) -> SignalRW[float]:
        return self._rw(float, self._beam_key(f"pinger_{plane}"))

    def pinger_fire(self) -> Callable[[], Any]:
        return self._trigger("pinger_fire")

    def injection_trim(self, knob: str) -> SignalRW[float]:
        return self._rw(float, self._beam_key(f"injection_{knob}"))

    def injection_fire(self) -> Callable[[], Any]:
        return self._trigger("injection_fire")

    def loss(self, what: str) -> SignalR:
        kinds = {"turn": ("loss_turn", int), "element": ("loss_element", int), "element_name": ("loss_element_name", str),
                 "s": ("loss_s", float), "bpms": ("loss_bpms", int), "turns": ("loss_turns", float),
                 "transmission": ("loss_transmission", float)}
        key, dtype = kinds[what]
        return self._r(dtype, self._beam_key(key))
    # --- end tbt ---
