"""EPICS backend: the same signals on PVs named by the profile's templates (Channel Access).

Every read and put has a timeout: a PV whose IOC died or became unreachable raises :class:`PvUnreachable` naming
the PV within the backend's ``timeout`` (reads) or ``put_timeout`` (puts), instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from ...profile import Profile

__all__ = ["EpicsBackend", "PvUnreachable", "pv_names"]


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


def _timed_ca_backend():
    """A Channel Access signal backend whose reads and puts time out with :class:`PvUnreachable`."""
    from aioca import CANothing, connect
    from ophyd_async.epics.core._aioca import CaSignalBackend

    class TimedCaSignalBackend(CaSignalBackend):
        def __init__(self, datatype, read_pv: str, write_pv: str, timeout: float, put_timeout: float):
            super().__init__(datatype, read_pv, write_pv)
            self.timeout = timeout
            self.put_timeout = put_timeout

        async def _caget(self, pv, format):
            try:
                return await asyncio.wait_for(super()._caget(pv, format), self.timeout)
            except (TimeoutError, CANothing) as err:
                raise _unreachable(pv, "read", self.timeout, err) from err

        async def put(self, value):
            op = f"put of {_short(value)}"
            try:  # a disconnected PV fails within the connection timeout, not the (longer) completion one
                await connect(self.write_pv, timeout=self.timeout)
            except (TimeoutError, CANothing) as err:
                raise _unreachable(self.write_pv, op, self.timeout, err) from err
            try:
                return await asyncio.wait_for(super().put(value), self.put_timeout)
            except (TimeoutError, CANothing) as err:
                raise _unreachable(self.write_pv, op, self.put_timeout, err) from err

    return TimedCaSignalBackend


def _short(value) -> str:
    if isinstance(value, np.ndarray) and value.size > 3:
        return f"<{value.size} values>"
    return repr(value)


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
    """Makes the signals of every device from EPICS PVs (``ca://`` by default).

    Args:
        profile: the profile whose templates name the PVs.
        prefix: PV prefix (default: the profile's ``controls.prefix``).
        protocol: ``"ca"`` (reads and puts time out with :class:`PvUnreachable`) or ``"pva"``.
        timeout: connection and read timeout [s].
        put_timeout: put timeout [s] (a put completes once the IOC has processed it; default ``max(timeout, 10)``).
    """

    mode = "epics"

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
        self._ca = _timed_ca_backend() if protocol == "ca" else None

    def _pv(self, key: str) -> str:
        return f"{self.protocol}://{self.pvs[key]}"

    def _r(self, datatype, key: str) -> SignalR:
        if self._ca is None:
            return epics_signal_r(datatype, self._pv(key), timeout=self.timeout)
        pv = self.pvs[key]
        return SignalR(self._ca(datatype, pv, pv, self.timeout, self.put_timeout), timeout=None)

    def _rw(self, datatype, key: str, write_key: str | None = None) -> SignalRW:
        wkey = write_key or key
        if self._ca is None:
            return epics_signal_rw(datatype, self._pv(key), self._pv(wkey), timeout=self.timeout)
        return SignalRW(self._ca(datatype, self.pvs[key], self.pvs[wkey], self.timeout, self.put_timeout),
                        timeout=None)

    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        return self._rw(float, f"{family}:{index + 1:03d}:setpoint")

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        return self._r(float, f"{family}:{index + 1:03d}:readback")

    def family_setpoints(self, family: str) -> SignalRW[Array1D[np.float64]]:
        return self._rw(Array1D[np.float64], f"{family}:setpoints")

    def family_readbacks(self, family: str) -> SignalR[Array1D[np.float64]]:
        return self._r(Array1D[np.float64], f"{family}:readbacks")

    def orbit(self, plane: str) -> SignalR[Array1D[np.float64]]:
        return self._r(Array1D[np.float64], f"orbit:{plane}")

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        return self._r(float, f"BPM:{index + 1:03d}:{plane}")

    def rf_frequency(self) -> SignalRW[float]:
        return self._rw(float, "rf:frequency_rb", "rf:frequency")

    def rf_voltage(self) -> SignalRW[float]:
        return self._rw(float, "rf:voltage")

    def tune(self, plane: str) -> SignalR[float]:
        return self._r(float, f"tune:{plane}")

    def beam_current(self) -> SignalR[float]:
        return self._r(float, "beam:current")

    def beam_lifetime(self) -> SignalR[float]:
        return self._r(float, "beam:lifetime")
