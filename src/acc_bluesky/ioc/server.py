"""The twin served as a live EPICS IOC (pythonSoftIOC, Channel Access; PV Access on request).

Records, named by the profile's templates (:func:`acc_bluesky.devices.pv_names`), every one with DESC, units,
precision and display range (control range on setpoints):

- per magnet: setpoint ``ao`` (LOPR/HOPR = limits, DRVL/DRVH one ulp outside them) and readback ``ai``;
- per family: the setpoints waveform (sets the whole family in one put) and the readbacks waveform;
- per BPM ``x``/``y`` ``ai`` and the whole orbit as two waveforms [m], display range the aperture; the orbit rms
  [m]; RF frequency setpoint/readback [Hz] and voltage [V]; tunes; beam current [A] and lifetime [s]; the orbit
  rms, the current and the lifetime carry the profile's alarm limits (``controls.alarms``);
- the twin's own PVs (:func:`~acc_bluesky.ioc.names.twin_pv_names`): status counters, heartbeat and uptime, and
  with ``allow_faults`` the fault-injection command ``TWIN:CMD`` (:mod:`~acc_bluesky.ioc.commands`).

How a put travels: the record's ``validate`` callback refuses anything outside the profile's limits or not
finite: the old value stays, the put fails at its client (CA put-callback ``ECA_PUTFAIL``, PVA error) and the
record shows a MINOR alarm (HW_LIMIT, or WRITE for a value that is not a number or a waveform of the wrong length)
until its next put. An accepted value is queued and the put stays *in progress*. One publisher thread owns the
twin: it takes every queued put at once, applies them in arrival order (cheap), recomputes the observables once
(only if the twin's ``version`` changed), publishes, and then completes the queued puts. So a put-callback
(``caput -w``, ophyd-async ``set``) returns when the orbit PVs already show its effect, and many puts cost one
recomputation. Publications are rate limited (``max_rate``); when nothing changes the BPMs are republished at
``idle_rate`` with fresh noise, without recomputing.

Every put reaches the twin, a put equal to the value shown included (``always_update``). The setpoint records
show the twin's setpoints without being processed (no ``validate``, no ``on_update``): after each batch the
publisher compares what every record of the touched families shows with the twin and updates those that differ;
a record busy with a put is left alone and compared again once it is idle. So a record's ``on_update`` only ever
sees a client's put, never the twin's own state coming back.

Per-BPM and per-magnet readback ``ai`` records are plain EPICS soft records reading one element of the orbit or
readback waveform (``PV.[i]`` link filters), processed by a fanout tree from the waveform: the IOC's Python side
sets a few waveforms per publication, not thousands of scalars. A NaN element gives that ``ai`` an INVALID (UDF)
alarm; a lost beam also marks the orbit, tune, orbit rms and lifetime PVs INVALID, and the current (0 A) falls
below its LOLO limit (MAJOR).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import pv_names
from ..profile import Limits
from ..twin import Twin
from .autosave import PvRow, save, snapshot, write_pv_list
from .commands import CommandError, apply_command, parse_command
from .names import FAULT_KEYS, bpm_pv, magnet_pv, orbit_rms_pv_names, twin_pv_names
from .observe import Observation, Observer

__all__ = ["TwinIoc", "READY_MESSAGE"]

log = logging.getLogger(__name__)

#: First words of the line printed on stdout once the IOC serves its PVs.
READY_MESSAGE = "IOC ready"

_FAN = 16  # links per fanout record (LNK0..LNKF)
_MAX_NAME = 60  # EPICS record names
_MINOR = 1  # severity; statuses (alarm.h, softioc.alarm):
_WRITE, _HW_LIMIT = 2, 11


def _drive_limits(lim: Limits) -> dict[str, float]:
    """DRVL/DRVH one ulp (at least 1e-300) outside the limits (so the record's clamp never turns an illegal put
    into a legal one: validate sees the clamped value, still outside, and refuses it) and LOPR/HOPR on them."""
    out: dict[str, float] = {}
    if np.isfinite(lim.low):
        out["DRVL"] = float(lim.low - max(np.spacing(abs(lim.low)), 1e-300))
        out["LOPR"] = float(lim.low)
    if np.isfinite(lim.high):
        out["DRVH"] = float(lim.high + max(np.spacing(abs(lim.high)), 1e-300))
        out["HOPR"] = float(lim.high)
    return out


def _display(lim: Limits, around) -> dict[str, float]:
    """LOPR/HOPR: the limits where finite, otherwise a range around the present value(s)."""
    span = max(2.0 * float(np.max(np.abs(np.atleast_1d(around)))), 1.0)
    return {"LOPR": float(lim.low) if np.isfinite(lim.low) else -span,
            "HOPR": float(lim.high) if np.isfinite(lim.high) else span}


def _clamped(err: Exception, value: float, lim: Limits, units: str) -> str:
    """The refusal message: the record clamps a put beyond DRVL/DRVH before validation, so say so plainly."""
    if np.isfinite(value) and (value > lim.high or value < lim.low):
        return (f"outside the limits [{lim.low:g}, {lim.high:g}] {units} (clamped by the record to "
                f"{value!r}, then refused); the setpoint did not change")
    return str(err)


def _alarm_fields(spec) -> dict[str, Any]:
    """HIHI/HIGH/LOW/LOLO, their severities and HYST of an ``ai`` from the profile's :class:`AlarmLimits`."""
    out: dict[str, Any] = {"HYST": float(spec.hysteresis)}
    for lim, field, sev in (("lolo", "LOLO", "LLSV"), ("low", "LOW", "LSV"), ("high", "HIGH", "HSV"),
                            ("hihi", "HIHI", "HHSV")):
        v = getattr(spec, lim)
        if v is not None:
            out[field] = float(v)
            out[sev] = getattr(spec, f"{lim}_severity")
    return out


def _check_names(names: dict[str, str]) -> None:
    """Refuse PV names EPICS cannot serve (too long, blanks) or that two keys share, naming the keys."""
    seen: dict[str, str] = {}
    for key, pv in names.items():
        if len(pv) > _MAX_NAME or not pv or any(c.isspace() for c in pv):
            raise ValueError(f"PV name {pv!r} (key {key!r}) is not a valid EPICS record name: at most {_MAX_NAME} "
                             "characters, no blanks. Shorten the prefix or the profile's controls templates.")
        if pv in seen:
            raise ValueError(f"PV name {pv!r} is used by both {seen[pv]!r} and {key!r}: the profile's controls "
                             "templates must give every magnet, BPM and family its own name.")
        seen[pv] = key


class _Put:
    """One queued change: a callable applied to the twin by the publisher, the future completing the put, the
    record it came from (key of ``TwinIoc.records``) and the family (``"rf"``, ``"*"``: all) whose records must
    show the outcome."""

    __slots__ = ("apply", "future", "what", "key", "touches")

    def __init__(self, apply: Callable[[], str | None], what: str, key: str | None, touches: str | None):
        self.apply = apply
        self.what = what
        self.key = key
        self.touches = touches
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class TwinIoc:
    """Serves one :class:`~acc_bluesky.twin.Twin` as EPICS records.

    Args:
        twin: the twin (this object owns it from :meth:`start` on: only the publisher thread touches it).
        prefix: PV prefix (default: the profile's ``controls.prefix``).
        max_rate: highest publication rate [Hz] (puts arriving meanwhile are batched into the next one).
        idle_rate: republication rate [Hz] of the BPMs, tunes and beam current when nothing changes (fresh
            noise, no recomputation); 0 disables it.
        put_timeout: longest time [s] a put waits for the publication that shows its effect.
        allow_faults: serve the fault-injection PVs (``TWIN:CMD``, ``TWIN:CMD-RESULT``); off by default.
        autosave: file the setpoints are saved to (atomically) whenever they change, at most every
            ``autosave_period`` seconds, and when the IOC stops; None for no autosave. Restoring it at start is
            :func:`acc_bluesky.ioc.autosave.restore` on the twin before :meth:`build`.

    Usage (in the IOC process: pythonSoftIOC allows one IOC per process)::

        ioc = TwinIoc(Twin("ebs", seed=1))
        ioc.build()                                   # create the records
        builder.LoadDatabase(); softioc.iocInit(AsyncioDispatcher())
        ioc.start()                                   # first publication, publisher thread
    """

    def __init__(self, twin: Twin, prefix: str | None = None, *, max_rate: float = 50.0, idle_rate: float = 2.0,
                 put_timeout: float = 30.0, allow_faults: bool = False, autosave: str | Path | None = None,
                 autosave_period: float = 1.0):
        if max_rate <= 0:
            raise ValueError(f"max_rate must be > 0 Hz, got {max_rate}")
        if idle_rate < 0:
            raise ValueError(f"idle_rate must be >= 0 Hz, got {idle_rate}")
        if autosave_period <= 0:
            raise ValueError(f"autosave_period must be > 0 s, got {autosave_period}")
        self.twin = twin
        self.profile = twin.profile
        self.prefix = self.profile.spec.controls.prefix if prefix is None else prefix
        self.pvs = pv_names(self.profile, self.prefix)
        self.allow_faults = bool(allow_faults)
        self.tpvs = {k: v for k, v in twin_pv_names(self.profile, self.prefix).items()
                     if self.allow_faults or k not in FAULT_KEYS}
        self.opvs = orbit_rms_pv_names(self.profile, self.prefix)
        _check_names({**self.pvs, **self.opvs, **{f"TWIN:{k}": v for k, v in self.tpvs.items()}})
        self._nfan = 0
        self.max_rate = float(max_rate)
        self.idle_rate = float(idle_rate)
        self.put_timeout = float(put_timeout)
        self.autosave = None if autosave is None else Path(autosave)
        self.autosave_period = float(autosave_period)
        self.observer = Observer(twin)
        self.records: dict[str, Any] = {}
        self.pv_list: list[PvRow] = []
        self.n_records = 0
        self._sp_singles: dict[str, list] = {}
        self._pending: list[_Put] = []
        self._plock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._deferred: set[str] = set()
        self._published = 0
        self._refused = 0
        self._last: dict[str, Any] = {}
        self._saved: dict[str, Any] | None = None
        self._save_lock = threading.Lock()
        self._state_version = 0
        self._saved_version = 0
        self._t_start = time.monotonic()
        self._times: deque[float] = deque(maxlen=50)
        self.cycle_times: deque[float] = deque(maxlen=1000)  # [s], for benchmarks
        self._built = False

    # ------------------------------------------------------------------------------------------------
    # records
    def _rec(self, kind: str, rtype: str, factory, name: str, desc: str, egu: str | None = None, **fields):
        """Create one record with its DESC (and EGU) and note it in :attr:`pv_list`."""
        desc = desc[:39]  # DESC holds 40 characters, a CA string 39 (and the terminating NUL)
        if egu is not None:
            fields["EGU"] = egu
        rec = factory(name, DESC=desc, **fields)
        self.pv_list.append(PvRow(name, rtype, egu or "", desc, kind))
        return rec

    def build(self) -> int:
        """Create every record (before ``LoadDatabase``/``iocInit``); returns how many."""
        from softioc import builder

        if self._built:
            raise RuntimeError("TwinIoc.build() was already called (one IOC per process)")
        self._built = True
        before = builder.CountRecords()
        t, p, R, prof = self.twin, self.pvs, self.records, self.profile
        obs = self.observer.observe()
        soft_ai = builder.records.ai

        # magnets ------------------------------------------------------------------------------------
        for fname in t.family_names:
            st = t.family(fname)
            spec = st.spec
            n = len(st.refpts)
            nelm = max(2, n)
            egu = spec.units
            sp = obs.setpoints[fname]
            drive = _drive_limits(spec.limits)
            disp = _display(spec.limits, sp)
            drive.update(disp)
            R[f"{fname}:setpoints"] = self._rec(
                "setpoint", "waveform", builder.WaveformOut, p[f"{fname}:setpoints"], f"{fname} setpoints (all)",
                egu, initial_value=sp, length=nelm, PREC=4, **disp, always_update=True,
                validate=self._validate_family(fname), on_update=self._on_family(fname), blocking=True)
            rb_wf = self._rec("readback", "waveform", builder.WaveformIn, p[f"{fname}:readbacks"],
                              f"{fname} readbacks (all)", egu, initial_value=obs.readbacks[fname], length=nelm,
                              PREC=4, **disp)
            R[f"{fname}:readbacks"] = rb_wf
            singles, rbs = [], []
            for i in range(n):
                dev = st.fam.device_names[i]
                rec = self._rec(
                    "setpoint", "ao", builder.aOut, magnet_pv(p, prof, fname, i, "setpoint"),
                    f"{dev} {st.fam.element_names[i]} setpoint", egu, initial_value=float(sp[i]), PREC=4,
                    always_update=True, validate=self._validate_magnet(fname, i),
                    on_update=self._on_magnet(fname, i), blocking=True, **drive)
                R[f"{fname}:{i}:setpoint"] = rec
                singles.append(rec)
                rbs.append(self._rec(
                    "readback", "ai", soft_ai, magnet_pv(p, prof, fname, i, "readback"),
                    f"{dev} {st.fam.element_names[i]} readback", egu,
                    INP=f"{p[f'{fname}:readbacks']}.[{i}] NPP NMS", PREC=4, DISP=1, **disp))
            self._sp_singles[fname] = singles
            rb_wf.FLNK = self._fanout(rbs, builder)

        # BPMs ----------------------------------------------------------------------------------------
        nb = t.nbpm
        beam = prof.spec.beam
        for plane, arr, aperture in (("x", obs.x, beam.aperture_x), ("y", obs.y, beam.aperture_y)):
            rng = {"LOPR": -float(aperture), "HOPR": float(aperture)}
            wf = self._rec("readback", "waveform", builder.WaveformIn, p[f"orbit:{plane}"],
                           f"closed orbit {plane} at the BPMs", "m", initial_value=np.nan_to_num(arr),
                           length=max(2, nb), PREC=9, **rng)
            R[f"orbit:{plane}"] = wf
            ais = [self._rec("readback", "ai", soft_ai, bpm_pv(p, prof, i, plane),
                             f"{prof.bpm_names[i]} {plane} position", "m",
                             INP=f"{p[f'orbit:{plane}']}.[{i}] NPP NMS", PREC=9, DISP=1, **rng)
                   for i in range(nb)]
            wf.FLNK = self._fanout(ais, builder)
            R[f"orbit:{plane}_rms"] = self._rec(
                "readback", "ai", builder.aIn, self.opvs[f"orbit:{plane}_rms"], f"orbit rms {plane} over the BPMs",
                "m", initial_value=0.0, PREC=9, LOPR=0.0, HOPR=float(aperture),
                **_alarm_fields(getattr(prof.spec.controls.alarms, f"orbit_rms_{plane}")))

        # RF, tunes, beam -----------------------------------------------------------------------------
        rf = prof.spec.rf
        fdisp = _display(rf.frequency_limits, obs.rf_frequency)
        R["rf:frequency"] = self._rec(
            "setpoint", "ao", builder.aOut, p["rf:frequency"], "RF frequency setpoint", "Hz",
            initial_value=obs.rf_frequency, PREC=3, always_update=True,
            validate=self._validate_scalar("rf:frequency", rf.frequency_limits, "Hz"),
            on_update=self._on_rf("frequency"), blocking=True, **{**_drive_limits(rf.frequency_limits), **fdisp})
        R["rf:frequency_rb"] = self._rec("readback", "ai", builder.aIn, p["rf:frequency_rb"], "RF frequency readback",
                                         "Hz", initial_value=obs.rf_frequency, PREC=3, **fdisp)
        R["rf:voltage"] = self._rec(
            "setpoint", "ao", builder.aOut, p["rf:voltage"], "RF voltage setpoint (total)", "V",
            initial_value=obs.rf_voltage, PREC=1, always_update=True,
            validate=self._validate_scalar("rf:voltage", rf.voltage_limits, "V"),
            on_update=self._on_rf("voltage"), blocking=True,
            **{**_drive_limits(rf.voltage_limits), **_display(rf.voltage_limits, obs.rf_voltage)})
        for k in (0, 1):
            plane = "xy"[k]
            R[f"tune:{plane}"] = self._rec("readback", "ai", builder.aIn, p[f"tune:{plane}"],
                                           f"fractional tune {plane}", "", PREC=6, LOPR=0.0, HOPR=1.0,
                                           initial_value=float(np.nan_to_num(obs.tunes[k])))
        alarms = prof.spec.controls.alarms
        R["beam:current"] = self._rec(
            "readback", "ai", builder.aIn, p["beam:current"], "stored beam current", "A",
            initial_value=obs.current, PREC=6, LOPR=0.0, HOPR=1.5 * beam.current if beam.current > 0 else 1.0,
            **_alarm_fields(alarms.beam_current))
        R["beam:lifetime"] = self._rec(
            "readback", "ai", builder.aIn, p["beam:lifetime"], "beam lifetime", "s", initial_value=obs.lifetime,
            PREC=0, LOPR=0.0, HOPR=2.0 * beam.lifetime, **_alarm_fields(alarms.beam_lifetime))

        # the twin's own PVs --------------------------------------------------------------------------
        tp = self.tpvs
        if self.allow_faults:
            R["cmd"] = self._rec("command", "stringout", builder.stringOut, tp["cmd"],
                                 "fault injection: dead_bpm N, trip FAM..", initial_value="",
                                 validate=self._validate_cmd, on_update=self._on_cmd, blocking=True,
                                 always_update=True)
            R["cmd_result"] = self._rec("command", "waveform", builder.longStringIn, tp["cmd_result"],
                                        "outcome of the last fault command", initial_value="", length=512)
        R["anomalies"] = self._rec("status", "waveform", builder.longStringIn, tp["anomalies"],
                                   "active anomalies (JSON)", initial_value="{}", length=2048)
        R["last_error"] = self._rec("status", "waveform", builder.longStringIn, tp["last_error"],
                                    "last refused put: PV, value, why", initial_value="", length=512)
        counter = {"LOPR": 0, "HOPR": 2 ** 31 - 1}
        R["refused"] = self._rec("status", "longin", builder.longIn, tp["refused"], "refused puts so far",
                                 initial_value=0, **counter)
        R["beam_lost"] = self._rec("status", "bi", builder.boolIn, tp["beam_lost"], "beam stored or lost",
                                   ZNAM="stored", ONAM="lost", initial_value=int(obs.lost))
        R["loss_reason"] = self._rec("status", "waveform", builder.longStringIn, tp["loss_reason"],
                                     "why the beam was lost", initial_value="", length=512)
        R["version"] = self._rec("status", "int64in", builder.int64In, tp["version"],
                                 "twin state version at the last publication", initial_value=obs.version, **counter)
        R["solves"] = self._rec("status", "int64in", builder.int64In, tp["solves"], "closed-orbit solves so far",
                                initial_value=0, **counter)
        R["cycle_time"] = self._rec("status", "ai", builder.aIn, tp["cycle_time"],
                                    "last recomputation + publication", "ms", initial_value=0.0, PREC=2, LOPR=0.0,
                                    HOPR=1000.0)
        R["rate"] = self._rec("status", "ai", builder.aIn, tp["rate"], "publications per second", "Hz",
                              initial_value=0.0, PREC=2, LOPR=0.0, HOPR=self.max_rate)
        R["seed"] = self._rec("status", "longin", builder.longIn, tp["seed"], "error seed (-1: ideal machine)",
                              initial_value=-1 if t.seed is None else int(t.seed), LOPR=-1, HOPR=2 ** 31 - 1)
        R["heartbeat"] = self._rec("status", "longin", builder.longIn, tp["heartbeat"], "+1 every second",
                                   initial_value=0, **counter)
        R["uptime"] = self._rec("status", "ai", builder.aIn, tp["uptime"], "time since the IOC started", "s",
                                initial_value=0.0, PREC=0, LOPR=0.0, HOPR=1.0e9)
        R["published"] = self._rec("status", "int64in", builder.int64In, tp["published"], "publications so far",
                                   initial_value=0, **counter)  # last: the publication marker
        self.n_records = builder.CountRecords() - before
        self._store_last(obs)
        return self.n_records

    def _fanout(self, targets: list, builder) -> Any:
        """A tree of fanout records processing every target (depth log16(n); no deep FLNK recursion)."""
        groups = [targets[i:i + _FAN] for i in range(0, len(targets), _FAN)]
        if len(groups) > 1:
            return self._fanout([self._fanout(g, builder) for g in groups], builder)
        self._nfan += 1
        return self._rec("internal", "fanout", builder.records.fanout, f"{self.prefix}TWIN:FAN{self._nfan}",
                         "internal: processes per-element records", SELM="All", DISP=1,
                         **{f"LNK{k:X}": r for k, r in enumerate(groups[0])})

    def write_pv_list(self, path: str | Path) -> Path:
        """Write every record of this IOC (after :meth:`build`): see :func:`~acc_bluesky.ioc.autosave.write_pv_list`."""
        if not self._built:
            raise RuntimeError("build() the records before writing the PV list")
        return write_pv_list(path, self.pv_list)

    # ------------------------------------------------------------------------------------------------
    # puts: validate in the record's processing thread, apply in the publisher
    def _refuse(self, pv: str, value, why: str) -> bool:
        self._refused += 1
        msg = f"{time.strftime('%H:%M:%S')} {pv}: put {value!r} refused: {why}"[:500]
        log.warning(msg)
        rec = self.records.get("last_error")
        if rec is not None:
            rec.set(msg)
            self.records["refused"].set(self._refused)
        return False

    def _refuse_put(self, rec, pv: str, value, why: str, status: int) -> bool:
        """A refused put: the client's put fails, the record shows a MINOR alarm until its next put."""
        from .._compat.softioc import fail_put

        fail_put(rec, _MINOR, status)
        return self._refuse(pv, value, why)

    def _validate_magnet(self, fname: str, i: int) -> Callable[[Any, float], bool]:
        st = self.twin.family(fname)
        lim, units = st.spec.limits, st.spec.units
        pv, dev = magnet_pv(self.pvs, self.profile, fname, i, "setpoint"), st.fam.device_names[i]

        def validate(rec, value: float) -> bool:
            try:
                lim.check(dev, value, units)
            except ValueError as err:
                return self._refuse_put(rec, pv, value, _clamped(err, value, lim, units),
                                        _HW_LIMIT if np.isfinite(value) else _WRITE)
            return True

        return validate

    def _validate_family(self, fname: str) -> Callable[[Any, np.ndarray], bool]:
        st = self.twin.family(fname)
        n, lim, units, pv = len(st.refpts), st.spec.limits, st.spec.units, self.pvs[f"{fname}:setpoints"]

        def validate(rec, value: np.ndarray) -> bool:
            v = np.asarray(value, dtype=float)
            if v.shape != (n,):
                return self._refuse_put(rec, pv, f"<{v.size} values>", f"expected exactly {n} setpoints [{units}]",
                                        _WRITE)
            try:
                lim.check(fname, v, units, names=st.fam.device_names)
            except ValueError as err:
                return self._refuse_put(rec, pv, f"<{v.size} values>", str(err),
                                        _HW_LIMIT if np.all(np.isfinite(v)) else _WRITE)
            return True

        return validate

    def _validate_scalar(self, key: str, lim: Limits, units: str) -> Callable[[Any, float], bool]:
        pv = self.pvs[key]

        def validate(rec, value: float) -> bool:
            try:
                lim.check(pv, value, units)
            except ValueError as err:
                return self._refuse_put(rec, pv, value, _clamped(err, value, lim, units),
                                        _HW_LIMIT if np.isfinite(value) else _WRITE)
            return True

        return validate

    def _validate_cmd(self, rec, value: str) -> bool:
        try:
            parse_command(value, self.twin)
        except CommandError as err:
            self.records["cmd_result"].set(f"error: {err}"[:500])
            return self._refuse_put(rec, self.tpvs["cmd"], value, str(err), _WRITE)
        return True

    def submit(self, apply: Callable[[], str | None], what: str, key: str | None = None,
               touches: str | None = None) -> concurrent.futures.Future:
        """Queue a change for the publisher; the future completes once its effect is published (with the
        exception if the twin refused it). ``key``: the record whose put this is; ``touches``: the family (or
        ``"rf"``, ``"*"``) whose records show the outcome."""
        put = _Put(apply, what, key, touches)
        with self._plock:
            self._pending.append(put)
        self._wake.set()
        return put.future

    async def _wait(self, fut: concurrent.futures.Future, key: str) -> None:
        """Wait until the queued change is published; the put completes either way (never left in progress),
        failed at its client if the twin refused it or it was not published."""
        from .._compat.softioc import fail_put

        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), self.put_timeout)
            return
        except TimeoutError:
            log.error("put not published within %.1f s (publisher stalled?)", self.put_timeout)
        except Exception as err:  # noqa: BLE001 - refused by the twin (already reported), or stopping
            log.info("put completed without effect: %s", err)
        fail_put(self.records[key], _MINOR, _WRITE)

    def _on_magnet(self, fname: str, i: int):
        t, key = self.twin, f"{fname}:{i}:setpoint"

        async def on_update(value: float) -> None:
            v = float(value)
            await self._wait(self.submit(lambda: t.set_setpoint(fname, v, i), key, key, fname), key)

        return on_update

    def _on_family(self, fname: str):
        t, key = self.twin, f"{fname}:setpoints"

        async def on_update(value: np.ndarray) -> None:
            v = np.array(value, dtype=float)
            await self._wait(self.submit(lambda: t.set_setpoint(fname, v), key, key, fname), key)

        return on_update

    def _on_rf(self, what: str):
        t, key = self.twin, f"rf:{what}"
        fn = t.set_rf_frequency if what == "frequency" else t.set_rf_voltage

        async def on_update(value: float) -> None:
            v = float(value)
            await self._wait(self.submit(lambda: fn(v), key, key, "rf"), key)

        return on_update

    async def _on_cmd(self, value: str) -> None:
        cmd = parse_command(value, self.twin)
        await self._wait(self.submit(lambda: apply_command(self.twin, cmd), f"cmd {value!r}", "cmd", "*"), "cmd")

    # ------------------------------------------------------------------------------------------------
    # publisher, heartbeat, autosave
    def start(self) -> None:
        """Publish once (synchronously), then start the publisher, heartbeat and autosave threads. Call after
        ``iocInit``."""
        if self._started:
            raise RuntimeError("TwinIoc already started")
        self._started = True
        self._t_start = time.monotonic()
        self._cycle([])
        self._note_state(force=True)
        self._threads = [threading.Thread(target=self._run, name="twin-publisher", daemon=True),
                         threading.Thread(target=self._heartbeat, name="twin-heartbeat", daemon=True)]
        if self.autosave is not None:
            self._save_now()
            self._threads.append(threading.Thread(target=self._autosave_loop, name="twin-autosave", daemon=True))
        for th in self._threads:
            th.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (queued puts complete without being applied); a last autosave."""
        self._stop.set()
        self._wake.set()
        for th in self._threads:
            th.join(timeout)
        with self._plock:
            pending, self._pending = self._pending, []
        for put in pending:
            if not put.future.done():
                put.future.set_exception(RuntimeError("IOC stopping: put not applied"))
        if self.autosave is not None and self._started:
            self._save_now()

    def _run(self) -> None:
        min_period = 1.0 / self.max_rate
        idle = 1.0 / self.idle_rate if self.idle_rate > 0 else None
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            due = [last + idle] if idle is not None else []
            if self._deferred:
                due.append(now + min_period)  # busy records: compare them again soon
            self._wake.wait(max(0.0, min(due) - now) if due else None)
            if self._stop.is_set():
                break
            wait = min_period - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)  # rate limit: puts arriving meanwhile join this publication
            self._wake.clear()
            with self._plock:
                batch, self._pending = self._pending, []
            now = time.monotonic()
            try:
                if batch or (idle is not None and now >= last + idle - 1e-3):
                    last = now
                    self._cycle(batch)
                elif self._deferred:
                    self._reconcile(set(), set())
            except Exception as err:  # noqa: BLE001 - keep serving; tell the waiting puts
                log.exception("publication failed")
                for put in batch:
                    if not put.future.done():
                        put.future.set_exception(err)

    def _cycle(self, batch: list[_Put]) -> None:
        t0 = time.perf_counter()
        touched: set[str] = set()
        failed: dict[int, Exception] = {}
        for k, put in enumerate(batch):
            try:
                msg = put.apply()
                if msg and put.what.startswith("cmd"):
                    self.records["cmd_result"].set(msg[:500])
            except Exception as err:  # noqa: BLE001 - a put the twin refuses: report, keep going
                failed[k] = err
                if put.what.startswith("cmd"):
                    self.records["cmd_result"].set(f"error: {put.what}: {err}"[:500])
                self._refuse(put.what, "", str(err))
            if put.touches is not None:
                touched.add(put.touches)
        obs = self.observer.observe()
        self._publish(obs, touched, {put.key for put in batch})
        for k, put in enumerate(batch):
            if not put.future.done():
                if k in failed:
                    put.future.set_exception(failed[k])
                else:
                    put.future.set_result(None)
        dt = time.perf_counter() - t0
        self.cycle_times.append(dt)
        self.records["cycle_time"].set(dt * 1e3)

    def _store_last(self, obs: Observation) -> None:
        self._last = {"setpoints": {k: v.copy() for k, v in obs.setpoints.items()},
                      "readbacks": {k: v.copy() for k, v in obs.readbacks.items()},
                      "rf_frequency": obs.rf_frequency, "rf_voltage": obs.rf_voltage, "anomalies": None,
                      "lost": None, "reason": None}

    def _reconcile(self, families: set[str], applied: set[str]) -> None:
        """Make the setpoint records of ``families`` (and of the deferred ones; ``"rf"`` for the RF, ``"*"`` for
        all) show the twin's setpoints, without processing them. A record busy with a put is compared again
        later, unless its put is among those just ``applied`` (record keys): it shows the outcome at once."""
        from .._compat.softioc import show as _show

        def show(key: str, rec, value) -> bool:
            return _show(rec, value, in_progress=key in applied)

        todo = families | self._deferred
        if "*" in todo:
            todo = set(self._sp_singles) | {"rf"}
        self._deferred = set()
        last = self._last
        for name in sorted(todo):
            if name == "rf":
                for what in ("frequency", "voltage"):
                    key = f"rf:{what}"
                    rec, v = self.records[key], last[f"rf_{what}"]
                    if rec.get() != v and not show(key, rec, v):
                        self._deferred.add("rf")
                continue
            sp = last["setpoints"][name]
            for i, rec in enumerate(self._sp_singles[name]):
                if rec.get() != sp[i] and not show(f"{name}:{i}:setpoint", rec, float(sp[i])):
                    self._deferred.add(name)
            key = f"{name}:setpoints"
            if not np.array_equal(self.records[key].get(), sp) and not show(key, self.records[key], sp):
                self._deferred.add(name)

    def _publish(self, obs: Observation, touched: set[str], applied: set[str]) -> None:
        from softioc import alarm

        R, last = self.records, self._last
        changed: set[str] = set()
        for fname, sp in obs.setpoints.items():
            if not np.array_equal(sp, last["setpoints"][fname]):
                last["setpoints"][fname] = sp.copy()
                changed.add(fname)
        for what in ("frequency", "voltage"):
            v = getattr(obs, f"rf_{what}")
            if v != last[f"rf_{what}"]:
                last[f"rf_{what}"] = v
                changed.add("rf")
        self._reconcile(changed | touched, applied)
        if changed:
            self._note_state()
        for fname, rb in obs.readbacks.items():
            if not np.array_equal(rb, last["readbacks"][fname]):
                R[f"{fname}:readbacks"].set(rb)
                last["readbacks"][fname] = rb.copy()
        R["rf:frequency_rb"].set(obs.rf_frequency)

        # orbit: INVALID when the beam is lost, MINOR when some BPMs read nothing
        for plane, arr in (("x", obs.x), ("y", obs.y)):
            bad = ~np.isfinite(arr)
            if obs.lost or bad.all():
                sev, stat = alarm.INVALID_ALARM, alarm.READ_ALARM
            elif bad.any():
                sev, stat = alarm.MINOR_ALARM, alarm.READ_ALARM
            else:
                sev, stat = alarm.NO_ALARM, alarm.NO_ALARM
            R[f"orbit:{plane}"].set(arr, severity=sev, alarm=stat)
            rms = float(np.sqrt(np.mean(arr[~bad] ** 2))) if not (obs.lost or bad.all()) else float("nan")
            if np.isfinite(rms):
                R[f"orbit:{plane}_rms"].set(rms)
            else:
                R[f"orbit:{plane}_rms"].set(rms, severity=alarm.INVALID_ALARM, alarm=alarm.READ_ALARM)
        for k in (0, 1):
            q = float(obs.tunes[k])
            if np.isfinite(q):
                R[f"tune:{'xy'[k]}"].set(q)
            else:
                R[f"tune:{'xy'[k]}"].set(q, severity=alarm.INVALID_ALARM, alarm=alarm.READ_ALARM)
        R["beam:current"].set(obs.current)  # 0 A when lost: below LOLO, MAJOR
        if obs.lost:
            R["beam:lifetime"].set(obs.lifetime, severity=alarm.INVALID_ALARM, alarm=alarm.READ_ALARM)
        else:
            R["beam:lifetime"].set(obs.lifetime)

        # status
        if obs.lost != last["lost"] or obs.loss_reason != last["reason"]:
            R["beam_lost"].set(int(obs.lost), severity=alarm.MAJOR_ALARM if obs.lost else alarm.NO_ALARM,
                               alarm=alarm.STATE_ALARM if obs.lost else alarm.NO_ALARM)
            R["loss_reason"].set(obs.loss_reason[:500])
            last["lost"], last["reason"] = obs.lost, obs.loss_reason
        active = json.dumps(self.twin.anomalies.active())
        if active != last["anomalies"]:
            R["anomalies"].set(active[:2000])
            last["anomalies"] = active
        R["version"].set(obs.version)
        R["solves"].set(int(self.twin.stats.get("solves", 0)))
        now = time.monotonic()
        self._times.append(now)
        if len(self._times) > 1 and now > self._times[0]:
            R["rate"].set((len(self._times) - 1) / (now - self._times[0]))
        self._published += 1
        self._mark(self._published)

    def _mark(self, n: int, timeout: float = 2.0) -> None:
        """Set the publication marker and wait until its record has processed: the records set before it (same
        scan priority, FIFO callback queue) have processed too, so a client reading after a completed put sees
        the new values."""
        rec = self.records["published"]
        rec.set(n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if int(rec.get_field("VAL")) >= n:
                    return
            except (ValueError, AssertionError):  # not initialised yet
                return
            time.sleep(0.0005)
        log.warning("publication %d: records not processed within %.1f s", n, timeout)

    def _heartbeat(self) -> None:
        beat = 0
        while not self._stop.wait(1.0):
            beat += 1
            self.records["heartbeat"].set(beat)
            self.records["uptime"].set(time.monotonic() - self._t_start)

    def _note_state(self, force: bool = False) -> None:
        """After a change of setpoints (publisher thread): the snapshot the autosave thread writes."""
        if self.autosave is None:
            return
        snap = snapshot(self.twin)
        with self._save_lock:
            self._saved = snap
            self._state_version += 1

    def _save_now(self) -> None:
        with self._save_lock:
            snap, version = self._saved, self._state_version
        if snap is None or version == self._saved_version:
            return
        try:
            save(self.autosave, snap)
            self._saved_version = version
        except OSError as err:
            self._refuse(f"autosave {self.autosave}", "", f"could not be written: {err}")

    def _autosave_loop(self) -> None:
        while not self._stop.wait(self.autosave_period):
            self._save_now()

    # ------------------------------------------------------------------------------------------------
    @property
    def published(self) -> int:
        """Publications so far."""
        return self._published
