"""Orbit plan stubs (never open a run): corrector selection, ORM steps, the ORM parameter, bump iterations.

Units: correctors [A] (kicks [rad]), orbit [m], RF [Hz].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis import bump as _bump
from ..analysis._common import corrector_table, rms
from ..analysis.orm import OrbitResponse, response_from_orbits
from ..analysis.orm import model_orm as _model_response
from .machine import Record, emit, move, read_orbit, snapshot_setpoints
from .runs import resolve
from .tool import ToolResult

__all__ = ["corrector_devices", "step_sizes", "orbit_response", "load_orm", "bump_setups", "bump_iterations"]


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


def orbit_response(machine, devs: Sequence[Any], sp0: np.ndarray, d_hw: np.ndarray, *, bipolar: bool, n_avg: int,
                   settle: float, record: Record) -> MsgGenerator[tuple[np.ndarray, np.ndarray | None, Any]]:
    """Step each corrector by ``+d`` (and ``-d``), read the orbit, put it back: ``(response [m/A], x0, y0)``.

    One event per corrector in ``record``. A corrector is put back together with the next one's first step (one
    wait instead of two); the last one is put back at the end.
    """
    n = len(machine.bpm)
    resp = np.full((2 * n, len(devs)), np.nan)
    x0 = y0 = None
    if not bipolar:
        x0, y0 = yield from read_orbit(machine, n_avg, where="reading the reference orbit")
    pending: tuple[Any, float] | None = None
    for j, dev in enumerate(devs):
        dp, dm = float(d_hw[j]), (-float(d_hw[j]) if bipolar else 0.0)
        if pending is not None and pending[0] is not dev:
            yield from move(pending[0], pending[1], dev, sp0[j] + dp)
        else:
            yield from move(dev, sp0[j] + dp)
        pending = None
        if settle:
            yield from bps.sleep(settle)
        xp, yp = yield from read_orbit(machine, n_avg, where=f"stepping {dev.name} by {dp:+g} A")
        if bipolar:
            yield from move(dev, sp0[j] + dm)
            if settle:
                yield from bps.sleep(settle)
            xm, ym = yield from read_orbit(machine, n_avg, where=f"stepping {dev.name} by {dm:+g} A")
        else:
            xm, ym = x0, y0
        pending = (dev, float(sp0[j]))
        col = response_from_orbits(xp, yp, xm, ym, dp - dm)
        resp[:, j] = col
        record.update(index=j, setpoint0=sp0[j], delta_plus=dp, delta_minus=dm,
                      orbit_plus=np.concatenate([xp, yp]), orbit_minus=np.concatenate([xm, ym]),
                      response_rms=rms(col))
        yield from emit(record)
    if pending is not None:
        yield from move(*pending)
    return resp, x0, y0


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
        use_rf = _bump.needs_rf(p, n_correctors, ang is not None) if rf is None else bool(rf)
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

    for it in range(0, int(max_iter) + 1):
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
    return ToolResult(res, units, desc)
