"""The twin served as Tango devices (pytango), without a Tango database.

Devices and attributes, named by the profile's Tango templates (:func:`~acc_bluesky.devices.backends.tango_names`):

- ``PowerSupply`` per magnet: ``CurrentSetpoint`` (read-write, A: min/max value = the profile's limits; its write
  value follows the twin's setpoint, also after a family write) and ``Current`` (the delivered current);
  state ON, MOVING while a ramped supply ramps, ALARM when stuck, FAULT when dead or tripped;
- ``MagnetFamily`` per family: ``CurrentSetpoints`` (spectrum, read-write: one write sets the family, one
  recomputation) and ``Currents``; FAULT when tripped, ALARM when one of its supplies is dead or stuck;
- ``Bpm`` per BPM: ``X``, ``Y`` [m] (INVALID quality, no value, when dead or without beam); FAULT when dead;
- ``Orbit``: ``X``, ``Y`` spectra [m] (WARNING quality when some BPMs read nothing, INVALID without beam) and their
  rms ``XRms``, ``YRms`` [m] with alarm levels; ``RfCavity``: ``Frequency`` [Hz], ``Voltage`` [V] (min/max value);
  ``TuneMonitor``: ``Qx``, ``Qy``; ``BeamCurrent``: ``Current`` [A], ``Lifetime`` [s] with alarm levels (ALARM
  state below them, as Tango devices report an attribute in alarm);
- ``TwinControl`` (``{domain}/twin/control``): ``Cmd`` (the IOC's anomaly commands, with ``--allow-faults``),
  ``Anomalies``, ``LastError``, ``Refused``, ``Published``, ``Heartbeat``, ``Uptime`` ...; ALARM while anomalies
  are active.

How a write travels: Tango refuses a value past the attribute's min/max value itself (``API_WAttrOutsideLimit``,
"above the maximum authorized"; a write of the limit itself passes); the server refuses NaN and a family array of
the wrong length (``ACC_WriteRefused``, naming the device, the value and what was expected; ``LastError`` says
it too). An accepted write is queued and waits (the device monitor released meanwhile). One publisher thread owns
the twin: it applies every queued write at once, recomputes once, updates what the attributes read, pushes change
events (the changed setpoints and readbacks; orbit, BPMs, tunes and beam where a client subscribed), then lets the
writes return. So a write returns when the orbit attributes already show its effect, and many writes cost one
recomputation. Publications are rate limited (``max_rate``); when nothing changes, the BPMs are republished at
``idle_rate`` with fresh noise.

The server runs without a Tango database (``-nodb -dlist Class::device,...``): clients reach its devices as
``tango://HOST:PORT/domain/family/member#dbase=no``, and each device sets its attributes' configuration itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tango
from tango import AttrQuality, AttrWriteType, CmdArgType, DevState, EventType
from tango.server import Device, attribute, command

from ..devices.backends.tango import bpm_key, magnet_key, split_attribute, tango_names
from ..ioc.commands import COMMAND_HELP, CommandError, apply_command, parse_command
from ..ioc.observe import Observation, Observer
from ..profile import Limits, Profile
from ..twin import Twin
from .names import TWIN_ATTRIBUTES, orbit_rms_names, twin_device_name

__all__ = ["TwinTangoServer", "READY_MESSAGE", "SERVER_NAME", "AttrSpec", "default_alarms"]

log = logging.getLogger(__name__)

#: First words of the line printed on stdout once the server serves its devices.
READY_MESSAGE = "Tango server ready"
#: Tango server (executable) name of the twin's device server.
SERVER_NAME = "AccBlueskyTwin"

_VALID, _INVALID, _ALARM, _WARNING = (AttrQuality.ATTR_VALID, AttrQuality.ATTR_INVALID, AttrQuality.ATTR_ALARM,
                                      AttrQuality.ATTR_WARNING)
_ROLE_CLASS = {"magnet": "PowerSupply", "family": "MagnetFamily", "bpm": "Bpm", "orbit": "Orbit", "rf": "RfCavity",
               "tune": "TuneMonitor", "beam": "BeamCurrent"}
_STATE_RANK = {DevState.ON: 0, DevState.MOVING: 1, DevState.ALARM: 2, DevState.FAULT: 3}


def default_alarms(profile: Profile) -> dict[str, tuple[float | None, float | None, float | None, float | None]]:
    """Alarm levels ``(min_alarm, min_warning, max_warning, max_alarm)`` of the beam current [A], lifetime [s] and
    orbit rms [m]: the profile's ``controls.alarms`` (LOLO, LOW, HIGH, HIHI of the IOC) where it has them, else
    the IOC's defaults."""
    spec = getattr(profile.spec.controls, "alarms", None)
    defaults = {"beam_current": (1.0e-3, None, None, None), "beam_lifetime": (600.0, 3600.0, None, None),
                "orbit_rms_x": (None, None, 2.0e-3, 5.0e-3), "orbit_rms_y": (None, None, 1.0e-3, 2.5e-3)}
    out = {}
    for key, value in defaults.items():
        lim = getattr(spec, key, None) if spec is not None else None
        out[key] = value if lim is None else (lim.lolo, lim.low, lim.high, lim.hihi)
    return out


@dataclass
class AttrSpec:
    """One served attribute: its key in the names table, where it lives, what it is."""

    key: str
    device: str
    name: str
    role: str
    writable: bool = False
    length: int | None = None  # spectrum length; None: scalar
    units: str = ""
    fmt: str = "%.6f"
    description: str = ""
    label: str = ""
    limits: Limits | None = None
    alarms: tuple[float | None, float | None, float | None, float | None] = (None, None, None, None)
    family: str | None = None
    index: int | None = None
    plane: str | None = None
    what: str = ""  # setpoint / readback / x / y / frequency ...
    merged: list[str] = field(default_factory=list)  # the other "what"s this attribute serves (a setpoint's readback)


@dataclass
class DeviceLayout:
    name: str
    tango_class: str
    attrs: list[AttrSpec] = field(default_factory=list)


def build_layout(twin: Twin, names: dict[str, str], twin_device: str) -> dict[str, DeviceLayout]:
    """Devices of the server (by lower-case name) and their attributes, from the names table."""
    prof = twin.profile
    alarms = default_alarms(prof)
    specs: list[AttrSpec] = []
    for fname in twin.family_names:
        fam = prof.families[fname]
        fspec = fam.spec
        n = len(fam.element_names)
        u = fspec.units
        for i in range(n):
            dev = fam.device_names[i]
            where = f"{dev} ({fam.element_names[i]}, {fname})"
            specs.append(AttrSpec(magnet_key(fname, i, "setpoint"), "", "", "magnet", True, None, u, "%.6f",
                                  f"power-supply setpoint of {where}", f"{dev} setpoint", fspec.limits,
                                  family=fname, index=i, what="setpoint"))
            specs.append(AttrSpec(magnet_key(fname, i, "readback"), "", "", "magnet", False, None, u, "%.6f",
                                  f"current delivered to {where}", f"{dev} current", family=fname, index=i,
                                  what="readback"))
        specs.append(AttrSpec(f"{fname}:setpoints", "", "", "family", True, n, u, "%.6f",
                              f"setpoints of every magnet of {fname}, in the order of its device names",
                              f"{fname} setpoints", fspec.limits, family=fname, what="setpoints"))
        specs.append(AttrSpec(f"{fname}:readbacks", "", "", "family", False, n, u, "%.6f",
                              f"currents delivered to every magnet of {fname}", f"{fname} currents", family=fname,
                              what="readbacks"))
    nb = len(prof.bpm_refpts)
    for i, bname in enumerate(prof.bpm_names):
        for plane in "xy":
            specs.append(AttrSpec(bpm_key(i, plane), "", "", "bpm", False, None, "m", "%.9f",
                                  f"{'horizontal' if plane == 'x' else 'vertical'} beam position at {bname}",
                                  f"{bname} {plane}", index=i, plane=plane, what=plane))
    rms = orbit_rms_names(names)
    for plane in "xy":
        specs.append(AttrSpec(f"orbit:{plane}", "", "", "orbit", False, nb, "m", "%.9f",
                              f"closed orbit {plane} at every BPM, in the order of the profile's BPM names",
                              f"orbit {plane}", plane=plane, what=plane))
        specs.append(AttrSpec(f"orbit:{plane}_rms", "", "", "orbit", False, None, "m", "%.9f",
                              f"rms of the orbit {plane} over the BPMs that read", f"orbit {plane} rms",
                              alarms=alarms[f"orbit_rms_{plane}"], plane=plane, what="rms"))
    rf = prof.spec.rf
    specs += [
        AttrSpec("rf:frequency", "", "", "rf", True, None, "Hz", "%.3f", "RF frequency (setpoint, read back)",
                 "RF frequency", rf.frequency_limits, what="frequency"),
        AttrSpec("rf:frequency_rb", "", "", "rf", False, None, "Hz", "%.3f", "RF frequency read back",
                 "RF frequency", what="frequency"),
        AttrSpec("rf:voltage", "", "", "rf", True, None, "V", "%.1f", "total RF accelerating voltage",
                 "RF voltage", rf.voltage_limits, what="voltage"),
        AttrSpec("tune:x", "", "", "tune", False, None, "", "%.6f", "horizontal fractional tune", "Qx", plane="x",
                 what="x"),
        AttrSpec("tune:y", "", "", "tune", False, None, "", "%.6f", "vertical fractional tune", "Qy", plane="y",
                 what="y"),
        AttrSpec("beam:current", "", "", "beam", False, None, "A", "%.6f", "stored beam current", "beam current",
                 alarms=alarms["beam_current"], what="current"),
        AttrSpec("beam:lifetime", "", "", "beam", False, None, "s", "%.0f", "beam lifetime", "beam lifetime",
                 alarms=alarms["beam_lifetime"], what="lifetime"),
    ]
    table = names | rms
    layout: dict[str, DeviceLayout] = {}
    by_attr: dict[str, AttrSpec] = {}
    for s in specs:
        s.device, s.name = split_attribute(table[s.key])
        full = f"{s.device}/{s.name}".lower()
        if full in by_attr:  # a setpoint and its readback on one read-write attribute (may_share)
            other = by_attr[full]
            other.writable = other.writable or s.writable
            other.limits = other.limits or s.limits
            other.merged.append(s.what)
            if s.what in ("readback", "readbacks"):  # it reads what the supply delivers, as a real one does
                other.merged[-1], other.what = other.what, s.what
                other.description = s.description.replace("current delivered to", "power supply of") + \
                    " (write value: the setpoint)"
            continue
        by_attr[full] = s
        dev = layout.setdefault(s.device.lower(), DeviceLayout(s.device, _ROLE_CLASS[s.role]))
        dev.attrs.append(s)
    if twin_device.lower() in layout:
        raise ValueError(f"the twin control device {twin_device!r} is also a machine device: change "
                         "controls.tango_domain or the Tango templates")
    layout[twin_device.lower()] = DeviceLayout(twin_device, "TwinControl")
    return layout


def attribute_properties(s: AttrSpec) -> dict[str, str]:
    """The attribute's configuration: units, format, description, label, min/max value, alarm levels."""
    p = {"format": s.fmt, "description": s.description, "label": s.label or s.name}
    if s.units:
        p["unit"] = s.units
    if s.limits is not None and s.writable:
        if np.isfinite(s.limits.low):
            p["min_value"] = repr(float(s.limits.low))
        if np.isfinite(s.limits.high):
            p["max_value"] = repr(float(s.limits.high))
    lolo, low, high, hihi = s.alarms
    for value, prop in ((lolo, "min_alarm"), (low, "min_warning"), (high, "max_warning"), (hihi, "max_alarm")):
        if value is not None:
            p[prop] = repr(float(value))
    return p


def _configure(attr, s: AttrSpec) -> None:
    """Set the attribute's configuration on this device (Tango shares a dynamic attribute's default properties
    among the devices of a class: each device sets its own; without a database nothing is stored)."""
    p = attr.get_properties()
    for key, value in attribute_properties(s).items():
        setattr(p, key, value)
    attr.set_properties(p)


def _alarm_quality(value: float, alarms) -> AttrQuality:
    if not np.isfinite(value):
        return _INVALID
    lolo, low, high, hihi = alarms
    if (lolo is not None and value < lolo) or (hihi is not None and value > hihi):
        return _ALARM
    if (low is not None and value < low) or (high is not None and value > high):
        return _WARNING
    return _VALID


def _rms(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


class _Put:
    __slots__ = ("apply", "future", "what")

    def __init__(self, apply: Callable[[], str | None], what: str):
        self.apply = apply
        self.what = what
        self.future: concurrent.futures.Future = concurrent.futures.Future()


def _refuse(reason: str, desc: str, origin: str) -> None:
    tango.Except.throw_exception(reason, desc, origin)


#: The server a device of this process belongs to (Tango makes the devices; one server per process).
_SERVER: TwinTangoServer | None = None


class _TwinDevice(Device):
    """A device of the twin: dynamic attributes from the server's layout, state and status from the twin."""

    def init_device(self):
        super().init_device()
        self._server = _SERVER
        self._layout = self._server.layout[self.get_name().lower()]
        self._specs = {a.name.lower(): a for a in self._layout.attrs}
        self._server.register(self)
        self.set_state(DevState.ON)

    def initialize_dynamic_attributes(self):
        for s in self._layout.attrs:
            rw = AttrWriteType.READ_WRITE if s.writable else AttrWriteType.READ
            if s.length is None:
                a = tango.Attr(s.name, CmdArgType.DevDouble, rw)
            else:
                a = tango.SpectrumAttr(s.name, CmdArgType.DevDouble, rw, max(1, s.length))
            self.add_attribute(a, self._read, self._write if s.writable else None)
            _configure(self.get_device_attr().get_attr_by_name(s.name), s)
            self.set_change_event(s.name, True, False)

    def _read(self, attr):
        s = self._specs[attr.get_name().lower()]
        value, quality = self._server.value(s)
        attr.set_value_date_quality(value, self._server.stamp, quality)

    def _write(self, attr):
        s = self._specs[attr.get_name().lower()]
        self._server.write(self, s, attr.get_write_value())

    def dev_state(self):
        return self._server.state_of(self.get_name())[0]

    def dev_status(self):
        return self._server.state_of(self.get_name())[1]


class PowerSupply(_TwinDevice):
    """One magnet power supply of the twin: ``CurrentSetpoint`` [A] (read-write) and ``Current`` [A]."""


class MagnetFamily(_TwinDevice):
    """Every supply of one magnet family: ``CurrentSetpoints`` and ``Currents`` spectra [A]."""


class Bpm(_TwinDevice):
    """One beam position monitor: ``X``, ``Y`` [m]."""


class Orbit(_TwinDevice):
    """The closed orbit at every BPM: ``X``, ``Y`` spectra [m] and their rms."""


class RfCavity(_TwinDevice):
    """RF: ``Frequency`` [Hz] and ``Voltage`` [V]."""


class TuneMonitor(_TwinDevice):
    """Fractional tunes ``Qx``, ``Qy``."""


class BeamCurrent(_TwinDevice):
    """Stored beam ``Current`` [A] and ``Lifetime`` [s]."""


class TwinControl(Device):
    """The twin itself: anomaly commands (``Cmd``, with ``--allow-faults``), counters, last refused write."""

    def init_device(self):
        super().init_device()
        self._server = _SERVER
        self._server.register(self)
        self.set_state(DevState.ON)
        for name in ("Published", "Version", "Anomalies", "BeamLost", "LastError", "Refused", "Heartbeat"):
            self.set_change_event(name, True, False)

    def dev_state(self):
        return self._server.state_of(self.get_name())[0]

    def dev_status(self):
        return self._server.state_of(self.get_name())[1]

    @attribute(dtype=str, doc=TWIN_ATTRIBUTES["Anomalies"])
    def Anomalies(self):  # noqa: N802 - Tango attribute names
        return self._server.anomalies_json

    @attribute(dtype=str, doc=TWIN_ATTRIBUTES["LastError"])
    def LastError(self):  # noqa: N802
        return self._server.last_error

    @attribute(dtype=int, doc=TWIN_ATTRIBUTES["Refused"])
    def Refused(self):  # noqa: N802
        return self._server.refused

    @attribute(dtype=bool, doc=TWIN_ATTRIBUTES["BeamLost"])
    def BeamLost(self):  # noqa: N802
        return bool(self._server.obs.lost)

    @attribute(dtype=str, doc=TWIN_ATTRIBUTES["LossReason"])
    def LossReason(self):  # noqa: N802
        return self._server.obs.loss_reason

    @attribute(dtype=CmdArgType.DevLong64, doc=TWIN_ATTRIBUTES["Version"])
    def Version(self):  # noqa: N802
        return int(self._server.obs.version)

    @attribute(dtype=CmdArgType.DevLong64, doc=TWIN_ATTRIBUTES["Published"])
    def Published(self):  # noqa: N802
        return int(self._server.published)

    @attribute(dtype=CmdArgType.DevLong64, doc=TWIN_ATTRIBUTES["Solves"])
    def Solves(self):  # noqa: N802
        return int(self._server.twin.stats.get("solves", 0))

    @attribute(dtype=float, unit="ms", format="%.2f", doc=TWIN_ATTRIBUTES["CycleTime"])
    def CycleTime(self):  # noqa: N802
        return self._server.cycle_ms

    @attribute(dtype=float, unit="Hz", format="%.2f", doc=TWIN_ATTRIBUTES["Rate"])
    def Rate(self):  # noqa: N802
        return self._server.rate

    @attribute(dtype=int, doc=TWIN_ATTRIBUTES["Seed"])
    def Seed(self):  # noqa: N802
        return -1 if self._server.twin.seed is None else int(self._server.twin.seed)

    @attribute(dtype=CmdArgType.DevLong64, doc=TWIN_ATTRIBUTES["Heartbeat"])
    def Heartbeat(self):  # noqa: N802
        return int(self._server.heartbeat)

    @attribute(dtype=float, unit="s", format="%.1f", doc=TWIN_ATTRIBUTES["Uptime"])
    def Uptime(self):  # noqa: N802
        return time.monotonic() - self._server.started

    @attribute(dtype=bool, doc=TWIN_ATTRIBUTES["FaultsAllowed"])
    def FaultsAllowed(self):  # noqa: N802
        return bool(self._server.allow_faults)

    @command(dtype_in=str, dtype_out=str, doc_in=COMMAND_HELP, doc_out="what was done")
    def Cmd(self, text):  # noqa: N802
        return self._server.command(self, text)


_CLASSES = {c.__name__: c for c in (PowerSupply, MagnetFamily, Bpm, Orbit, RfCavity, TuneMonitor, BeamCurrent,
                                     TwinControl)}


class TwinTangoServer:
    """Serves one :class:`~acc_bluesky.twin.Twin` as Tango devices (one per process: Tango makes the devices).

    Args:
        twin: the twin (the publisher thread owns it from :meth:`serve` on).
        domain: Tango domain (default: the profile's ``controls.tango_domain``).
        allow_faults: let ``TwinControl.Cmd`` inject faults (off: the command refuses).
        max_rate: highest publication rate [Hz] (writes arriving meanwhile join the next publication).
        idle_rate: republication rate [Hz] with fresh BPM and tune noise when nothing changes; 0 disables it.
        put_timeout: longest time [s] a write waits for the publication that shows its effect.
    """

    def __init__(self, twin: Twin, domain: str | None = None, *, allow_faults: bool = False, max_rate: float = 50.0,
                 idle_rate: float = 2.0, put_timeout: float = 30.0):
        if max_rate <= 0:
            raise ValueError(f"max_rate must be > 0 Hz, got {max_rate}")
        if idle_rate < 0:
            raise ValueError(f"idle_rate must be >= 0 Hz, got {idle_rate}")
        self.twin = twin
        self.profile = twin.profile
        self.domain = self.profile.spec.controls.tango_domain if domain is None else domain
        self.names = tango_names(self.profile, self.domain)
        self.twin_device = twin_device_name(self.profile, self.domain)
        self.layout = build_layout(twin, self.names, self.twin_device)
        self.allow_faults = bool(allow_faults)
        self.max_rate, self.idle_rate, self.put_timeout = float(max_rate), float(idle_rate), float(put_timeout)
        self.observer = Observer(twin)
        self.obs: Observation = self.observer.observe()
        self.stamp = time.time()
        self._derived(self.obs)
        self._states: dict[str, tuple[DevState, str]] = {}
        self._compute_states()
        self.devices: dict[str, Any] = {}
        self._pending: list[_Put] = []
        self._plock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self.refused = 0
        self.last_error = ""
        self.heartbeat = 0
        self.cycle_ms = 0.0
        self.rate = 0.0
        self.started = time.monotonic()
        self.anomalies_json = json.dumps(self.twin.anomalies.active())
        self._times: deque[float] = deque(maxlen=50)
        self.cycle_times: deque[float] = deque(maxlen=1000)  # [s], for benchmarks
        self._last_sp = {n: v.copy() for n, v in self.obs.setpoints.items()}
        self._last_rb = {n: v.copy() for n, v in self.obs.readbacks.items()}
        self._last_rf = (self.obs.rf_frequency, self.obs.rf_voltage)
        # (family, index, what) / (family, what) -> (device, attribute, whether the attribute reads that value)
        self._magnet_attrs: dict[tuple[str, int, str], tuple[str, str, bool]] = {}
        self._family_attrs: dict[tuple[str, str], tuple[str, str, bool]] = {}
        self._live: list[tuple[str, AttrSpec]] = []  # pushed at every publication (noise changes them)
        self._rf_attrs: list[tuple[str, AttrSpec]] = []
        for dkey, dl in self.layout.items():
            for s in dl.attrs:
                if s.role == "magnet":
                    for what in (s.what, *s.merged):
                        self._magnet_attrs[(s.family, s.index, what)] = (dkey, s.name, what == s.what)
                elif s.role == "family":
                    for what in (s.what, *s.merged):
                        self._family_attrs[(s.family, what)] = (dkey, s.name, what == s.what)
                elif s.role == "rf":
                    self._rf_attrs.append((dkey, s))
                else:
                    self._live.append((dkey, s))

    @property
    def n_devices(self) -> int:
        return len(self.layout)

    @property
    def n_attributes(self) -> int:
        return sum(len(d.attrs) for d in self.layout.values()) + len(TWIN_ATTRIBUTES)

    def register(self, device) -> None:
        self.devices[device.get_name().lower()] = device

    # ------------------------------------------------------------------------------------------------------
    # values, quality, states
    def _derived(self, obs: Observation) -> None:
        self.rms = {"x": _rms(obs.x), "y": _rms(obs.y)}

    def value(self, s: AttrSpec) -> tuple[Any, AttrQuality]:
        """What attribute ``s`` reads now, and its quality."""
        o = self.obs
        r = s.role
        if r == "magnet":
            arr = o.setpoints[s.family] if s.what == "setpoint" else o.readbacks[s.family]
            return float(arr[s.index]), _VALID
        if r == "family":
            return (o.setpoints if s.what == "setpoints" else o.readbacks)[s.family], _VALID
        if r == "bpm":
            v = float((o.x if s.plane == "x" else o.y)[s.index])
            return v, (_VALID if np.isfinite(v) else _INVALID)
        if r == "orbit":
            if s.what == "rms":
                v = self.rms[s.plane]
                return v, _alarm_quality(v, s.alarms)
            arr = o.x if s.plane == "x" else o.y
            bad = ~np.isfinite(arr)
            q = _INVALID if (o.lost or bad.all()) else (_WARNING if bad.any() else _VALID)
            return arr, q
        if r == "tune":
            v = float(o.tunes[0 if s.plane == "x" else 1])
            return v, (_VALID if np.isfinite(v) else _INVALID)
        if r == "beam":
            if s.what == "current":
                return float(o.current), _alarm_quality(float(o.current), s.alarms)
            v = float(o.lifetime)
            return v, (_INVALID if o.lost else _alarm_quality(v, s.alarms))
        if r == "rf":
            return float(o.rf_frequency if s.what == "frequency" else o.rf_voltage), _VALID
        raise KeyError(s.key)  # pragma: no cover - build_layout makes only the roles above

    def state_of(self, device: str) -> tuple[DevState, str]:
        return self._states.get(device.lower(), (DevState.ON, "The device is in ON state."))

    def _compute_states(self) -> None:
        t, o = self.twin, self.obs
        an = t.anomalies
        states: dict[str, tuple[DevState, str]] = {}
        for dkey, dl in self.layout.items():
            worst, why = DevState.ON, []
            for s in dl.attrs:
                st, text = self._attr_state(s, o, an)
                if text and text not in why:
                    why.append(text)
                if _STATE_RANK[st] > _STATE_RANK[worst]:
                    worst = st
            if dl.tango_class == "TwinControl":
                active = {k: v for k, v in an.active().items() if v}
                if active:
                    worst, why = DevState.ALARM, [f"active anomalies: {json.dumps(active)}"]
            states[dkey] = (worst, "; ".join(why) if why else "ON: the twin's device works normally")
        self._states = states

    @staticmethod
    def _attr_state(s: AttrSpec, o: Observation, an) -> tuple[DevState, str]:
        if s.role in ("magnet", "family"):
            f = s.family
            if an.is_tripped(f):
                return DevState.FAULT, f"the power supply of family {f} tripped (output 0 A)"
            if s.role == "magnet":
                i = s.index
                if an.is_dead(f, i):
                    return DevState.FAULT, "dead supply: no output whatever the setpoint"
                sp, rb = o.setpoints[f][i], o.readbacks[f][i]
                if an.is_stuck(f, i):
                    return DevState.ALARM, f"stuck supply: delivers {rb:g}, does not follow the setpoint {sp:g}"
                if sp != rb:
                    return DevState.MOVING, f"ramping from {rb:g} to {sp:g}"
                return DevState.ON, ""
            n_dead = sum(an.is_dead(f, i) for i in range(len(o.setpoints[f])))
            n_stuck = sum(an.is_stuck(f, i) for i in range(len(o.setpoints[f])))
            if n_dead or n_stuck:
                return DevState.ALARM, f"{n_dead} dead and {n_stuck} stuck supplies in {f}"
            return DevState.ON, ""
        if s.role == "bpm":
            if s.index in an.dead_bpms:
                return DevState.FAULT, "dead BPM: reads nothing"
            if o.lost:
                return DevState.ALARM, "no beam"
            return DevState.ON, ""
        if s.role in ("orbit", "tune", "beam"):
            if o.lost:
                return DevState.ALARM, f"beam lost ({o.loss_reason})" if o.loss_reason else "beam lost"
            if s.role == "orbit" and s.what != "rms":
                nbad = int(np.count_nonzero(~np.isfinite(o.x if s.plane == "x" else o.y)))
                if nbad:
                    return DevState.ALARM, f"{nbad} BPMs read nothing"
            if s.role in ("orbit", "beam") and s.what in ("rms", "current", "lifetime"):
                v = {"current": o.current, "lifetime": o.lifetime}.get(s.what)
                if v is None:
                    v = _rms(o.x if s.plane == "x" else o.y)
                if _alarm_quality(float(v), s.alarms) == _ALARM:
                    return DevState.ALARM, f"{s.label} {float(v):g} {s.units} beyond its alarm level"
            return DevState.ON, ""
        return DevState.ON, ""

    # ------------------------------------------------------------------------------------------------------
    # writes and commands (Tango request threads)
    def _refuse(self, device: str, what: str, value: Any, why: str) -> None:
        self.refused += 1
        shown = f"<{np.size(value)} values>" if np.ndim(value) else repr(value)
        self.last_error = f"{time.strftime('%H:%M:%S')} {device}/{what}: write {shown} refused: {why}"[:500]
        log.warning(self.last_error)
        _refuse("ACC_WriteRefused", f"{device}/{what}: write {shown} refused: {why}", "TwinTangoServer.write")

    def write(self, device, s: AttrSpec, value: Any) -> None:
        """Check, queue and wait for the publication of one write (the device monitor released meanwhile)."""
        t = self.twin
        if s.role == "magnet":
            fam = self.profile.families[s.family]
            v = float(value)
            try:
                fam.spec.limits.check(fam.device_names[s.index], v, fam.spec.units)
            except ValueError as err:
                self._refuse(s.device, s.name, v, str(err))
            f, i = s.family, s.index
            apply, what = (lambda: t.set_setpoint(f, v, i)), s.key
        elif s.role == "family":
            fam = self.profile.families[s.family]
            v = np.array(value, dtype=float).ravel()
            n = len(fam.element_names)
            if v.shape != (n,):
                self._refuse(s.device, s.name, v, f"expected exactly {n} setpoints [{fam.spec.units}], got {v.size}")
            try:
                fam.spec.limits.check(s.family, v, fam.spec.units, names=fam.device_names)
            except ValueError as err:
                self._refuse(s.device, s.name, v, str(err))
            f = s.family
            apply, what = (lambda: t.set_setpoint(f, v)), s.key
        elif s.role == "rf":
            rf = self.profile.spec.rf
            v = float(value)
            lim = rf.frequency_limits if s.what == "frequency" else rf.voltage_limits
            units = "Hz" if s.what == "frequency" else "V"
            try:
                lim.check(f"RF {s.what}", v, units)
            except ValueError as err:
                self._refuse(s.device, s.name, v, str(err))
            fn = t.set_rf_frequency if s.what == "frequency" else t.set_rf_voltage
            apply, what = (lambda: fn(v)), s.key
        else:  # pragma: no cover - only writable attributes get a write method
            _refuse("ACC_ReadOnly", f"{s.device}/{s.name} is read-only", "TwinTangoServer.write")
        self._wait(device, self.submit(apply, what), f"{s.device}/{s.name}")

    def command(self, device, text: str) -> str:
        """``TwinControl.Cmd``: parse, queue and wait; returns what was done."""
        if not self.allow_faults:
            self.refused += 1
            self.last_error = f"{time.strftime('%H:%M:%S')} Cmd {text!r} refused: fault injection is off"
            _refuse("ACC_FaultsOff", "fault injection is off: start the server with acc-bluesky tango-server "
                    "--allow-faults", "TwinControl.Cmd")
        try:
            cmd = parse_command(text, self.twin)
        except CommandError as err:
            self.refused += 1
            self.last_error = f"{time.strftime('%H:%M:%S')} Cmd {text!r} refused: {err}"[:500]
            _refuse("ACC_BadCommand", str(err), "TwinControl.Cmd")
        fut = self.submit(lambda: apply_command(self.twin, cmd), f"cmd {text!r}")
        return str(self._wait(device, fut, f"{self.twin_device}/Cmd") or "")

    def submit(self, apply: Callable[[], str | None], what: str) -> concurrent.futures.Future:
        """Queue a change for the publisher; the future completes once its effect is published."""
        put = _Put(apply, what)
        with self._plock:
            self._pending.append(put)
        self._wake.set()
        return put.future

    def _wait(self, device, fut: concurrent.futures.Future, where: str):
        with tango.AutoTangoAllowThreads(device):
            try:
                return fut.result(self.put_timeout)
            except concurrent.futures.TimeoutError:
                err = f"not published within {self.put_timeout:g} s (publisher stalled?)"
            except Exception as exc:  # noqa: BLE001 - the twin refused it, or the server is stopping
                err = f"{type(exc).__name__}: {exc}"
        self.refused += 1
        self.last_error = f"{time.strftime('%H:%M:%S')} {where}: {err}"[:500]
        _refuse("ACC_WriteFailed", f"{where}: {err}", "TwinTangoServer")

    # ------------------------------------------------------------------------------------------------------
    # publisher
    def start(self) -> None:
        """Give every setpoint attribute its write value (the twin's setpoint), then start the publisher thread
        (after the devices exist)."""
        if self._thread is not None:
            raise RuntimeError("TwinTangoServer already started")
        o = self.obs
        for (fname, i, what), (dkey, name, _) in self._magnet_attrs.items():
            if what == "setpoint":
                self._set_write_value(dkey, name, float(o.setpoints[fname][i]))
        for (fname, what), (dkey, name, _) in self._family_attrs.items():
            if what == "setpoints":
                self._set_write_value(dkey, name, o.setpoints[fname])
        for dkey, s in self._rf_attrs:
            if s.writable:
                self._set_write_value(dkey, s.name, self.value(s)[0])
        self._thread = threading.Thread(target=self._run, name="twin-tango-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._plock:
            pending, self._pending = self._pending, []
        for put in pending:
            if not put.future.done():
                put.future.set_exception(RuntimeError("server stopping: write not applied"))

    def _run(self) -> None:
        with tango.EnsureOmniThread():
            min_period = 1.0 / self.max_rate
            idle = 1.0 / self.idle_rate if self.idle_rate > 0 else None
            period = min(1.0, idle) if idle else 1.0
            last = time.monotonic()
            beat = last
            while not self._stop.is_set():
                woke = self._wake.wait(period)
                if self._stop.is_set():
                    break
                now = time.monotonic()
                if now - beat >= 1.0:
                    self.heartbeat += 1
                    beat = now
                    self._push(self.twin_device.lower(), "Heartbeat", self.heartbeat)
                if not woke and (idle is None or now - last < idle):
                    continue
                wait = min_period - (time.monotonic() - last)
                if wait > 0:
                    time.sleep(wait)  # rate limit: writes arriving meanwhile join this publication
                self._wake.clear()
                with self._plock:
                    batch, self._pending = self._pending, []
                last = time.monotonic()
                try:
                    self._cycle(batch)
                except Exception as err:  # noqa: BLE001 - keep serving; tell the waiting writes
                    log.exception("publication failed")
                    for put in batch:
                        if not put.future.done():
                            put.future.set_exception(err)

    def _cycle(self, batch: list[_Put]) -> None:
        t0 = time.perf_counter()
        results: list[tuple[_Put, Any, BaseException | None]] = []
        for put in batch:
            try:
                results.append((put, put.apply(), None))
            except Exception as err:  # noqa: BLE001 - a write the twin refuses: that write fails, others go on
                results.append((put, None, err))
        obs = self.observer.observe()
        self._derived(obs)
        self.obs = obs
        self.stamp = time.time()
        self.anomalies_json = json.dumps(self.twin.anomalies.active())
        self._compute_states()
        self._publish(obs)
        for put, result, err in results:
            if put.future.done():
                continue
            if err is None:
                put.future.set_result(result)
            else:
                put.future.set_exception(err)
        dt = time.perf_counter() - t0
        self.cycle_times.append(dt)
        self.cycle_ms = dt * 1e3

    def _push(self, dkey: str, name: str, value: Any, quality: AttrQuality = _VALID, always: bool = True) -> None:
        dev = self.devices.get(dkey)
        if dev is None:
            return
        try:
            if not always and not dev.is_there_subscriber(name, EventType.CHANGE_EVENT):
                return
            dev.push_change_event(name, value, self.stamp, quality)
        except Exception as err:  # noqa: BLE001 - a client's event channel must not stop the publisher
            log.debug("push %s/%s: %s", dkey, name, err)

    def _set_write_value(self, dkey: str, name: str, value: Any) -> None:
        dev = self.devices.get(dkey)
        if dev is not None:
            try:
                dev.get_device_attr().get_w_attr_by_name(name).set_write_value(value)
            except Exception as err:  # noqa: BLE001
                log.debug("write value %s/%s: %s", dkey, name, err)

    def _publish(self, obs: Observation) -> None:
        # setpoints and readbacks: only what changed (a family write shows on the single setpoints, and back)
        for fname, sp in obs.setpoints.items():
            diff = np.nonzero(sp != self._last_sp[fname])[0]
            if diff.size:
                self._last_sp[fname] = sp.copy()
                for i in diff.tolist():
                    where = self._magnet_attrs.get((fname, i, "setpoint"))
                    if where is not None:
                        self._set_write_value(where[0], where[1], float(sp[i]))
                        if where[2]:
                            self._push(where[0], where[1], float(sp[i]))
                where = self._family_attrs.get((fname, "setpoints"))
                if where is not None:
                    self._set_write_value(where[0], where[1], sp)
                    if where[2]:
                        self._push(where[0], where[1], sp)
        for fname, rb in obs.readbacks.items():
            diff = np.nonzero(rb != self._last_rb[fname])[0]
            if diff.size:
                self._last_rb[fname] = rb.copy()
                for i in diff.tolist():
                    where = self._magnet_attrs.get((fname, i, "readback"))
                    if where is not None and where[2]:
                        self._push(where[0], where[1], float(rb[i]))
                where = self._family_attrs.get((fname, "readbacks"))
                if where is not None and where[2]:
                    self._push(where[0], where[1], rb)
        rf = (obs.rf_frequency, obs.rf_voltage)
        if rf != self._last_rf:
            self._last_rf = rf
            for dkey, s in self._rf_attrs:
                v, _ = self.value(s)
                if s.writable:
                    self._set_write_value(dkey, s.name, v)
                self._push(dkey, s.name, v)
        # orbit, BPMs, tunes, beam: fresh at every publication, pushed where a client listens
        for dkey, s in self._live:
            v, q = self.value(s)
            self._push(dkey, s.name, v, q, always=False)
        twin = self.twin_device.lower()
        self._push(twin, "Version", int(obs.version), always=False)
        self._push(twin, "Anomalies", self.anomalies_json, always=False)
        self._push(twin, "BeamLost", bool(obs.lost), always=False)
        now = time.monotonic()
        self._times.append(now)
        if len(self._times) > 1 and now > self._times[0]:
            self.rate = (len(self._times) - 1) / (now - self._times[0])
        self.published += 1
        self._push(twin, "Published", int(self.published), always=False)

    # ------------------------------------------------------------------------------------------------------
    # serving
    def instance_name(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.profile.name.lower()) or "twin"

    def device_list(self) -> str:
        """``-dlist`` of the database-less server: ``Class::device,Class::device,...``."""
        return ",".join(f"{dl.tango_class}::{dl.name}" for dl in self.layout.values())

    def tango_classes(self) -> list[type]:
        used = {dl.tango_class for dl in self.layout.values()}
        return [c for name, c in _CLASSES.items() if name in used]

    def serve(self, port: int, interface: str = "127.0.0.1", on_ready: Callable[[], None] | None = None,
              verbose: bool = False) -> None:
        """Serve until the process is told to stop (SIGINT/SIGTERM): blocks in Tango's server loop."""
        global _SERVER
        if _SERVER is not None and _SERVER is not self:
            raise RuntimeError("one TwinTangoServer per process (Tango makes its devices once)")
        _SERVER = self
        host = "" if interface in ("", "0.0.0.0", "*") else interface

        def post_init() -> None:
            self.started = time.monotonic()
            self.start()
            if on_ready is not None:
                on_ready()

        args = [SERVER_NAME, self.instance_name(), "-ORBendPoint", f"giop:tcp:{host}:{int(port)}", "-nodb",
                "-dlist", self.device_list()]
        if verbose:
            args.append("-v4")
        try:
            tango.server.run(self.tango_classes(), args=args, post_init_callback=post_init, raises=True)
        finally:
            self.stop()
