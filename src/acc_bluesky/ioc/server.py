"""The twin served as a live EPICS IOC (pythonSoftIOC, Channel Access; PV Access on request).

Records, named by the profile's templates (:func:`~acc_bluesky.devices.backends.pv_names`):

- per magnet: setpoint ``ao`` (EGU, LOPR/HOPR = limits, DRVL/DRVH one ulp outside them) and readback ``ai``;
- per family: ``{family}:setpoints`` waveform (sets the whole family in one put) and ``{family}:readbacks``;
- per BPM ``x``/``y`` ``ai`` and the whole orbit as two waveforms [m]; RF frequency setpoint/readback [Hz] and
  voltage [V]; tunes; beam current [A] and lifetime [s];
- the twin's own PVs (:func:`~acc_bluesky.ioc.names.twin_pv_names`): ``TWIN:CMD`` drives anomalies
  (:mod:`~acc_bluesky.ioc.commands`), plus status counters.

How a put travels: the record's ``validate`` callback refuses anything outside the profile's limits (the old value
stays; the reason goes to ``TWIN:LAST-ERROR``); an accepted value is queued and the put stays *in progress*. One
publisher thread owns the twin: it takes every queued put at once, applies them (cheap), recomputes the
observables once (only if the twin's ``version`` changed), publishes every changed record, and then completes
the queued puts. So a put-with-callback (``caput -w``, ophyd-async ``set``) returns when the orbit PVs already
show its effect, and many puts cost one recomputation. Publications are rate limited (``max_rate``); when nothing
changes the BPMs are republished at ``idle_rate`` with fresh noise, without recomputing.

Per-BPM and per-magnet readback ``ai`` records are plain EPICS soft records reading one element of the orbit or
readback waveform (``PV.[i]`` link filters), processed by a fanout tree from the waveform: the IOC's Python side
sets a few waveforms per publication, not thousands of scalars. A NaN element gives that ``ai`` an INVALID (UDF)
alarm; a lost beam also marks the orbit and tune PVs INVALID.
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
from typing import Any

import numpy as np

from ..devices.backends.epics import pv_names
from ..profile import Limits
from ..twin import Twin
from .commands import CommandError, apply_command, parse_command
from .names import twin_pv_names
from .observe import Observation, Observer

__all__ = ["TwinIoc", "READY_MESSAGE"]

log = logging.getLogger(__name__)

#: First words of the line printed on stdout once the IOC serves its PVs.
READY_MESSAGE = "IOC ready"

_FAN = 16  # links per fanout record (LNK0..LNKF)


def _drive_limits(lim: Limits) -> dict[str, float]:
    """DRVL/DRVH one ulp (at least 1e-300) outside the limits (so the record's clamp never turns an illegal put into a legal one:
    validate sees the clamped value, still outside, and refuses it) and LOPR/HOPR on them."""
    out: dict[str, float] = {}
    if np.isfinite(lim.low):
        out["DRVL"] = float(lim.low - max(np.spacing(abs(lim.low)), 1e-300))
        out["LOPR"] = float(lim.low)
    if np.isfinite(lim.high):
        out["DRVH"] = float(lim.high + max(np.spacing(abs(lim.high)), 1e-300))
        out["HOPR"] = float(lim.high)
    return out


def _clamped(err: Exception, value: float, lim: Limits, units: str) -> str:
    """The refusal message: the record clamps a put beyond DRVL/DRVH before validation, so say so plainly."""
    if np.isfinite(value) and (value > lim.high or value < lim.low):
        return (f"outside the limits [{lim.low:g}, {lim.high:g}] {units} (clamped by the record to "
                f"{value!r}, then refused); the setpoint did not change")
    return str(err)


_MAX_NAME = 60  # EPICS record names


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
    """One queued change: a callable applied to the twin by the publisher, and the future completing the put."""

    __slots__ = ("apply", "future", "what")

    def __init__(self, apply: Callable[[], str | None], what: str):
        self.apply = apply
        self.what = what
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

    Usage (in the IOC process: pythonSoftIOC allows one IOC per process)::

        ioc = TwinIoc(Twin("ebs", seed=1))
        ioc.build()                                   # create the records
        builder.LoadDatabase(); softioc.iocInit(AsyncioDispatcher())
        ioc.start()                                   # first publication, publisher thread
    """

    def __init__(self, twin: Twin, prefix: str | None = None, *, max_rate: float = 50.0, idle_rate: float = 2.0,
                 put_timeout: float = 30.0):
        if max_rate <= 0:
            raise ValueError(f"max_rate must be > 0 Hz, got {max_rate}")
        if idle_rate < 0:
            raise ValueError(f"idle_rate must be >= 0 Hz, got {idle_rate}")
        self.twin = twin
        self.profile = twin.profile
        self.prefix = self.profile.spec.controls.prefix if prefix is None else prefix
        self.pvs = pv_names(self.profile, self.prefix)
        self.tpvs = twin_pv_names(self.profile, self.prefix)
        _check_names({**self.pvs, **{f"TWIN:{k}": v for k, v in self.tpvs.items()}})
        self._nfan = 0
        self.max_rate = float(max_rate)
        self.idle_rate = float(idle_rate)
        self.put_timeout = float(put_timeout)
        self.observer = Observer(twin)
        self.records: dict[str, Any] = {}
        self.n_records = 0
        self._pending: list[_Put] = []
        self._plock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published = 0
        self._refused = 0
        self._last: dict[str, Any] = {}
        self._times: deque[float] = deque(maxlen=50)
        self.cycle_times: deque[float] = deque(maxlen=1000)  # [s], for benchmarks
        self._built = False

    # ------------------------------------------------------------------------------------------------
    # records
    def build(self) -> int:
        """Create every record (before ``LoadDatabase``/``iocInit``); returns how many."""
        from softioc import builder

        if self._built:
            raise RuntimeError("TwinIoc.build() was already called (one IOC per process)")
        self._built = True
        before = builder.CountRecords() if hasattr(builder, "CountRecords") else 0
        t, p, R = self.twin, self.pvs, self.records
        obs = self.observer.observe()

        # magnets ------------------------------------------------------------------------------------
        for fname in t.family_names:
            st = t.family(fname)
            spec = st.spec
            n = len(st.refpts)
            nelm = max(2, n)
            egu = spec.units
            lim = _drive_limits(spec.limits)
            disp = {k: lim[k] for k in ("LOPR", "HOPR") if k in lim}
            sp = obs.setpoints[fname]
            R[f"{fname}:setpoints"] = builder.WaveformOut(
                p[f"{fname}:setpoints"], initial_value=sp, length=nelm, EGU=egu, PREC=4, **disp,
                DESC=f"{fname} setpoints (all)"[:40],
                validate=self._validate_family(fname), on_update=self._on_family(fname), blocking=True)
            rb_wf = builder.WaveformIn(
                p[f"{fname}:readbacks"], initial_value=obs.readbacks[fname], length=nelm, EGU=egu, PREC=4,
                **disp, DESC=f"{fname} readbacks (all)"[:40])
            R[f"{fname}:readbacks"] = rb_wf
            rbs = []
            for i in range(n):
                key = f"{fname}:{i + 1:03d}"
                R[f"{key}:setpoint"] = builder.aOut(
                    p[f"{key}:setpoint"], initial_value=float(sp[i]), EGU=egu, PREC=4,
                    validate=self._validate_magnet(fname, i), on_update=self._on_magnet(fname, i), blocking=True,
                    **lim)
                rbs.append(builder.records.ai(
                    p[f"{key}:readback"], INP=f"{p[f'{fname}:readbacks']}.[{i}] NPP NMS", EGU=egu, PREC=4,
                    **disp, DESC=f"{st.fam.element_names[i]} readback"[:40]))
            rb_wf.FLNK = self._fanout(rbs, builder)

        # BPMs ----------------------------------------------------------------------------------------
        nb = t.nbpm
        for plane, arr in (("x", obs.x), ("y", obs.y)):
            wf = builder.WaveformIn(p[f"orbit:{plane}"], initial_value=np.nan_to_num(arr), length=max(2, nb),
                                    EGU="m", PREC=9, DESC=f"closed orbit {plane} at the BPMs")
            R[f"orbit:{plane}"] = wf
            ais = [builder.records.ai(p[f"BPM:{i + 1:03d}:{plane}"], INP=f"{p[f'orbit:{plane}']}.[{i}] NPP NMS",
                                      EGU="m", PREC=9, DESC=f"{self.profile.bpm_names[i]} {plane}"[:40])
                   for i in range(nb)]
            wf.FLNK = self._fanout(ais, builder)

        # RF, tunes, beam -----------------------------------------------------------------------------
        rf = self.profile.spec.rf
        R["rf:frequency"] = builder.aOut(
            p["rf:frequency"], initial_value=obs.rf_frequency, EGU="Hz", PREC=3,
            validate=self._validate_scalar("rf:frequency", rf.frequency_limits, "Hz"),
            on_update=self._on_rf("frequency"), blocking=True, **_drive_limits(rf.frequency_limits))
        R["rf:frequency_rb"] = builder.aIn(p["rf:frequency_rb"], initial_value=obs.rf_frequency, EGU="Hz", PREC=3)
        R["rf:voltage"] = builder.aOut(
            p["rf:voltage"], initial_value=obs.rf_voltage, EGU="V", PREC=1,
            validate=self._validate_scalar("rf:voltage", rf.voltage_limits, "V"),
            on_update=self._on_rf("voltage"), blocking=True, **_drive_limits(rf.voltage_limits))
        for k in (0, 1):
            plane = "xy"[k]
            R[f"tune:{plane}"] = builder.aIn(p[f"tune:{plane}"], initial_value=float(np.nan_to_num(obs.tunes[k])),
                                             PREC=6, EGU="", LOPR=0.0, HOPR=1.0)
        R["beam:current"] = builder.aIn(p["beam:current"], initial_value=obs.current, EGU="A", PREC=6)
        R["beam:lifetime"] = builder.aIn(p["beam:lifetime"], initial_value=obs.lifetime, EGU="s", PREC=0)

        # the twin's own PVs --------------------------------------------------------------------------
        tp = self.tpvs
        R["cmd"] = builder.stringOut(tp["cmd"], initial_value="", validate=self._validate_cmd,
                                     on_update=self._on_cmd, blocking=True, always_update=True)
        R["cmd_result"] = builder.longStringIn(tp["cmd_result"], initial_value="", length=512)
        R["anomalies"] = builder.longStringIn(tp["anomalies"], initial_value="{}", length=2048)
        R["last_error"] = builder.longStringIn(tp["last_error"], initial_value="", length=512)
        R["refused"] = builder.longIn(tp["refused"], initial_value=0)
        R["beam_lost"] = builder.boolIn(tp["beam_lost"], ZNAM="stored", ONAM="lost", initial_value=int(obs.lost))
        R["loss_reason"] = builder.longStringIn(tp["loss_reason"], initial_value="", length=512)
        R["version"] = builder.int64In(tp["version"], initial_value=obs.version)
        R["solves"] = builder.int64In(tp["solves"], initial_value=0)
        R["cycle_time"] = builder.aIn(tp["cycle_time"], initial_value=0.0, EGU="ms", PREC=2)
        R["rate"] = builder.aIn(tp["rate"], initial_value=0.0, EGU="Hz", PREC=2)
        R["seed"] = builder.longIn(tp["seed"], initial_value=-1 if t.seed is None else int(t.seed))
        R["published"] = builder.int64In(tp["published"], initial_value=0)  # last: the publication marker
        after = builder.CountRecords() if hasattr(builder, "CountRecords") else 0
        self.n_records = after - before
        self._store_last(obs)
        return self.n_records

    def _fanout(self, targets: list, builder) -> Any:
        """A tree of fanout records processing every target (depth log16(n); no deep FLNK recursion)."""
        groups = [targets[i:i + _FAN] for i in range(0, len(targets), _FAN)]
        if len(groups) > 1:
            return self._fanout([self._fanout(g, builder) for g in groups], builder)
        self._nfan += 1
        return builder.records.fanout(f"{self.prefix}TWIN:FAN{self._nfan}", SELM="All",
                                      **{f"LNK{k:X}": r for k, r in enumerate(groups[0])})

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

    def _validate_magnet(self, fname: str, i: int) -> Callable[[Any, float], bool]:
        st = self.twin.family(fname)
        lim, units, pv = st.spec.limits, st.spec.units, self.pvs[f"{fname}:{i + 1:03d}:setpoint"]

        def validate(_rec, value: float) -> bool:
            try:
                lim.check(st.fam.device_names[i], value, units)
            except ValueError as err:
                return self._refuse(pv, value, _clamped(err, value, lim, units))
            return True

        return validate

    def _validate_family(self, fname: str) -> Callable[[Any, np.ndarray], bool]:
        st = self.twin.family(fname)
        n, lim, units, pv = len(st.refpts), st.spec.limits, st.spec.units, self.pvs[f"{fname}:setpoints"]

        def validate(_rec, value: np.ndarray) -> bool:
            v = np.asarray(value, dtype=float)
            if v.shape != (n,):
                return self._refuse(pv, f"<{v.size} values>", f"expected exactly {n} setpoints [{units}]")
            try:
                lim.check(fname, v, units)
            except ValueError as err:
                return self._refuse(pv, f"<{v.size} values>", str(err))
            return True

        return validate

    def _validate_scalar(self, key: str, lim: Limits, units: str) -> Callable[[Any, float], bool]:
        pv = self.pvs[key]

        def validate(_rec, value: float) -> bool:
            try:
                lim.check(pv, value, units)
            except ValueError as err:
                return self._refuse(pv, value, _clamped(err, value, lim, units))
            return True

        return validate

    def _validate_cmd(self, _rec, value: str) -> bool:
        try:
            parse_command(value, self.twin)
        except CommandError as err:
            self.records["cmd_result"].set(f"error: {err}"[:500])
            return self._refuse(self.tpvs["cmd"], value, str(err))
        return True

    def submit(self, apply: Callable[[], str | None], what: str) -> concurrent.futures.Future:
        """Queue a change for the publisher; the future completes once its effect is published."""
        put = _Put(apply, what)
        with self._plock:
            self._pending.append(put)
        self._wake.set()
        return put.future

    async def _wait(self, fut: concurrent.futures.Future) -> None:
        """Wait until the queued change is published; the put completes either way (never left in progress)."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), self.put_timeout)
        except TimeoutError:
            log.error("put not published within %.1f s (publisher stalled?)", self.put_timeout)
        except Exception as err:  # noqa: BLE001 - stopping, or the publication failed (already logged)
            log.info("put completed without publication: %s", err)

    def _on_magnet(self, fname: str, i: int):
        t = self.twin

        async def on_update(value: float) -> None:
            if value == self._last["setpoints"][fname][i]:
                return  # the publisher mirroring the twin's state (or a put of what the twin already has)
            await self._wait(self.submit(lambda: t.set_setpoint(fname, float(value), i), f"{fname}:{i + 1:03d}"))

        return on_update

    def _on_family(self, fname: str):
        t = self.twin

        async def on_update(value: np.ndarray) -> None:
            v = np.array(value, dtype=float)
            if np.array_equal(v, self._last["setpoints"][fname]):
                return  # a mirror of the twin's state
            await self._wait(self.submit(lambda: t.set_setpoint(fname, v), f"{fname}:setpoints"))

        return on_update

    def _on_rf(self, what: str):
        t = self.twin
        fn = t.set_rf_frequency if what == "frequency" else t.set_rf_voltage

        async def on_update(value: float) -> None:
            if value == self._last[f"rf_{what}"]:
                return  # a mirror of the twin's state
            await self._wait(self.submit(lambda: fn(float(value)), f"rf:{what}"))

        return on_update

    async def _on_cmd(self, value: str) -> None:
        cmd = parse_command(value, self.twin)
        await self._wait(self.submit(lambda: apply_command(self.twin, cmd), f"cmd {value!r}"))

    # ------------------------------------------------------------------------------------------------
    # publisher
    def start(self) -> None:
        """Publish once (synchronously), then start the publisher thread. Call after ``iocInit``."""
        if self._thread is not None:
            raise RuntimeError("TwinIoc already started")
        self._cycle([])
        self._thread = threading.Thread(target=self._run, name="twin-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the publisher; queued puts complete without being applied."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._plock:
            pending, self._pending = self._pending, []
        for put in pending:
            if not put.future.done():
                put.future.set_exception(RuntimeError("IOC stopping: put not applied"))

    def _run(self) -> None:
        min_period = 1.0 / self.max_rate
        idle = 1.0 / self.idle_rate if self.idle_rate > 0 else None
        last = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(idle)
            if self._stop.is_set():
                break
            wait = min_period - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)  # rate limit: puts arriving meanwhile join this publication
            self._wake.clear()
            with self._plock:
                batch, self._pending = self._pending, []
            last = time.monotonic()
            try:
                self._cycle(batch)
            except Exception as err:  # noqa: BLE001 - keep serving; tell the waiting puts
                log.exception("publication failed")
                for put in batch:
                    if not put.future.done():
                        put.future.set_exception(err)

    def _cycle(self, batch: list[_Put]) -> None:
        t0 = time.perf_counter()
        for put in batch:
            try:
                msg = put.apply()
                if msg and put.what.startswith("cmd"):
                    self.records["cmd_result"].set(msg[:500])
            except Exception as err:  # noqa: BLE001 - a put the twin refuses: report, keep going
                text = f"{put.what}: {err}"
                if put.what.startswith("cmd"):
                    self.records["cmd_result"].set(f"error: {text}"[:500])
                self._refuse(put.what, "", str(err))
        obs = self.observer.observe()
        self._publish(obs)
        for put in batch:
            if not put.future.done():
                put.future.set_result(None)
        dt = time.perf_counter() - t0
        self.cycle_times.append(dt)
        self.records["cycle_time"].set(dt * 1e3)

    def _store_last(self, obs: Observation) -> None:
        self._last = {"setpoints": {k: v.copy() for k, v in obs.setpoints.items()},
                      "readbacks": {k: v.copy() for k, v in obs.readbacks.items()},
                      "rf_frequency": obs.rf_frequency, "rf_voltage": obs.rf_voltage, "anomalies": None,
                      "lost": None, "reason": None}

    def _publish(self, obs: Observation) -> None:
        from softioc import alarm

        R, last = self.records, self._last
        # setpoint mirrors: a family put shows on the single setpoints and vice versa. Processed (so monitors
        # fire); their on_update sees the value equals the mirrored state and does nothing.
        for fname, sp in obs.setpoints.items():
            old = last["setpoints"][fname]
            diff = np.nonzero(sp != old)[0]
            if diff.size:
                last["setpoints"][fname] = sp.copy()
                for i in diff.tolist():
                    R[f"{fname}:{i + 1:03d}:setpoint"].set(float(sp[i]))
                R[f"{fname}:setpoints"].set(sp)
        for fname, rb in obs.readbacks.items():
            if not np.array_equal(rb, last["readbacks"][fname]):
                R[f"{fname}:readbacks"].set(rb)
                last["readbacks"][fname] = rb.copy()
        if obs.rf_frequency != last["rf_frequency"]:
            last["rf_frequency"] = obs.rf_frequency
            R["rf:frequency"].set(obs.rf_frequency)
        if obs.rf_voltage != last["rf_voltage"]:
            last["rf_voltage"] = obs.rf_voltage
            R["rf:voltage"].set(obs.rf_voltage)
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
        for k in (0, 1):
            q = float(obs.tunes[k])
            if np.isfinite(q):
                R[f"tune:{'xy'[k]}"].set(q)
            else:
                R[f"tune:{'xy'[k]}"].set(q, severity=alarm.INVALID_ALARM, alarm=alarm.READ_ALARM)
        R["beam:current"].set(obs.current)
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

    # ------------------------------------------------------------------------------------------------
    @property
    def published(self) -> int:
        """Publications so far."""
        return self._published
