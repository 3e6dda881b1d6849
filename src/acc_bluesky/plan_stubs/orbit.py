"""Orbit plan stubs (never open a run): corrector selection, ORM steps, the ORM parameter, bump iterations.

Units: correctors [A] (kicks [rad]), orbit [m], RF [Hz].
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import FailedStatus, Msg, MsgGenerator
from ophyd_async.core import AsyncStatus

from ..analysis import bump as _bump
from ..analysis._common import corrector_table, rms
from ..analysis.orm import OrbitResponse, response_from_orbits
from ..analysis.orm import model_orm as _model_response
from ..data.run_engine import EventArray
from .machine import (
    _GROUPS,
    BeamLostError,
    Record,
    _DirectPut,
    _movable,
    _orbit_reader,
    check_orbit,
    emit,
    move,
    read_orbit,
    snapshot_setpoints,
)
from .runs import resolve
from .tool import ToolResult

__all__ = ["OrmSteps", "bump_iterations", "bump_setups", "corrector_devices", "load_orm", "orbit_response", "step_sizes"]


def corrector_devices(machine, correctors: Any = None) -> list[Any]:
    """Corrector devices from ``None`` (every in-service corrector, h then v families), a family, devices, or
    device/family names (``"HST_003"``, ``"VST"``)."""
    if correctors is None:
        rows = corrector_table(machine.profile, None)
    else:
        if isinstance(correctors, str) or hasattr(correctors, "connect"):
            correctors = [correctors]
        names = []
        for c in correctors:
            if hasattr(c, "family_name") and hasattr(c, "names") and hasattr(c, "values"):  # a whole family
                fam = machine.profile.families[c.family_name]
                names += [n for i, n in enumerate(fam.device_names) if i not in fam.bad]
            elif hasattr(c, "connect"):
                names.append(c.name)
            else:
                names.append(str(c))
        rows = corrector_table(machine.profile, names)
        if not rows:
            raise ValueError("no corrector selected")
    return [machine.families[fam][i] for (_, fam, i, _) in rows]


def step_sizes(machine, devs: Sequence[Any], sp0: np.ndarray, delta: float | Sequence[float] | None,
               delta_physics: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Half steps per corrector: hardware [A] and physics [rad] (``delta`` [A] or ``delta_physics`` [rad], else
    the profile's ``tools.orbit_response`` default, else 10 urad)."""
    defaults = machine.profile.tool_defaults("orbit_response")
    if delta is not None and delta_physics is not None:
        raise ValueError("give delta [A] or delta_physics [rad], not both")
    if delta is None and delta_physics is None:
        if "delta" in defaults:
            delta = float(defaults["delta"])
        else:
            delta_physics = float(defaults.get("delta_physics", 1e-5))
    m = len(devs)
    d_hw, d_ph = np.zeros(m), np.zeros(m)
    for j, d in enumerate(devs):
        k0 = float(d.to_physics(sp0[j]))
        if delta_physics is not None:
            d_hw[j] = float(d.to_hw(k0 + float(delta_physics))) - sp0[j]
        else:
            d_hw[j] = float(np.broadcast_to(np.asarray(delta, dtype=float), (m,))[j])
        d_ph[j] = float(d.to_physics(sp0[j] + d_hw[j])) - k0
    if np.any(~np.isfinite(d_hw)) or np.any(d_hw == 0):
        raise ValueError(f"corrector steps must be finite and non-zero; got delta={delta}, "
                         f"delta_physics={delta_physics}")
    return d_hw, d_ph


class OrmSteps:
    """The corrector steps of an ORM as bluesky moves that also read the orbit, and each corrector's event.

    ``set(("column", j))`` is one corrector's column: it puts corrector ``j - 1`` back, corrector ``j`` at
    ``setpoint0 + d`` and reads the orbit once it is there (``settle`` waited, then ``n_avg`` acquisitions with the
    BPM period, the beam checked, as :func:`read_orbit` does), then (bipolar) at ``setpoint0 - d`` and reads it
    again. ``set(("plus", j))``, ``set(("minus", j))`` and ``set(("back", j))`` are its single moves. The magnet
    moves as :func:`move` moves it (the twin's supplies without ramp put directly, limits checked; a live supply
    through its ``set``) and the orbit is read from the BPM device's signals: on EPICS or Tango nothing is skipped.
    Each ``set`` waits for the one before it. What it saves is bluesky's messages around every magnet move and
    orbit read: per corrector the RunEngine sees one move, one wait and the event.

    ``read()`` is the last corrector's row (the ``record``'s fields: index, setpoint, steps, both orbits, rms): one
    event per corrector in the ``primary`` stream, as before. ``stop()`` (bluesky calls it on a pause or an abort)
    cancels a step in flight, between two of its magnet moves too; the plan's restore puts everything back.
    """

    def __init__(self, machine, devs: Sequence[Any], sp0: np.ndarray, d_hw: np.ndarray, *, bipolar: bool,
                 n_avg: int, settle: float, record: Record, reference: tuple[np.ndarray, np.ndarray] | None = None):
        if int(n_avg) < 1:
            raise ValueError(f"n_avg must be >= 1, got {n_avg!r}")
        self.name = record.name
        self.parent = None
        self.hints = record.hints
        self._machine, self._devs = machine, list(devs)
        self._sp0, self._d = np.asarray(sp0, dtype=float), np.asarray(d_hw, dtype=float)
        self._bipolar, self._n_avg, self._settle = bool(bipolar), int(n_avg), float(settle or 0.0)
        self._ref = reference
        self._describe = record.describe()
        self._keys = [record.key(f) for f in ("index", "setpoint0", "delta_plus", "delta_minus", "orbit_plus",
                                               "orbit_minus", "response_rms")]
        n = len(machine.bpm)
        self.response = np.full((2 * n, len(self._devs)), np.nan)
        self._reader = _orbit_reader(machine)
        self._plus: tuple[np.ndarray, np.ndarray] | None = None
        self._row: dict[str, dict[str, Any]] = {}
        self._last: AsyncStatus | None = None
        rate = machine.profile.spec.bpm.rate
        self._period = 1.0 / rate if rate else 0.0

    # -- bluesky: Movable, Stoppable, Readable ------------------------------------------------------
    def set(self, value: tuple[str, int]) -> AsyncStatus:
        what, j = value
        if what not in ("plus", "minus", "back", "column"):
            raise ValueError(f"OrmSteps.set takes ('plus' | 'minus' | 'back' | 'column', index), got {value!r}")
        before, self._last = self._last, None
        st = AsyncStatus(self._step(what, int(j), before), name=self.name)
        self._last = st
        return st

    def stop(self, success: bool = False) -> None:
        st = self._last
        if st is not None and not st.done:
            st.task.cancel()

    def describe(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in self._describe.items()}

    def read(self) -> dict[str, Any]:
        return self._row

    # -- one step --------------------------------------------------------------------------------------
    async def _step(self, what: str, j: int, before: AsyncStatus | None) -> None:
        if before is not None and not before.done:
            await before
        if what == "column":
            if j:
                await self._step("back", j - 1, None)
            await self._step("plus", j, None)
            if self._bipolar:
                await self._step("minus", j, None)
            return
        dev, s0, d = self._devs[j], float(self._sp0[j]), float(self._d[j])
        if what == "back":
            await _put(dev, s0)
            return
        step = d if what == "plus" else (-d if self._bipolar else 0.0)
        await _put(dev, s0 + step)
        if self._settle:
            await asyncio.sleep(self._settle)
        x, y = await self._orbit(f"stepping {dev.name} by {step:+g} A")
        if what == "plus" and self._bipolar:
            self._plus = (x, y)
            return
        (xp, yp), (xm, ym) = (self._plus, (x, y)) if self._bipolar else ((x, y), self._ref)
        plus, minus = np.concatenate([xp, yp]), np.concatenate([xm, ym])
        dm = -d if self._bipolar else 0.0
        col = response_from_orbits(xp, yp, xm, ym, d - dm)
        self.response[:, j] = col
        t = time.time()
        self._row = {k: {"value": v, "timestamp": t} for k, v in zip(
            self._keys, (j, s0, d, dm, plus.view(EventArray), minus.view(EventArray), rms(col)))}

    async def _orbit(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        reader = self._reader
        kx, ky = reader.keys
        sx = sy = None
        for _ in range(self._n_avg):
            if self._period:
                await asyncio.sleep(self._period)
            ret = await reader.read()
            x = np.asarray(ret[kx]["value"], dtype=float)
            y = np.asarray(ret[ky]["value"], dtype=float)
            sx = x if sx is None else sx + x
            sy = y if sy is None else sy + y
        x, y = (sx, sy) if self._n_avg == 1 else (sx / self._n_avg, sy / self._n_avg)
        check_orbit(self._machine, x, y, where=where)
        return x, y


async def _put(dev: Any, value: float) -> None:
    mv = _movable(dev)
    if isinstance(mv, _DirectPut):
        await mv._move(float(value))
    else:
        await mv.set(float(value))


def orbit_response(machine, devs: Sequence[Any], sp0: np.ndarray, d_hw: np.ndarray, *, bipolar: bool, n_avg: int,
                   settle: float, record: Record) -> MsgGenerator[tuple[np.ndarray, np.ndarray | None, Any]]:
    """Step each corrector by ``+d`` (and ``-d``), read the orbit, put it back: ``(response [m/A], x0, y0)``.

    One event per corrector in ``record``'s stream layout (``primary``). Per corrector the RunEngine sees one move
    of :class:`OrmSteps` (the previous corrector put back, this one at ``+d``, the orbit read, at ``-d``, the orbit
    read), its wait, and the event. The last corrector is put back at the end.
    """
    x0 = y0 = None
    if not bipolar:
        x0, y0 = yield from read_orbit(machine, n_avg, where="reading the reference orbit")
    steps = OrmSteps(machine, devs, sp0, d_hw, bipolar=bipolar, n_avg=n_avg, settle=settle, record=record,
                     reference=None if bipolar else (x0, y0))

    def measure() -> MsgGenerator[None]:
        try:
            yield from steps_and_events()
        except FailedStatus as err:  # the beam lost at a step: raised as read_orbit raises it
            if isinstance(err.__cause__, BeamLostError):
                raise err.__cause__ from None
            raise

    def steps_and_events() -> MsgGenerator[None]:
        for j in range(len(devs)):
            group = f"acc-orm-{next(_GROUPS)}"
            yield Msg("set", steps, ("column", j), group=group)
            yield Msg("wait", None, group=group)
            yield Msg("create", name="primary")
            yield Msg("read", steps)
            yield Msg("save")
        if devs:
            group = f"acc-orm-{next(_GROUPS)}"
            yield Msg("set", steps, ("back", len(devs) - 1), group=group)
            yield Msg("wait", None, group=group)

    def stop_steps() -> MsgGenerator[None]:  # a step in flight never moves after the plan's restore
        if steps._last is not None and not steps._last.done:
            yield Msg("stop", steps)

    yield from bpp.finalize_wrapper(measure(), stop_steps())
    return steps.response, x0, y0


def load_orm(machine, orm: Any, rf_column: bool = False) -> MsgGenerator[OrbitResponse]:
    """The ``orm=`` parameter of a plan as an :class:`OrbitResponse`: a result, a run of ``measure_orm`` /
    ``model_orm`` (uid, partial uid, ``RE(...)``'s result, Tiled run), or ``"model"`` (the design lattice's
    response). With ``rf_column``, a missing RF column is taken from the model."""
    if isinstance(orm, str) and orm == "model":
        resp = _model_response(machine.profile, rf=True, setpoints=None)
    else:
        resp = yield from resolve(orm, OrbitResponse, tools=("orbit_response",), what="orm")
    for name in resp.corrector_names:
        machine.device(name)  # every column is a device of this machine (else: a clear error)
    if rf_column and resp.rf is None:
        model = _model_response(machine.profile, resp.corrector_names, rf=True)
        resp = OrbitResponse(resp.matrix, resp.matrix_hw, resp.bpm_names, resp.corrector_names, resp.planes,
                             rf=model.rf, delta=resp.delta, delta_physics=resp.delta_physics, df=resp.df,
                             kind=resp.kind, uid=resp.uid, bpm_refpts=resp.bpm_refpts,
                             corrector_refpts=resp.corrector_refpts, metadata=resp.metadata)
    return resp


def bump_setups(machine, resp: OrbitResponse, b: int, planes, amps, angs, n_correctors: int, rf, correctors,
                exclude_correctors, couple: bool, now_sp) -> tuple[list[dict[str, Any]], Any]:
    """Per plane bumped: the correctors (given or chosen), their span, RF use, angle rows, coupling aids."""
    prof = machine.profile
    geo = _bump.bump_geometry(prof)
    setups = []
    for k, p in enumerate(planes):
        ang = angs.get(p)
        ring = prof.kind == "ring"  # (a line's path length is not closed: its bumps never need the RF)
        use_rf = (ring and _bump.needs_rf(p, n_correctors, ang is not None)) if rf is None else bool(rf)
        if correctors is not None:
            per = len(correctors) // len(planes)
            cors = list(correctors[k * per:(k + 1) * per])
            inside = geo.inside(float(geo.s_bpm[b]), cors)
        else:
            headroom = {}
            for c in (c for c, q in zip(resp.corrector_names, resp.planes) if q == p):
                dev = machine.device(c)
                v = float(now_sp[dev.family_name][dev.index])
                headroom[c] = (dev.limits.low - v, dev.limits.high - v)
            cors, inside = _bump.choose_bump_correctors(resp, prof, b, p, n_correctors,
                                                        angle=False if ang is None else float(ang), use_rf=use_rf,
                                                        exclude=exclude_correctors, geometry=geo,
                                                        amplitude=float(amps[p]), headroom=headroom)
        arow = None
        if ang is not None:
            rows = _bump.angle_rows_hw(prof, resp, b, cors)
            arow = np.array([rows[c] for c in cors])
        aux = _bump.aux_correctors(resp, cors, p, geo, exclude_correctors) if couple else []
        seg = _bump.free_segment(geo, b, cors) if ang is not None else np.array([], dtype=int)
        setups.append({"plane": p, "amp": float(amps[p]), "angle": ang, "cors": cors, "inside": inside,
                       "rf": use_rf, "arow": arow, "aux": aux, "segment": seg})
    return setups, geo


def _bump_record(machine, fams: Sequence[str]) -> Record:
    n = len(machine.bpm)
    fields: dict[str, tuple[str, tuple[int, ...], str]] = {
        "iteration": ("", (), "0 = first application, then measured refinements"),
        "amplitude_x": ("m", (), "measured x change at the BPM"),
        "amplitude_y": ("m", (), "measured y change at the BPM"),
        "closure_rms": ("m", (), "rms orbit change outside the bump span (both planes)"),
        "x": ("m", (n,), "horizontal orbit"), "y": ("m", (n,), "vertical orbit"),
        "rf_step": ("Hz", (), "total RF frequency change"),
        "angle_x": ("rad", (), "x angle change at the BPM from the readings of its free segment (NaN: not "
                               "measurable there, the model's is used)"),
        "angle_y": ("rad", (), "y angle change at the BPM from the readings of its free segment"),
    }
    for f in fams:
        fields[f"{f}_step"] = ("A", (len(machine.families[f]),),
                               f"total change of the {f} setpoints (non-zero: the bump's correctors)")
    return Record("bump", fields, hinted=("iteration", "closure_rms"), dtypes={"iteration": "integer"})


def bump_iterations(machine, resp: OrbitResponse, b: int, setups: list[dict[str, Any]], all_cors: list[str],
                    outside: np.ndarray, *, max_iter: int, tol: float, n_avg: int) -> MsgGenerator[ToolResult]:
    """Apply the bump, then refine it from the measured orbit until closed and at its amplitude."""
    prof = machine.profile
    n = len(machine.bpm)
    devs = {c: machine.device(c) for c in all_cors}
    fams = sorted({d.family_name for d in devs.values()})
    any_rf = any(s["rf"] for s in setups)
    snap = yield from snapshot_setpoints(machine, fams, rf=any_rf)
    sp0 = {c: float(snap[d.family_name][d.index]) for c, d in devs.items()}
    f0 = float(snap["RF:frequency"]) if any_rf else float("nan")
    rec = _bump_record(machine, fams)
    x0, y0 = yield from read_orbit(machine, n_avg, where="reading the reference orbit")
    ref = np.concatenate([x0, y0])
    total = dict.fromkeys(all_cors, 0.0)
    rf_total, residual, closure, got = 0.0, None, float("nan"), {}
    measured_angle: dict[str, float | None] = {}

    def family_steps() -> dict[str, np.ndarray]:
        out = {f: np.zeros(len(machine.families[f])) for f in fams}
        for c, v in total.items():
            out[devs[c].family_name][devs[c].index] = v
        return out

    for it in range(int(max_iter) + 1):
        dk, drf = dict.fromkeys(all_cors, 0.0), 0.0
        for s in setups:
            cur_angle = 0.0
            if s["arow"] is not None:  # measured (free segment around the BPM), else the model's
                cur_angle = measured_angle.get(s["plane"])
                if cur_angle is None:
                    cur_angle = float(s["arow"] @ np.array([total[c] for c in s["cors"]]))
            sol = _bump.solve_bump(resp, b, s["plane"], s["amp"], s["cors"], s["inside"], angle=s["angle"],
                                   angle_row_hw=s["arow"], use_rf=s["rf"], residual=residual,
                                   current_angle=cur_angle, aux=[] if len(setups) > 1 else s["aux"])
            for c, v in zip(sol.correctors, sol.step_hw):
                dk[c] += float(v)
            drf += sol.rf_step
        for c, d in devs.items():  # limits before anything moves
            d.limits.check(c, sp0[c] + total[c] + dk[c], d.units)
        if any_rf:
            machine.rf.frequency_limits.check("RF frequency", f0 + rf_total + drf, "Hz")
        args: list[Any] = []
        for c in all_cors:
            total[c] += dk[c]
            args += [devs[c], sp0[c] + total[c]]
        if any_rf and drf:
            rf_total += drf
            args += [machine.rf, f0 + rf_total]
        yield from move(*args)
        x, y = yield from read_orbit(machine, n_avg, where=f"applying bump step {it}")
        residual = np.concatenate([x, y]) - ref
        closure = rms(residual[np.concatenate([outside, outside])])
        got = {"x": residual[b], "y": residual[n + b]}
        for s in setups:
            if s["angle"] is not None:
                measured_angle[s["plane"]] = _bump.angle_from_orbit(prof, b, s["plane"], residual, s["segment"])
        ma = {k: (np.nan if measured_angle.get(k) is None else measured_angle[k]) for k in ("x", "y")}
        rec.update(iteration=it, amplitude_x=got["x"], amplitude_y=got["y"], closure_rms=closure, x=x, y=y,
                   rf_step=rf_total, angle_x=ma["x"], angle_y=ma["y"],
                   **{f"{f}_step": v for f, v in family_steps().items()})
        yield from emit(rec)
        amp_ok = all(abs(got[s["plane"]] - s["amp"]) <= max(1e-3 * abs(s["amp"]), tol) for s in setups)
        ang_ok = all(s["angle"] is None or measured_angle.get(s["plane"]) is None
                     or abs(measured_angle[s["plane"]] - s["angle"]) <= max(2e-3 * abs(s["angle"]), 1e-8)
                     for s in setups)
        if closure <= tol and amp_ok and ang_ok:
            break
    res = {**{f"{f}_step": v for f, v in family_steps().items()}, "rf_step": np.asarray(rf_total),
           "amplitude_x": np.asarray(got.get("x", np.nan)), "amplitude_y": np.asarray(got.get("y", np.nan)),
           "closure_rms": np.asarray(closure), "orbit_change_x": residual[:n], "orbit_change_y": residual[n:],
           "inside": (~outside).astype(np.int64)}
    units = {**{f"{f}_step": "A" for f in fams}, "rf_step": "Hz", "amplitude_x": "m", "amplitude_y": "m",
             "closure_rms": "m", "orbit_change_x": "m", "orbit_change_y": "m", "inside": ""}
    desc = {**{f"{f}_step": f"{f} setpoint changes (the bump's correctors: start document bump_correctors)"
               for f in fams}, "rf_step": "RF frequency change", "amplitude_x": "x change at the BPM",
            "amplitude_y": "y change at the BPM", "closure_rms": "rms change outside the span",
            "orbit_change_x": "x change at every BPM", "orbit_change_y": "y change at every BPM",
            "inside": "1 = BPM inside the bump span"}
    amps = {s["plane"]: s["amp"] for s in setups}
    fig = {"s": np.asarray(machine.bpm.s, dtype=float), "names": list(machine.bpm.names), "bpm": int(b),
           "correctors": [(c, float(devs[c].s), devs[c].plane) for c in all_cors],
           "amplitude": (amps.get("x"), amps.get("y"))}
    return ToolResult(res, units, desc, figure=fig)
