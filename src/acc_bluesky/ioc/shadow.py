"""The digital shadow: a model that follows a live machine and says when the machine stops behaving like it.

:class:`Shadow` (no EPICS): its own :class:`~acc_bluesky.twin.Twin` (the design machine by default, or an error
seed) takes the live setpoints; it predicts what the BPMs and the tune monitor should read (noise-free), and
compares: residual = measured - model. An *anomaly* is raised when, compared with the reference residuals (those
at start-up, or zero), the rms orbit residual changes by more than ``orbit_threshold``, a tune residual by more
than ``tune_threshold``, a supply's readback leaves its setpoint by more than ``readback_threshold``, BPMs stop
reading (NaN) or the live PVs disconnect; a condition must last ``hold`` seconds to raise the flag, and be gone
``hold`` seconds to clear it.

:class:`ShadowServer` (a pythonSoftIOC process, ``acc-bluesky shadow PROFILE``): follows the live machine
through Channel Access monitors (aioca) on the PVs named by the profile's templates, publishes the model orbit and
tunes, residuals, rms, the anomaly flag and its reason on its own prefix (:func:`~acc_bluesky.ioc.names.
shadow_pv_names`; thresholds are writable PVs), and records a snapshot run in Tiled every ``snapshot_period``
seconds and at every rise and fall of the flag (tool ``digital_shadow``, stream ``primary``: measured, model and
residual orbits and tunes, and every family's setpoints and readbacks).
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from ..devices import pv_names
from ..profile import Profile, load_profile
from ..twin import Twin
from .names import shadow_pv_names
from .observe import one_turn_tunes

__all__ = ["ShadowConfig", "Measurement", "ShadowState", "Shadow", "ShadowServer", "SnapshotWriter",
           "serve_shadow"]

log = logging.getLogger(__name__)


@dataclass
class ShadowConfig:
    """Thresholds and rates of the shadow.

    Attributes:
        orbit_threshold: rms change [m] of the orbit residual (either plane) that raises the flag.
        tune_threshold: change of a tune residual that raises the flag.
        readback_threshold: |readback - setpoint| [hardware units, A] of any supply that raises the flag.
        hold: seconds a condition must last to raise the flag, and be gone to clear it.
        reference: ``"start"``: residuals are compared with those of the first complete measurement (an errored
            machine against a design model has large but steady residuals); ``"zero"``: with zero.
        snapshot_period: seconds between Tiled snapshots (0: only when the flag rises or falls).
        max_rate: highest model update rate [Hz].
        connect_timeout: seconds to wait for the live PVs before reporting which did not connect.
        catalog_dir, tiled, write_tiled: where snapshots go (an embedded catalogue, a Tiled server) or nowhere.
    """

    orbit_threshold: float = 50e-6
    tune_threshold: float = 2e-3
    readback_threshold: float = 0.05
    hold: float = 0.5
    reference: Literal["start", "zero"] = "start"
    snapshot_period: float = 60.0
    max_rate: float = 20.0
    connect_timeout: float = 10.0
    catalog_dir: str | None = None
    tiled: str | None = None
    write_tiled: bool = True

    def __post_init__(self) -> None:
        for name in ("orbit_threshold", "tune_threshold", "readback_threshold", "max_rate", "connect_timeout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ShadowConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("hold", "snapshot_period"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"ShadowConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.reference not in ("start", "zero"):
            raise ValueError(f"ShadowConfig.reference must be 'start' or 'zero', got {self.reference!r}")


@dataclass
class Measurement:
    """What the live machine shows: orbit [m], tunes, current [A], setpoints and readbacks per family [A]."""

    x: np.ndarray
    y: np.ndarray
    tunes: np.ndarray
    current: float = float("nan")
    setpoints: dict[str, np.ndarray] = field(default_factory=dict)
    readbacks: dict[str, np.ndarray] = field(default_factory=dict)
    rf_frequency: float | None = None
    rf_voltage: float | None = None
    disconnected: list[str] = field(default_factory=list)


@dataclass
class ShadowState:
    """One evaluation: model, residuals (measured - model), their change from the reference, and the flag."""

    time: float
    model_x: np.ndarray
    model_y: np.ndarray
    resid_x: np.ndarray
    resid_y: np.ndarray
    rms_x: float
    rms_y: float
    model_tunes: np.ndarray
    resid_tunes: np.ndarray
    conditions: list[str]
    anomaly: bool
    reason: str
    edge: str | None  # "raised", "cleared" or None
    count: int
    updates: int


def _rms(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


def _names(idx, names: list[str], limit: int = 4) -> str:
    """The device names (from the profile) of the first indices, and how many more."""
    idx = sorted(int(i) for i in idx)
    s = ", ".join(names[i] for i in idx[:limit])
    return s + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


class Shadow:
    """The model side of the digital shadow (no EPICS): follow setpoints, predict, compare, flag.

    Args:
        profile: the machine's profile (or its name/path).
        seed: error seed of the model's twin (``None``: the design machine).
        config: thresholds (:class:`ShadowConfig`).
        twin: use this twin as the model instead of making one.
    """

    def __init__(self, profile: Profile | str, seed: int | None = None, config: ShadowConfig | None = None, *,
                 twin: Twin | None = None):
        self.profile = load_profile(profile)
        self.twin = twin or Twin(self.profile, seed=seed)
        self.config = config or ShadowConfig()
        self.anomaly = False
        self.count = 0
        self.updates = 0
        self._ref: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._ref_nan: set[int] = set()
        self._since: float | None = None
        self._clear_since: float | None = None
        self._pred: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._follow_errors: list[str] = []

    # ------------------------------------------------------------------------------------------------
    def follow(self, m: Measurement) -> None:
        """Apply the live setpoints (changed families only) and RF to the model."""
        t = self.twin
        errors = []
        for fam, sp in m.setpoints.items():
            if fam not in t.family_names:
                continue
            sp = np.asarray(sp, dtype=float)
            if sp.shape != t.get_setpoint(fam).shape or np.array_equal(sp, t.get_setpoint(fam)):
                continue
            try:
                t.set_setpoint(fam, sp)
            except ValueError as err:  # LimitError: the live machine holds a value the profile forbids
                errors.append(str(err))
        for value, setter, current in ((m.rf_frequency, t.set_rf_frequency, t.rf_frequency_setpoint),
                                       (m.rf_voltage, t.set_rf_voltage, t.rf_voltage_setpoint)):
            if value is not None and math.isfinite(value) and value != current:
                try:
                    setter(float(value))
                except ValueError as err:
                    errors.append(str(err))
        self._follow_errors = errors

    def predict(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Noise-free model BPM readings (x, y) [m] and tunes; recomputed only when the model changed."""
        t = self.twin
        if self._pred is None or self._pred[0] != t.version:
            with t._lock:
                version = t.version
                x, y = t.errors.bpm_transform(*t.orbit())
                q = one_turn_tunes(t)
            self._pred = (version, np.asarray(x), np.asarray(y), np.asarray(q))
        return self._pred[1], self._pred[2], self._pred[3]

    def rebaseline(self) -> None:
        """Take the next evaluation's residuals as the reference (after a deliberate change the model misses)."""
        self._ref = None

    # ------------------------------------------------------------------------------------------------
    def evaluate(self, m: Measurement, now: float | None = None) -> ShadowState:
        """Compare a measurement with the model; update the anomaly flag (with the ``hold`` debounce)."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        self.updates += 1
        mx, my, mq = self.predict()
        x, y = np.asarray(m.x, dtype=float), np.asarray(m.y, dtype=float)
        q = np.asarray(m.tunes, dtype=float)
        rx, ry, rq = x - mx, y - my, q - mq
        nan_now = set(np.nonzero(~np.isfinite(x) | ~np.isfinite(y))[0].tolist())
        model_ok = bool(np.all(np.isfinite(mx)))
        beam = len(nan_now) < len(x)
        if self._ref is None:
            if cfg.reference == "zero":
                self._ref = (np.zeros_like(rx), np.zeros_like(ry), np.zeros(2))
                self._ref_nan = set()
            elif beam and model_ok and np.all(np.isfinite(rq)) and not m.disconnected:
                self._ref = (np.where(np.isfinite(rx), rx, 0.0), np.where(np.isfinite(ry), ry, 0.0), rq.copy())
                self._ref_nan = set(nan_now)
        ref = self._ref or (np.zeros_like(rx), np.zeros_like(ry), np.zeros(2))
        dx, dy, dq = rx - ref[0], ry - ref[1], rq - ref[2]
        rms_x, rms_y = _rms(dx), _rms(dy)

        cond: list[str] = []
        if m.disconnected:
            cond.append(f"live machine unreachable: {len(m.disconnected)} PV(s) disconnected "
                        f"({', '.join(m.disconnected[:3])})")
        if not beam:
            cond.append("no beam: every BPM reads nothing")
        elif nan_now - self._ref_nan:
            new = nan_now - self._ref_nan
            cond.append(f"{len(new)} BPM(s) read nothing: {_names(new, self.profile.bpm_names)}")
        if beam and not model_ok:
            cond.append(f"the model has no closed orbit ({self.twin.loss_reason}); the live machine has one")
        for plane, r in (("x", rms_x), ("y", rms_y)):
            if beam and model_ok and math.isfinite(r) and r > cfg.orbit_threshold:
                cond.append(f"orbit residual {plane} changed by {r * 1e6:.1f} um rms "
                            f"(threshold {cfg.orbit_threshold * 1e6:.1f} um)")
        for k, plane in enumerate("xy"):
            if beam and math.isfinite(dq[k]) and abs(dq[k]) > cfg.tune_threshold:
                cond.append(f"tune residual {plane} changed by {dq[k]:+.4f} (threshold {cfg.tune_threshold:g})")
        mism = []
        for fam, rb in m.readbacks.items():
            sp = m.setpoints.get(fam)
            if sp is None or np.shape(sp) != np.shape(rb):
                continue
            bad = np.nonzero(np.abs(np.asarray(rb) - np.asarray(sp)) > cfg.readback_threshold)[0]
            mism.extend((fam, int(i), float(sp[i]), float(rb[i])) for i in bad)
        if mism:
            shown = ", ".join(f"{self.profile.families[f].device_names[i]} (set {s:g}, reads {r:g})"
                              for f, i, s, r in mism[:3])
            more = f" and {len(mism) - 3} more" if len(mism) > 3 else ""
            cond.append(f"supply readback != setpoint: {shown}{more}")
        cond.extend(self._follow_errors)

        edge = None
        if cond:
            self._clear_since = None
            if self._since is None:
                self._since = now
            if not self.anomaly and now - self._since >= cfg.hold:
                self.anomaly = True
                self.count += 1
                edge = "raised"
        else:
            self._since = None
            if self.anomaly:
                if self._clear_since is None:
                    self._clear_since = now
                if now - self._clear_since >= cfg.hold:
                    self.anomaly = False
                    edge = "cleared"
        reason = "; ".join(cond)
        return ShadowState(now, mx, my, rx, ry, rms_x, rms_y, mq, rq, cond, self.anomaly, reason, edge, self.count,
                           self.updates)


# ====================================================================================================
# Tiled snapshots
class _SnapshotReadable:
    """A bluesky Readable over the arrays of one snapshot (units and meaning in ``describe``)."""

    def __init__(self, values: dict[str, Any], units: dict[str, str], descriptions: dict[str, str]):
        self.name = "shadow"
        self.parent = None
        self._values = {k: (np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v).item())
                        for k, v in values.items()}
        self._units = units
        self._desc = descriptions
        self._t = time.time()

    def describe(self) -> dict[str, dict[str, Any]]:
        out = {}
        for k, v in self._values.items():
            arr = np.asarray(v)
            key = {"source": f"acc_bluesky:shadow:{k}", "shape": list(arr.shape), "units": self._units.get(k, ""),
                   "description": self._desc.get(k, ""), "dtype_numpy": arr.dtype.str}
            key["dtype"] = "array" if arr.ndim else ("boolean" if arr.dtype.kind == "b" else
                                                     "integer" if arr.dtype.kind in "iu" else "number")
            out[k] = key
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": v, "timestamp": self._t} for k, v in self._values.items()}


class SnapshotWriter:
    """Records shadow snapshots as runs in Tiled (tool ``digital_shadow``) with the project's RunEngine.

    Runs the RunEngine in the calling thread (the shadow process's main thread): each :meth:`write` is one run.
    """

    def __init__(self, profile: Profile, config: ShadowConfig, params: dict[str, Any]):
        from ..data import make_run_engine, tool_metadata

        self.profile = profile
        self.RE = make_run_engine(tiled=config.tiled, catalog_dir=config.catalog_dir, progress=False,
                                  context_managers=[], offline_ok=True)
        ns = SimpleNamespace(profile=profile, mode="epics", seed=None)
        self._md = tool_metadata("digital_shadow", ns, plan_name="shadow_snapshot", **params)
        self.written = 0

    def write(self, state: ShadowState, m: Measurement, trigger: str) -> str:
        import bluesky.plan_stubs as bps
        import bluesky.preprocessors as bpp

        values: dict[str, Any] = {
            "x_measured": m.x, "y_measured": m.y, "x_model": state.model_x, "y_model": state.model_y,
            "x_residual": state.resid_x, "y_residual": state.resid_y, "rms_x": state.rms_x, "rms_y": state.rms_y,
            "current": float(m.current), "anomaly": bool(state.anomaly),
        }
        units = {"x_measured": "m", "y_measured": "m", "x_model": "m", "y_model": "m", "x_residual": "m",
                 "y_residual": "m", "rms_x": "m", "rms_y": "m", "current": "A", "setpoints": "A", "readbacks": "A"}
        desc = {"x_residual": "measured - model orbit at the BPMs", "y_residual": "measured - model orbit",
                "rms_x": "rms of (residual - reference residual), x", "rms_y": "rms of (residual - reference), y",
                "anomaly": "anomaly flag at this time",
                "setpoints": "every family's setpoints, concatenated in profile order (start md 'families')",
                "readbacks": "every family's readbacks, concatenated like setpoints"}
        for k, plane in enumerate("xy"):  # scalars: small arrays do not fit Tiled's tabular storage
            values[f"tune_{plane}_measured"] = float(m.tunes[k])
            values[f"tune_{plane}_model"] = float(state.model_tunes[k])
            values[f"tune_{plane}_residual"] = float(state.resid_tunes[k])
        fams = [f for f in self.profile.families if f in m.setpoints and f in m.readbacks]
        values["setpoints"] = np.concatenate([np.asarray(m.setpoints[f], dtype=float) for f in fams])
        values["readbacks"] = np.concatenate([np.asarray(m.readbacks[f], dtype=float) for f in fams])
        offsets, start = {}, 0
        for f in fams:
            n = len(m.setpoints[f])
            offsets[f] = [start, start + n]
            start += n
        obj = _SnapshotReadable(values, units, desc)
        md = dict(self._md) | {"trigger": trigger, "anomaly": bool(state.anomaly), "anomaly_reason": state.reason,
                               "anomaly_count": int(state.count), "families": offsets}

        @bpp.run_decorator(md=md)
        def plan():
            yield from bps.create("primary")
            yield from bps.read(obj)
            yield from bps.save()

        uid = str(self.RE(plan()))
        self.RE.wait_for_catalog()  # counted (the snapshots PV) once other processes can read it
        self.written += 1
        return uid


# ====================================================================================================
# the EPICS side
class ShadowServer:
    """Serves a :class:`Shadow` as EPICS records and feeds it from Channel Access monitors of the live machine.

    Args:
        shadow: the model side.
        prefix: the live machine's PV prefix (default: the profile's).
        shadow_prefix: where the shadow's PVs go (default ``{prefix}SHADOW:``).
        snapshots: a queue receiving ``(state, measurement, trigger)`` for the snapshot writer (or None).
    """

    def __init__(self, shadow: Shadow, prefix: str | None = None, shadow_prefix: str | None = None,
                 snapshots: queue.Queue | None = None):
        self.shadow = shadow
        self.profile = shadow.profile
        self.config = shadow.config
        self.pvs = pv_names(self.profile, prefix)
        self.spvs = shadow_pv_names(self.profile, shadow_prefix, prefix)
        self.snapshots = snapshots
        fams = list(self.profile.families)
        self.follow_keys = ([f"{f}:setpoints" for f in fams] + [f"{f}:readbacks" for f in fams]
                            + ["rf:frequency", "rf:voltage", "orbit:x", "orbit:y", "tune:x", "tune:y",
                               "beam:current"])
        self.records: dict[str, Any] = {}
        self.n_records = 0
        self._latest: dict[str, Any] = {}
        self._connected: dict[str, bool] = dict.fromkeys(self.follow_keys, False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rebaseline = threading.Event()
        self._thread: threading.Thread | None = None
        self._subs: list[Any] = []
        self._last_snapshot = time.monotonic()
        self.state: ShadowState | None = None

    def build(self) -> int:
        """Create the shadow's records (before ``LoadDatabase``/``iocInit``); returns how many."""
        from softioc import builder

        nb, s, R, cfg = len(self.profile.bpm_refpts), self.spvs, self.records, self.config
        before = builder.CountRecords()
        zeros = np.zeros(max(2, nb))
        for key, desc in (("orbit:x_model", "model orbit x"), ("orbit:y_model", "model orbit y"),
                          ("orbit:x_residual", "measured - model orbit x"),
                          ("orbit:y_residual", "measured - model orbit y")):
            R[key] = builder.WaveformIn(s[key], initial_value=zeros[:nb], length=max(2, nb), EGU="m", PREC=9,
                                        DESC=desc)
        for key in ("orbit:x_rms", "orbit:y_rms"):
            R[key] = builder.aIn(s[key], initial_value=0.0, EGU="m", PREC=9, DESC="rms residual change")
        for key in ("tune:x_model", "tune:y_model", "tune:x_residual", "tune:y_residual"):
            R[key] = builder.aIn(s[key], initial_value=0.0, PREC=6)
        R["anomaly"] = builder.boolIn(s["anomaly"], ZNAM="ok", ONAM="ANOMALY", OSV="MAJOR", initial_value=0)
        R["anomaly_reason"] = builder.longStringIn(s["anomaly_reason"], initial_value="starting", length=1024)
        R["anomaly_count"] = builder.longIn(s["anomaly_count"], initial_value=0)
        for key, attr, egu in (("threshold:orbit", "orbit_threshold", "m"), ("threshold:tune", "tune_threshold", ""),
                               ("threshold:readback", "readback_threshold", "A")):
            R[key] = builder.aOut(s[key], initial_value=getattr(cfg, attr), EGU=egu, PREC=9, DRVL=0.0,
                                  validate=lambda _r, v: math.isfinite(v) and v > 0,
                                  on_update=self._threshold_setter(attr))
        R["rebaseline"] = builder.boolOut(s["rebaseline"], ZNAM="idle", ONAM="rebaseline", initial_value=0,
                                          always_update=True, on_update=self._on_rebaseline)
        R["updates"] = builder.int64In(s["updates"], initial_value=0)
        R["snapshots"] = builder.longIn(s["snapshots"], initial_value=0)
        R["connected"] = builder.boolIn(s["connected"], ZNAM="disconnected", ONAM="connected", initial_value=0)
        self.n_records = builder.CountRecords() - before
        return self.n_records

    def _threshold_setter(self, attr: str):
        def on_update(value: float) -> None:
            setattr(self.config, attr, float(value))
            self._wake.set()

        return on_update

    def _on_rebaseline(self, value: int) -> None:
        if value:
            self._rebaseline.set()
            self._wake.set()

    # monitors (in the IOC's asyncio loop) -----------------------------------------------------------------
    async def subscribe(self) -> None:
        """Monitor every followed PV of the live machine; log which did not connect within the timeout."""
        from aioca import FORMAT_TIME, camonitor, connect

        names = [self.pvs[k] for k in self.follow_keys]
        for key, pv in zip(self.follow_keys, names):
            self._subs.append(camonitor(pv, self._callback(key), format=FORMAT_TIME, notify_disconnect=True,
                                        all_updates=False))
        results = await connect(names, timeout=self.config.connect_timeout, throw=False)
        bad = [pv for pv, r in zip(names, results) if not getattr(r, "ok", True)]
        if bad:
            log.error("shadow: %d live PV(s) did not connect within %g s: %s", len(bad), self.config.connect_timeout,
                      ", ".join(bad[:10]))

    def _callback(self, key: str):
        def cb(value) -> None:
            if not getattr(value, "ok", True):
                self._connected[key] = False
            else:
                self._connected[key] = True
                self._latest[key] = np.array(value, dtype=float) if np.ndim(value) else float(value)
            self._wake.set()

        return cb

    # model thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for sub in self._subs:
            try:
                sub.close()
            except Exception:  # noqa: BLE001 - closing at exit
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def measurement(self) -> Measurement | None:
        """The latest complete measurement (None until every followed PV has sent a value)."""
        lat = dict(self._latest)
        if any(k not in lat for k in self.follow_keys):
            return None
        fams = self.profile.families
        return Measurement(
            x=lat["orbit:x"], y=lat["orbit:y"], tunes=np.array([lat["tune:x"], lat["tune:y"]]),
            current=lat["beam:current"],
            setpoints={f: lat[f"{f}:setpoints"] for f in fams},
            readbacks={f: lat[f"{f}:readbacks"] for f in fams},
            rf_frequency=lat["rf:frequency"], rf_voltage=lat["rf:voltage"],
            disconnected=[self.pvs[k] for k, ok in self._connected.items() if not ok])

    def _run(self) -> None:
        min_period = 1.0 / self.config.max_rate
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.2)  # also re-evaluate periodically for the hold debounce
            if self._stop.is_set():
                break
            wait = min_period - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)
            self._wake.clear()
            last = time.monotonic()
            try:
                self._step()
            except Exception:  # noqa: BLE001 - keep following
                log.exception("shadow evaluation failed")

    def _step(self) -> None:
        m = self.measurement()
        R = self.records
        if m is None:
            missing = [self.pvs[k] for k in self.follow_keys if k not in self._latest]
            R["anomaly_reason"].set(f"waiting for the live machine: {len(missing)} PV(s) without a value "
                                    f"({', '.join(missing[:3])})"[:1000])
            return
        if self._rebaseline.is_set():
            self._rebaseline.clear()
            self.shadow.rebaseline()
        self.shadow.follow(m)  # applies only the families whose setpoints changed
        st = self.shadow.evaluate(m)
        self.state = st
        self._publish(st, m)
        now = time.monotonic()
        period = self.config.snapshot_period
        trigger = None
        if st.edge is not None:
            trigger = f"anomaly_{st.edge}"
        elif period > 0 and now - self._last_snapshot >= period:
            trigger = "period"
        if trigger and self.snapshots is not None:
            self._last_snapshot = now
            self.snapshots.put((st, m, trigger))

    def _publish(self, st: ShadowState, m: Measurement) -> None:
        from softioc import alarm

        R = self.records
        R["orbit:x_model"].set(st.model_x)
        R["orbit:y_model"].set(st.model_y)
        R["orbit:x_residual"].set(st.resid_x)
        R["orbit:y_residual"].set(st.resid_y)
        for key, v in (("orbit:x_rms", st.rms_x), ("orbit:y_rms", st.rms_y), ("tune:x_model", st.model_tunes[0]),
                       ("tune:y_model", st.model_tunes[1]), ("tune:x_residual", st.resid_tunes[0]),
                       ("tune:y_residual", st.resid_tunes[1])):
            v = float(v)
            if math.isfinite(v):
                R[key].set(v)
            else:
                R[key].set(v, severity=alarm.INVALID_ALARM, alarm=alarm.READ_ALARM)
        R["connected"].set(int(not m.disconnected))
        R["anomaly_reason"].set((st.reason or ("clearing" if st.anomaly else "ok"))[:1000])
        R["anomaly_count"].set(st.count)
        R["anomaly"].set(int(st.anomaly))
        R["updates"].set(st.updates)


def serve_shadow(profile: Profile | str, *, prefix: str | None = None, shadow_prefix: str | None = None,
                 seed: int | None = None, config: ShadowConfig | None = None, pva: bool = False) -> int:
    """Run the shadow IOC in this process until SIGTERM/SIGINT (prints ``IOC ready: ...`` when serving)."""
    from .server import READY_MESSAGE

    t0 = time.perf_counter()
    cfg = config or ShadowConfig()
    prof = load_profile(profile)
    shadow = Shadow(prof, seed=seed, config=cfg)
    snaps: queue.Queue = queue.Queue()
    server = ShadowServer(shadow, prefix, shadow_prefix, snapshots=snaps if cfg.write_tiled else None)
    writer = None
    if cfg.write_tiled:
        writer = SnapshotWriter(prof, cfg, {
            "prefix": server.pvs["orbit:x"].rsplit("ORBIT", 1)[0] if prefix is None else prefix,
            "shadow_prefix": server.spvs["anomaly"][:-len("ANOMALY")], "model_seed": seed,
            "orbit_threshold": cfg.orbit_threshold, "tune_threshold": cfg.tune_threshold,
            "readback_threshold": cfg.readback_threshold, "hold": cfg.hold, "reference": cfg.reference})

    from softioc import asyncio_dispatcher, builder, softioc

    n = server.build()
    builder.LoadDatabase()
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher, enable_pva=pva)
    import asyncio

    asyncio.run_coroutine_threadsafe(server.subscribe(), dispatcher.loop)
    server.start()
    print(f"{READY_MESSAGE}: shadow of {prof.name} prefix={server.spvs['anomaly'][:-len('ANOMALY')]!r} "
          f"model_seed={seed} records={n} start={time.perf_counter() - t0:.1f}s", flush=True)

    stop = threading.Event()

    def handler(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.is_set():
        try:
            st, m, trigger = snaps.get(timeout=0.5)
        except queue.Empty:
            continue
        if writer is None:
            continue
        try:
            uid = writer.write(st, m, trigger)
            server.records["snapshots"].set(writer.written)
            log.info("shadow snapshot %s (%s)", uid, trigger)
        except Exception:  # noqa: BLE001 - a failed snapshot must not stop the shadow
            log.exception("shadow snapshot failed")
    server.stop()
    print("IOC stopped", flush=True)
    softioc.safeEpicsExit(0)
    return 0  # pragma: no cover - epicsExit does not return
