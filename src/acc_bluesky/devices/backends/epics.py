"""EPICS backend: the same signals on PVs named by the profile's templates (Channel Access)."""

from __future__ import annotations

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from ...profile import Profile

__all__ = ["EpicsBackend", "pv_names"]


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
        for i, ename in enumerate(fam.element_names):
            kw = {"prefix": p, "family": fname, "index": i + 1, "name": ename}
            out[f"{fname}:{i + 1:03d}:setpoint"] = sp_t.format(**kw)
            out[f"{fname}:{i + 1:03d}:readback"] = rb_t.format(**kw)
        out[f"{fname}:setpoints"] = tpl(fam.spec.pv, "setpoints", "{prefix}{family}:I-SP").format(prefix=p, family=fname)
        out[f"{fname}:readbacks"] = tpl(fam.spec.pv, "readbacks", "{prefix}{family}:I-RB").format(prefix=p, family=fname)
    bpv = profile.spec.bpm.pv
    for i in range(len(profile.bpm_refpts)):
        out[f"BPM:{i + 1:03d}:x"] = tpl(bpv, "x", c.bpm_x).format(prefix=p, index=i + 1)
        out[f"BPM:{i + 1:03d}:y"] = tpl(bpv, "y", c.bpm_y).format(prefix=p, index=i + 1)
    out["orbit:x"] = c.orbit_x.format(prefix=p)
    out["orbit:y"] = c.orbit_y.format(prefix=p)
    out["rf:frequency"] = c.rf_frequency.format(prefix=p)
    out["rf:frequency_rb"] = c.rf_frequency_rb.format(prefix=p)
    out["rf:voltage"] = c.rf_voltage.format(prefix=p)
    out["tune:x"] = c.tune_x.format(prefix=p)
    out["tune:y"] = c.tune_y.format(prefix=p)
    out["beam:current"] = c.beam_current.format(prefix=p)
    out["beam:lifetime"] = c.beam_lifetime.format(prefix=p)
    return out


class EpicsBackend:
    """Makes the signals of every device from EPICS PVs (``ca://`` by default)."""

    mode = "epics"

    def __init__(self, profile: Profile, prefix: str | None = None, protocol: str = "ca", timeout: float = 5.0):
        self.profile = profile
        self.twin = None
        self.pvs = pv_names(profile, prefix)
        self.protocol = protocol
        self.timeout = timeout

    def _pv(self, key: str) -> str:
        return f"{self.protocol}://{self.pvs[key]}"

    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        k = f"{family}:{index + 1:03d}"
        return epics_signal_rw(float, self._pv(f"{k}:setpoint"), timeout=self.timeout)

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        return epics_signal_r(float, self._pv(f"{family}:{index + 1:03d}:readback"), timeout=self.timeout)

    def family_setpoints(self, family: str) -> SignalRW[Array1D[np.float64]]:
        return epics_signal_rw(Array1D[np.float64], self._pv(f"{family}:setpoints"), timeout=self.timeout)

    def family_readbacks(self, family: str) -> SignalR[Array1D[np.float64]]:
        return epics_signal_r(Array1D[np.float64], self._pv(f"{family}:readbacks"), timeout=self.timeout)

    def orbit(self, plane: str) -> SignalR[Array1D[np.float64]]:
        return epics_signal_r(Array1D[np.float64], self._pv(f"orbit:{plane}"), timeout=self.timeout)

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        return epics_signal_r(float, self._pv(f"BPM:{index + 1:03d}:{plane}"), timeout=self.timeout)

    def rf_frequency(self) -> SignalRW[float]:
        return epics_signal_rw(float, self._pv("rf:frequency_rb"), self._pv("rf:frequency"), timeout=self.timeout)

    def rf_voltage(self) -> SignalRW[float]:
        return epics_signal_rw(float, self._pv("rf:voltage"), timeout=self.timeout)

    def tune(self, plane: str) -> SignalR[float]:
        return epics_signal_r(float, self._pv(f"tune:{plane}"), timeout=self.timeout)

    def beam_current(self) -> SignalR[float]:
        return epics_signal_r(float, self._pv("beam:current"), timeout=self.timeout)

    def beam_lifetime(self) -> SignalR[float]:
        return epics_signal_r(float, self._pv("beam:lifetime"), timeout=self.timeout)
