"""Orbit tools as Bluesky plans: ``measure_orm``, ``model_orm``, ``correct_orbit``, ``orbit_bump``,
``measure_dispersion`` (MML's measbpmresp, setorbit, setorbitbump, measdisp).

Every plan is a :func:`~acc_bluesky.plan_stubs.tool.tool`: it takes the :class:`~acc_bluesky.machine.Machine` and
``md=None`` last, opens one run with FAIR metadata, emits one event per step in the ``primary`` stream (live
tables and progress show it), stores its result in the run and returns the run uid. Whatever it changed is put
back exactly when it is aborted, stopped or fails; measurements always leave the machine as they found it,
corrections and bumps keep their result when they complete.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis._common import rms, run_results
from ..analysis.correction import (
    INJECTION_KNOB_LIMITS,
    INJECTION_KNOBS,
    CorrectionSystem,
    correction_floor,
    judge_step,
    limit_step,
    noise_sv_cut,
)
from ..analysis.dispersion import Dispersion, dispersion_from_orbits, rf_step_for_dp
from ..analysis.orm import OrbitResponse, momentum_compaction, response_from_orbits
from ..analysis.orm import model_orm as _model_response
from ..analysis.plots import bump_figure, orbit_figure
from ..analysis.trajectory import model_trajectory_response
from ..machine import Machine
from ..plan_stubs.machine import Record, emit, move, read_orbit, snapshot_setpoints
from ..plan_stubs.orbit import corrector_devices, orbit_response, step_sizes
from ..plan_stubs.runs import find_run
from ..plan_stubs.tool import Restore, ToolResult, open_tool_run, rf_only, thread_safe_figure, tool
from ..plan_stubs.trajectory import injection_trims, need_beam_devices

__all__ = ["measure_orm", "model_orm", "correct_orbit", "orbit_bump", "measure_dispersion"]


# ======================================================================================================
# measure_orm / model_orm
def _orm_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    devs = corrector_devices(machine, args["correctors"])
    return Restore(tuple(dict.fromkeys(d.family_name for d in devs)), rf=bool(args["rf"]))


@thread_safe_figure
def _orm_figure(result: OrbitResponse, path: Path) -> None:
    result.plot(path)


def _orm_record(n: int) -> Record:
    return Record("orm", {
        "index": ("", (), "column of the corrector in the ORM (names in the start document: corrector_names)"),
        "setpoint0": ("A", (), "corrector setpoint before and after its steps"),
        "delta_plus": ("A", (), "corrector step of the first orbit (setpoint0 + delta_plus)"),
        "delta_minus": ("A", (), "corrector step of the second orbit (0 for one-sided: the reference orbit)"),
        "orbit_plus": ("m", (2 * n,), "orbit [x; y] at every BPM at setpoint0 + delta_plus"),
        "orbit_minus": ("m", (2 * n,), "orbit [x; y] at every BPM at setpoint0 + delta_minus"),
        "response_rms": ("m/A", (), "rms of this corrector's response column (both planes)"),
    }, hinted=("index", "response_rms"), dtypes={"index": "integer"})


def _rf_column(machine: Machine, f0: float, df: float, bipolar: bool, n_avg: int, settle: float,
               x0, y0) -> MsgGenerator[np.ndarray]:
    """The orbit response to the RF frequency [m/Hz], one event in the ``rf`` stream; the RF put back."""
    n = len(machine.bpm)
    rec = Record("orm_rf", {
        "f0": ("Hz", (), "RF frequency before and after the steps"),
        "df_plus": ("Hz", (), "RF step of the first orbit"), "df_minus": ("Hz", (), "RF step of the second orbit"),
        "orbit_plus": ("m", (2 * n,), "orbit [x; y] at f0 + df_plus"),
        "orbit_minus": ("m", (2 * n,), "orbit [x; y] at f0 + df_minus")})
    dfp, dfm = df, (-df if bipolar else 0.0)
    yield from move(machine.rf, f0 + dfp)
    if settle:
        yield from bps.sleep(settle)
    xp, yp = yield from read_orbit(machine, n_avg, where=f"stepping the RF frequency by {dfp:+g} Hz")
    xm, ym = x0, y0
    if bipolar:
        yield from move(machine.rf, f0 + dfm)
        if settle:
            yield from bps.sleep(settle)
        xm, ym = yield from read_orbit(machine, n_avg, where=f"stepping the RF frequency by {dfm:+g} Hz")
    yield from move(machine.rf, f0)
    rec.update(f0=f0, df_plus=dfp, df_minus=dfm, orbit_plus=np.concatenate([xp, yp]),
               orbit_minus=np.concatenate([xm, ym]))
    yield from emit(rec, stream="rf")
    return response_from_orbits(xp, yp, xm, ym, dfp - dfm)


@tool("orbit_response", restore=_orm_restore, figures={"orm": _orm_figure})
def measure_orm(machine: Machine, correctors: Any = None, delta: float | Sequence[float] | None = None,
                delta_physics: float | None = None, bipolar: bool = True, n_avg: int = 1, settle: float = 0.0,
                rf: bool = False, df: float | None = None, figure_dir: str | Path | bool | None = None,
                md: dict | None = None) -> MsgGenerator[str]:
    """Measure the orbit response matrix: both planes at every BPM, to every chosen corrector (and the RF).

    Each corrector is stepped by ``+delta`` (and ``-delta`` if ``bipolar``) from its setpoint, the orbit is read,
    and the corrector is put back; one event per corrector in the ``primary`` stream holds both orbits. The full
    ``2n x m`` matrix (x and y rows for every corrector: the coupling blocks too) is stored in the run in m/A and
    m/rad; read it back with ``OrbitResponse.from_run(catalog[uid])``. Figure: the matrix (``figures.orm``).

    Args:
        machine: the connected machine.
        correctors: ``None`` (every in-service corrector of every h then v family), a family, Corrector devices,
            or device/family names (``"HST_003"``, ``"VST"``).
        delta: corrector half step [A] (scalar or one per corrector); default: the profile's
            ``tools.orbit_response.delta``.
        delta_physics: half step as a kick [rad] instead (converted with each corrector's calibration).
        bipolar: ``+delta`` and ``-delta`` (True: second-order errors cancel) or ``+delta`` against a reference
            orbit read once at the start.
        n_avg: orbit acquisitions averaged per step.
        settle: wait after each move [s] (power-supply and eddy-current settling on a real machine).
        rf: also measure the response to the RF frequency (``rf`` stream, result ``orm_rf`` in m/Hz).
        df: RF half step [Hz]; default the profile's ``tools.orbit_response.df``, else ``tools.dispersion.df``,
            else the step of ``|dp/p| = 3e-4`` (``analysis.rf_step_for_dp``: ``3e-4 alpha_c f_RF``).
        figure_dir: folder of the figure (default ``$ACC_BLUESKY_FIGURE_DIR``); ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    devs = corrector_devices(machine, correctors)
    snap = yield from snapshot_setpoints(machine, list(dict.fromkeys(d.family_name for d in devs)), rf=rf)
    sp0 = np.array([snap[d.family_name][d.index] for d in devs])
    d_hw, d_ph = step_sizes(machine, devs, sp0, delta, delta_physics)
    for d, s, dh in zip(devs, sp0, d_hw):  # refuse before anything moves
        for v in ((s + dh, s - dh) if bipolar else (s + dh,)):
            d.limits.check(d.name, v, d.units)
    defaults = machine.profile.tool_defaults("orbit_response")
    df = df if df is not None else defaults.get("df", machine.profile.tool_defaults("dispersion").get("df"))
    f0 = float(snap["RF:frequency"]) if rf else float("nan")
    if df is None:  # no step given: sized for |dp/p| = 3e-4 (analysis.dispersion.rf_step_for_dp)
        df = rf_step_for_dp(f0, momentum_compaction(machine.profile.load_lattice())) if rf else 0.0
    df = float(df)
    if rf:
        for v in ((f0 + df, f0 - df) if bipolar else (f0 + df,)):
            machine.rf.frequency_limits.check("RF frequency", v, "Hz")
    refs = [d.refpt for d in devs]
    yield from open_tool_run(bpm_names=machine.bpm.names, corrector_names=[d.name for d in devs],
                             corrector_planes=[d.plane for d in devs], orm_kind="measured",
                             delta_hw=d_hw.tolist(), delta_physics_rad=d_ph.tolist(),
                             bpm_refpts=np.asarray(machine.bpm.refpts).tolist(), corrector_refpts=refs,
                             num_points=len(devs))
    resp_hw, x0, y0 = yield from orbit_response(machine, devs, sp0, d_hw, bipolar=bipolar, n_avg=n_avg,
                                                settle=settle, record=_orm_record(len(machine.bpm)))
    rf_col = (yield from _rf_column(machine, f0, df, bipolar, n_avg, settle, x0, y0)) if rf else None
    kick = d_ph * (2.0 if bipolar else 1.0)
    resp = OrbitResponse(
        matrix=resp_hw * (d_hw * (2.0 if bipolar else 1.0)) / kick, matrix_hw=resp_hw,
        bpm_names=machine.bpm.names, corrector_names=[d.name for d in devs], planes=[d.plane for d in devs],
        rf=rf_col, delta=d_hw, delta_physics=d_ph, df=df if rf else None, kind="measured",
        bpm_refpts=np.asarray(machine.bpm.refpts), corrector_refpts=np.asarray(refs))
    dead = resp.flag_dead_columns(float(defaults.get("dead_fraction", 0.05))) if len(devs) > 2 else []
    if dead:
        warnings.warn(f"measure_orm: {len(dead)} corrector(s) moved the orbit by less than "
                      f"{defaults.get('dead_fraction', 0.05):g} of their plane's median response: {', '.join(dead[:8])}"
                      f"{' ...' if len(dead) > 8 else ''}. Stuck or dead power supplies? Their columns are flagged "
                      "(results column_ok = 0) and correct_orbit leaves them out unless use_flagged=True.",
                      stacklevel=2)
    return resp


@tool("orbit_response", needs_beam=False, figures={"orm": _orm_figure})
def model_orm(machine: Machine, correctors: Any = None, rf: bool = True, method: str = "analytic",
              figure_dir: str | Path | bool | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """Record the model orbit response of the design lattice as an ``orbit_response`` run: nothing moves.

    The same matrix as ``correct_orbit(orm="model")`` uses (pyAT's analytic response of the profile's design
    lattice, both planes at every BPM, in m/rad and, through the nominal calibrations, m/A), stored in the run
    (``orm_kind="model"``): a correction made with it, or a comparison with a measured ORM, can be analysed from
    the catalogue alone (``OrbitResponse.from_run(catalog[uid])``, ``correct_orbit(m, orm=uid)``).

    Args:
        machine: the connected machine (its profile gives the lattice, BPMs and correctors).
        correctors: ``None`` (every in-service corrector, h then v families), devices, or names.
        rf: also the response to the RF frequency [m/Hz] (fixed path length: the dispersion term).
        method: ``"analytic"`` (pyAT's ``OrbitResponseMatrix.build_analytical``) or ``"tracking"``.
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    if method not in ("analytic", "tracking"):
        raise ValueError(f"method must be 'analytic' or 'tracking', got {method!r}")
    devs = corrector_devices(machine, correctors)
    resp = _model_response(machine.profile, [d.name for d in devs], rf=rf, method=method)
    yield from open_tool_run(**resp.start_metadata(), num_points=0)
    return resp


# ======================================================================================================
# correct_orbit
def _target_orbit(machine: Machine, target: Any) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
    """Golden orbit (x, y) [m]: None (zero), arrays, a (2n,) vector, or a run holding an orbit (a saved
    configuration, a golden orbit from ``apply_bba``, a correction's final orbit)."""
    n = len(machine.bpm)
    if target is None:
        return np.zeros(n), np.zeros(n)
    if isinstance(target, str) or hasattr(target, "metadata") or hasattr(target, "run_start_uids"):
        run = yield from find_run(target, what="target orbit")
        res = run_results(run)
        for kx, ky in (("golden_x", "golden_y"), ("orbit_x", "orbit_y"), ("x_after", "y_after"), ("x", "y")):
            if kx in res and ky in res:
                tx, ty = (np.asarray(res[k], float).reshape(-1) for k in (kx, ky))
                break
        else:
            raise KeyError(f"the target run holds no orbit (results: {sorted(res)}); save one with save_config "
                           "or apply_bba, or pass arrays")
    elif isinstance(target, tuple) and len(target) == 2:
        tx, ty = (np.asarray(t, dtype=float).reshape(-1) for t in target)
    else:
        v = np.asarray(target, dtype=float).reshape(-1)
        if v.size != 2 * n:
            raise ValueError(f"target must be (x, y) arrays or a ({2 * n},) vector, got {v.size} values")
        tx, ty = v[:n], v[n:]
    if tx.shape != (n,) or ty.shape != (n,):
        raise ValueError(f"target orbit must have {n} values per plane, got {tx.shape}, {ty.shape}")
    if not (np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))):
        raise ValueError("target orbit has non-finite values (NaN or inf): give a number per BPM and plane")
    return tx, ty


@thread_safe_figure
def _orbit_figure(result: ToolResult, path: Path) -> None:
    r = result.value
    orbit_figure(path, r["s"], r["names"], r["before"], r["after"], r["title"])


def _correction_record(machine: Machine, groups: dict[str, list[tuple[int, int]]], injection: bool = False
                       ) -> Record:
    n = len(machine.bpm)
    fields: dict[str, tuple[str, tuple[int, ...], str]] = {
        "iteration": ("", (), "iteration number (1-based)"),
        "rms_x_before": ("m", (), "rms of x reading - target before the step"),
        "rms_y_before": ("m", (), "rms of y reading - target before the step"),
        "rms_x_after": ("m", (), "rms of x reading - target after the step"),
        "rms_y_after": ("m", (), "rms of y reading - target after the step"),
        "x_before": ("m", (n,), "horizontal orbit before the step"),
        "y_before": ("m", (n,), "vertical orbit before the step"),
        "x_after": ("m", (n,), "horizontal orbit after the step"),
        "y_after": ("m", (n,), "vertical orbit after the step"),
        "rf_step": ("Hz", (), "RF frequency step of this iteration"),
        "rf_frequency": ("Hz", (), "RF frequency after the step"),
        "scale": ("", (), "factor applied to the step to respect max_step (1 = none)"),
        "n_clipped": ("", (), "correctors clipped at their limits in this iteration"),
        "undone": ("", (), "1 if this step made the orbit worse and was taken back"),
    }
    for fam in groups:
        k = len(machine.families[fam])
        fields[f"{fam}_step"] = ("A", (k,), f"{fam} setpoint change of this iteration")
        fields[f"{fam}_setpoint"] = ("A", (k,), f"{fam} setpoints after the step")
    if injection:
        fields["injection_step"] = ("m | rad", (4,), "injection trims x, px, y, py: change of this iteration")
        fields["injection"] = ("m | rad", (4,), "injection trims x, px, y, py after the step")
    return Record("orbit_correction", fields, hinted=("iteration", "rms_x_after", "rms_y_after"),
                  dtypes={"iteration": "integer", "n_clipped": "integer", "undone": "integer"})


class _Correction:
    """The state of one orbit correction: the system, the setpoints, the steps made safe; ``trims``: the
    injection trims x, px, y, py when the system steers with them (a transfer line), else ``None``."""

    def __init__(self, machine: Machine, resp: OrbitResponse, system: CorrectionSystem, sp: dict, f0: float,
                 fit_rf: bool, max_step: float | None, trims: np.ndarray | None = None):
        self.m, self.resp, self.system, self.fit_rf, self.max_step = machine, resp, system, fit_rf, max_step
        self.groups: dict[str, list[tuple[int, int]]] = {}
        for j, name in enumerate(resp.corrector_names):
            dev = machine.device(name)
            self.groups.setdefault(dev.family_name, []).append((j, dev.index))
        self.sp = {f: np.array(sp[f], dtype=float) for f in self.groups}
        self.start = {f: v.copy() for f, v in self.sp.items()}
        self.f0 = self.f = f0
        if (trims is None) != (system.n_injection == 0):
            raise ValueError("the injection trims are given exactly when the system steers with them")
        self.trims = None if trims is None else np.array(trims, dtype=float)
        self.trims0 = None if trims is None else self.trims.copy()

    def safe_injection(self, dinj: np.ndarray, scale: float, rep: Any) -> np.ndarray:
        """The injection trims' step scaled as the correctors' (``max_step``) and clipped at their limits."""
        if self.trims is None:
            return np.zeros(len(INJECTION_KNOBS))
        lim = np.asarray(INJECTION_KNOB_LIMITS, dtype=float)
        want = self.trims + scale * np.asarray(dinj, dtype=float)
        new = np.clip(want, -lim, lim)
        if np.any(new != want):
            names = [k for k, a, b in zip(INJECTION_KNOBS, new, want) if a != b]
            rep.messages.append(f"injection trim(s) {', '.join(names)} clipped at their limits "
                                f"+-{list(INJECTION_KNOB_LIMITS)} (m, rad, m, rad)")
        return new - self.trims

    def safe_step(self, dk: np.ndarray, drf: float) -> tuple[dict[str, np.ndarray], float, Any]:
        fams = list(self.groups)
        order = np.concatenate([[j for (j, _) in self.groups[f]] for f in fams]).astype(int)
        cur = np.concatenate([[self.sp[f][i] for (_, i) in self.groups[f]] for f in fams])
        lo = np.concatenate([[self.m.families[f].limits.low] * len(self.groups[f]) for f in fams])
        hi = np.concatenate([[self.m.families[f].limits.high] * len(self.groups[f]) for f in fams])
        safe, rep = limit_step(dk[order], cur, lo, hi, self.max_step, [self.resp.corrector_names[j] for j in order])
        if self.fit_rf:
            drf *= rep.scale
            lim = self.m.rf.frequency_limits
            new_f = float(np.clip(self.f + drf, lim.low, lim.high))
            if new_f != self.f + drf:
                rep.messages.append(f"RF step clipped at the frequency limits [{lim.low}, {lim.high}] Hz")
            drf = new_f - self.f
        steps, k = {}, 0
        for f in fams:
            idx = [i for (_, i) in self.groups[f]]
            st = np.zeros(len(self.m.families[f]))
            st[idx] = safe[k:k + len(idx)]
            k += len(idx)
            steps[f] = st
        return steps, drf, rep

    def apply(self, steps: dict[str, np.ndarray], drf: float, sign: float = 1.0,
              dinj: np.ndarray | None = None) -> MsgGenerator[None]:
        args: list[Any] = []
        for f, st in steps.items():
            if np.any(st != 0):
                self.sp[f] = self.sp[f] + sign * st
                args += [self.m.families[f], self.sp[f]]
        if self.fit_rf and drf:
            self.f += sign * drf
            args += [self.m.rf, self.f]
        if self.trims is not None and dinj is not None and np.any(dinj != 0):
            new = self.trims + sign * np.asarray(dinj, dtype=float)
            for sig, v, old in zip(self.m.injection.knobs()[:4], new, self.trims):
                if v != old:
                    args += [sig, float(v)]
            self.trims = new
        if args:
            yield from move(*args)


def _correction_system(machine: Machine, resp: OrbitResponse, fit_rf: bool, n_sv: int | None,
                       tikhonov: float | None, bpm_weights, corrector_weights, exclude_bpms,
                       exclude_correctors, injection: np.ndarray | None = None
                       ) -> tuple[CorrectionSystem, int | None, np.ndarray]:
    bad = ~np.asarray(machine.bpm.good, dtype=bool)
    system = CorrectionSystem.build(resp, fit_rf=fit_rf, bpm_weights=bpm_weights,
                                    corrector_weights=corrector_weights, exclude_bpms=exclude_bpms,
                                    exclude_correctors=exclude_correctors, bad_bpms=bad, injection=injection)
    s_all = system.solver.used_singular_values()
    nsv = n_sv
    if nsv is None and tikhonov is None:
        rcond = float(machine.profile.tool_defaults("orbit_correction").get("rcond", 1e-3))
        nsv = int(np.sum(s_all >= rcond * s_all[0]))
    if nsv is not None and not 1 <= int(nsv) <= len(s_all):
        raise ValueError(f"n_sv must be between 1 and {len(s_all)} (the number of singular values of this "
                         f"response), got {nsv}")
    return system, nsv, s_all


def _uses_injection(machine: Machine, injection: bool | None) -> bool:
    """Whether correct_orbit steers with the injection trims: by default on a transfer line with injection devices;
    refused on a ring (its closed orbit does not depend on the injected beam)."""
    line = machine.profile.kind != "ring"
    if injection is None:
        return line and getattr(machine, "injection", None) is not None
    if injection and not line:
        raise ValueError(f"correct_orbit: injection=True steers a transfer line's entrance; {machine.profile.name} is "
                         "a ring, whose closed orbit does not depend on the injected beam")
    if injection:
        need_beam_devices(machine, "correct_orbit(injection=True)")
    return bool(injection)


def _injection_columns(machine: Machine, resp: OrbitResponse) -> np.ndarray:
    """(2n, 4) response of the ORM's readings [x; y] to the injection trims x, px, y, py: the design line's
    transfer from its entrance to each BPM (``model_trajectory_response(...).injection``, one pass)."""
    model = model_trajectory_response(machine.profile, turns=1)
    where = {b: i for i, b in enumerate(model.bpm_names)}
    missing = [b for b in resp.bpm_names if b not in where]
    if missing:
        raise ValueError(f"correct_orbit: the ORM's BPMs {missing[:5]} are not the profile's: no injection response")
    idx = np.array([where[b] for b in resp.bpm_names], dtype=int)
    n = len(model.bpm_names)
    return np.asarray(model.injection, dtype=float)[np.concatenate([idx, n + idx])]


def _check_injection(machine: Machine, args: dict[str, Any]) -> None:
    _uses_injection(machine, args.get("injection"))  # refused on a ring before the beam check, nothing moved


def _correction_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    line = machine.profile.kind != "ring"
    return Restore(tuple(sorted([*machine.hcors, *machine.vcors])), rf=True,
                   injection=line and args.get("injection") is not False)


def _orm_of(machine: Machine, orm: Any, fit_rf: bool) -> MsgGenerator[OrbitResponse]:
    from ..plan_stubs.orbit import load_orm

    if orm is None:
        uid = yield from measure_orm(machine, rf=fit_rf)
        orm = uid
    return (yield from load_orm(machine, orm))


@tool("orbit_correction", restore=_correction_restore, keep=True, validate=_check_injection,
      figures={"orbit": _orbit_figure})
def correct_orbit(machine: Machine, orm: Any = None, n_sv: int | None = None, tikhonov: float | None = None,
                  bpm_weights: Sequence[float] | None = None, corrector_weights: Sequence[float] | None = None,
                  exclude_bpms: Sequence[str | int] = (), exclude_correctors: Sequence[str | int] = (),
                  fit_rf: bool = False, gain: float = 1.0, max_step: float | None = None, max_iter: int = 3,
                  tol: float | None = None, target: Any = None, n_avg: int = 1, min_improvement: float = 0.02,
                  use_flagged: bool = False, injection: bool | None = None,
                  figure_dir: str | Path | bool | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """Correct the closed orbit by SVD (MML's ``setorbit``), iterating until converged.

    On a transfer line the "orbit" is the mean trajectory of the beam from the injector: the correction also
    steers with the injection trims x, px, y, py (``injection``), whose response is the design line's transfer from
    its entrance; they correct the injected beam's error at its source, and the BPMs upstream of a plane's first
    corrector can be steered by nothing else.

    Each iteration reads the orbit, computes the corrector steps that cancel ``gain`` x (reading - target) with
    the chosen singular values or Tikhonov regularisation, makes them safe (``max_step``, then each corrector
    clipped at its limit: the run says which), applies them (one put per family, plus the RF frequency with
    ``fit_rf``) and reads the orbit again: one event per iteration with the orbits before/after, the steps and the
    rms. A step that makes the orbit worse is taken back (``undone``) and the correction stops. Results: total
    correction per family [A], RF change [Hz], singular values used, orbits before and after; figure: the orbit
    before/after along the ring (``figures.orbit``).

    Args:
        machine: the connected machine.
        orm: the response: a run of ``measure_orm``/``model_orm`` (uid, ``RE(...)`` result, Tiled run), an
            :class:`OrbitResponse`, ``"model"`` (the design lattice's), or ``None`` (measured now, its own run).
        n_sv: number of singular values. Default (with ``tikhonov=None``): those above 1e-3 of the largest
            (profile ``tools.orbit_correction.rcond`` overrides 1e-3), less the trailing modes whose signal is
            below 3x the projected BPM noise (profile ``errors.bpm.noise``), re-cut at every iteration.
        tikhonov: Tikhonov regularisation alpha (in units of the weighted singular values) instead of a cut.
        bpm_weights: per BPM (n) or per reading (2n) weight, larger = corrected harder; 0 excludes.
        corrector_weights: per corrector of the ORM, larger = used more freely; 0 excludes.
        exclude_bpms: BPM names/indices not corrected (and not checked for NaN).
        exclude_correctors: corrector names/indices never moved.
        fit_rf: also correct with the RF frequency (MML's FitRF: the dispersion column) [Hz].
        gain: fraction of the computed correction applied per iteration (0 < gain <= 1).
        max_step: largest corrector move per iteration [A] (the whole step is scaled to respect it).
        max_iter: iterations at most.
        tol: stop when the rms of (reading - target) over the corrected readings is below this [m].
        min_improvement: stop when an iteration reduced that rms by less than this fraction (times the gain).
            ``converged`` is 1 only when the rms reached its floor (what a perfect step with these singular values
            leaves, plus the BPM noise: :func:`~acc_bluesky.analysis.correction.judge_step`) or ``tol``; a
            correction that stalled above its floor, or that ``max_iter`` ended, is not converged.
        target: golden orbit: ``(x, y)`` arrays [m], a (2n,) vector, or a run holding an orbit (``save_config``,
            ``apply_bba``).
        n_avg: orbit acquisitions averaged per reading.
        use_flagged: also use the correctors the ORM flagged as dead (``column_ok = 0``: no response).
        injection: steer with the injection trims too (x [m], px [rad], y [m], py [rad]); default ``None``: on a
            transfer line that has injection devices. Refused on a ring. They are put back if the plan fails.
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the uid of the correction run (an ORM measured with ``orm=None`` is its own run: ``orm_uid``).
    """
    if not 0 < gain <= 1:
        raise ValueError(f"gain must be in (0, 1], got {gain}")
    if n_sv is not None and tikhonov is not None:
        raise ValueError("give n_sv or tikhonov, not both")
    if tikhonov is not None and not (np.isfinite(tikhonov) and tikhonov >= 0):
        raise ValueError(f"tikhonov alpha must be a finite number >= 0, got {tikhonov}")
    use_inj = _uses_injection(machine, injection)
    tx, ty = yield from _target_orbit(machine, target)
    resp = yield from _orm_of(machine, orm, fit_rf)
    if resp.good is not None and not use_flagged and not np.all(resp.good):
        flagged = [c for c, ok in zip(resp.corrector_names, resp.good) if not ok]
        exclude_correctors = [*exclude_correctors, *(c for c in flagged if c not in exclude_correctors)]
        warnings.warn(f"correct_orbit: leaving out {len(flagged)} corrector(s) the ORM flagged as dead: "
                      f"{', '.join(flagged[:8])}", stacklevel=2)
    system, nsv, s_all = _correction_system(machine, resp, fit_rf, n_sv, tikhonov, bpm_weights, corrector_weights,
                                            exclude_bpms, exclude_correctors,
                                            injection=_injection_columns(machine, resp) if use_inj else None)
    snap = yield from snapshot_setpoints(machine, sorted({machine.device(c).family_name
                                                          for c in resp.corrector_names}), rf=fit_rf)
    trims = np.array((yield from injection_trims(machine))[:4]) if use_inj else None
    c = _Correction(machine, resp, system, snap, float(snap["RF:frequency"]) if fit_rf else float("nan"),
                    fit_rf, max_step, trims=trims)
    yield from open_tool_run(orm_uid=resp.uid or resp.kind, bpm_names=machine.bpm.names,
                             corrector_names=resp.corrector_names, num_points=int(max_iter),
                             **({"target_x": tx.tolist(), "target_y": ty.tolist()} if target is not None else {}))
    out = yield from _iterate(machine, c, tx, ty, nsv=nsv, tikhonov=tikhonov, gain=gain, max_iter=max_iter,
                              auto_cut=n_sv is None and tikhonov is None,
                              tol=tol, n_avg=n_avg, min_improvement=min_improvement, exclude_bpms=exclude_bpms)
    good = np.asarray(machine.bpm.good, dtype=bool)
    (x0, y0), (x1, y1) = out["first"], out["last"]
    res: dict[str, Any] = {
        "x_after": x1, "y_after": y1, "rms_x_before": rms(x0 - tx, good), "rms_y_before": rms(y0 - ty, good),
        "rms_x_after": rms(x1 - tx, good), "rms_y_after": rms(y1 - ty, good), "singular_values": s_all,
        "n_sv": np.asarray(nsv if nsv is not None else len(s_all)), "iterations": np.asarray(out["iterations"]),
        "converged": np.asarray(int(out["converged"])), "undone": np.asarray(int(out["undone"])),
        "rf_correction": np.asarray(c.f - c.f0 if fit_rf else 0.0)}
    units = {k: "m" for k in res} | {"singular_values": "", "iterations": "", "rf_correction": "Hz", "n_sv": "",
                                      "converged": "", "undone": ""}
    for f in c.groups:
        res[f"{f}_correction"] = c.sp[f] - c.start[f]
        units[f"{f}_correction"] = "A"
    if c.trims is not None:
        res["injection_correction"] = c.trims - c.trims0
        units["injection_correction"] = "m | rad"
    title = (f"{machine.profile.facility} {machine.profile.accelerator}: orbit correction ({out['iterations']} "
             f"iteration(s), {res['n_sv']} singular values)")
    return ToolResult(res, units, _CORRECTION_DESCRIPTIONS, value={
        "s": machine.bpm.s, "names": machine.bpm.names, "before": (x0 - tx, y0 - ty), "after": (x1 - tx, y1 - ty),
        "title": title, **res})


_CORRECTION_DESCRIPTIONS = {
    "singular_values": "all weighted singular values (the first n_sv were used)",
    "n_sv": "number of singular values used", "iterations": "iterations applied",
    "converged": "1: the rms reached its floor (or tol); 0: stalled above its floor, undone or ended by max_iter",
    "undone": "1 if the last step made the orbit worse and was taken back",
    "rf_correction": "total RF frequency change", "x_after": "horizontal orbit at the end",
    "injection_correction": "total change of the injection trims x [m], px [rad], y [m], py [rad] (a line)",
    "y_after": "vertical orbit at the end"}


def _iterate(machine: Machine, c: _Correction, tx, ty, *, nsv, tikhonov, gain, max_iter, tol, n_avg,
             min_improvement, exclude_bpms, auto_cut: bool = False,
             rec: Record | None = None) -> MsgGenerator[dict[str, Any]]:
    """The correction iterations: read, step, read; one event each.

    Every step is judged (:func:`~acc_bluesky.analysis.correction.judge_step`) on the rms of the readings the
    correction uses (weight > 0, not excluded, finite): undone when worse beyond the BPM noise, ``converged`` only
    when the rms reached its floor (what a perfect step with these singular values leaves, and the noise), stopped
    when it stalled. With ``auto_cut`` (no ``n_sv``/``tikhonov`` given) the singular values are cut per iteration
    above the BPM noise (:func:`~acc_bluesky.analysis.correction.noise_sv_cut`), at most ``nsv``. A plan that
    corrects several times in one run passes its one ``rec`` (one Record per stream)."""
    excluded = [c.resp.bpm_index(b) for b in exclude_bpms]
    rec = rec if rec is not None else _correction_record(machine, c.groups, injection=c.trims is not None)
    good = np.asarray(machine.bpm.good, dtype=bool)
    solver = c.system.solver
    bpm_noise = float(machine.profile.spec.errors.bpm.noise)
    noise = bpm_noise / np.sqrt(max(int(n_avg), 1))
    rcond = float(machine.profile.tool_defaults("orbit_correction").get("rcond", 1e-3))

    x, y = yield from read_orbit(machine, n_avg, ignore=excluded, where="reading the orbit to correct")
    out: dict[str, Any] = {"first": (x, y), "last": (x, y), "iterations": 0, "converged": False, "undone": False}
    for it in range(1, int(max_iter) + 1):
        dev = np.concatenate([x - tx, y - ty])
        before = rms(dev, solver.obs_mask)  # over the readings the correction uses
        if tol is not None and before <= tol:
            out["converged"] = True
            break
        n_use = nsv
        if auto_cut:
            cut = noise_sv_cut(solver, dev, bpm_noise=bpm_noise, n_avg=n_avg, rel_error=rcond)
            n_use = min(cut.n_sv, nsv) if nsv is not None else cut.n_sv
        wanted = c.system.solve_step(dev, n_sv=n_use, tikhonov=tikhonov, gain=gain)
        steps, drf, rep = c.safe_step(wanted.dk, wanted.drf)
        dinj = c.safe_injection(wanted.dinj, rep.scale, rep)
        for msg in rep.messages:
            warnings.warn(f"correct_orbit iteration {it}: {msg}", stacklevel=2)
        yield from c.apply(steps, drf, dinj=dinj)
        xa, ya = yield from read_orbit(machine, n_avg, ignore=excluded,
                                       where=f"reading the orbit after correction step {it}")
        after = rms(np.concatenate([xa - tx, ya - ty]), solver.obs_mask)
        n_floor = n_use if n_use is not None else len(solver.used_singular_values())
        floor = correction_floor(solver, dev, n_floor, bpm_noise=bpm_noise, n_avg=n_avg)
        v = judge_step(before, after, floor, noise=noise, min_improvement=min_improvement * gain)
        rec.update(iteration=it, rms_x_before=rms(x - tx, good), rms_y_before=rms(y - ty, good),
                   rms_x_after=rms(xa - tx, good), rms_y_after=rms(ya - ty, good), x_before=x,
                   y_before=y, x_after=xa, y_after=ya, rf_step=drf, rf_frequency=c.f, scale=rep.scale,
                   n_clipped=len(rep.clipped), undone=int(v.undo),
                   **{f"{f}_step": st for f, st in steps.items()}, **{f"{f}_setpoint": c.sp[f] for f in c.groups},
                   **({"injection_step": dinj, "injection": c.trims} if c.trims is not None else {}))
        yield from emit(rec)
        out["iterations"] = it
        if v.undo:  # never leave the orbit worse than it was: take the step back and stop
            warnings.warn(f"correct_orbit iteration {it}: {v.message} (rms over the corrected readings)",
                          stacklevel=2)
            yield from c.apply(steps, drf, sign=-1.0, dinj=dinj)
            x, y = yield from read_orbit(machine, n_avg, ignore=excluded, where="taking back a step")
            out.update(undone=True, last=(x, y))
            break
        x, y = xa, ya
        out["last"] = (x, y)
        out["converged"] = v.converged or (tol is not None and after <= tol)
        if out["converged"] or v.stalled:
            if v.stalled and not out["converged"]:
                warnings.warn(f"correct_orbit iteration {it}: {v.message}", stacklevel=2)
            break
    return out


# ======================================================================================================
# orbit_bump
def _bump_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    return Restore(tuple(sorted([*machine.hcors, *machine.vcors])), rf=True)


def _bump_targets(machine: Machine, bpm, amplitude, angle, plane: str, n_correctors: int):
    if isinstance(amplitude, (tuple, list)):
        amps = {"x": amplitude[0], "y": amplitude[1] if len(amplitude) > 1 else None}
    else:
        if plane not in ("x", "y"):
            raise ValueError(f"plane must be 'x' or 'y', got {plane!r}")
        amps = {plane: float(amplitude)}
    if isinstance(angle, (tuple, list)):
        angs = {"x": angle[0], "y": angle[1] if len(angle) > 1 else None}
    else:
        angs = {plane: angle} if angle is not None else {}
    planes = [p for p in ("x", "y") if amps.get(p) is not None]
    if not planes:
        raise ValueError("amplitude is None in both planes: nothing to do")
    if n_correctors not in (3, 4):
        raise ValueError(f"n_correctors must be 3 or 4, got {n_correctors}")
    if any(angs.get(p) is not None for p in planes) and n_correctors != 4:
        raise ValueError("an angle bump needs n_correctors=4 (position and angle at the BPM)")
    b = machine.bpm.index_of(bpm)
    if not machine.bpm.good[b]:
        raise ValueError(f"BPM {machine.bpm.names[b]} is out of service: a bump there cannot be measured")
    return amps, angs, planes, b


@thread_safe_figure
def _bump_figure(result: ToolResult, path: Path) -> None:
    r, f = result.results, result.figure
    bump_figure(path, f["s"], f["names"], r["orbit_change_x"], r["orbit_change_y"], r["inside"], f["bpm"],
                correctors=f["correctors"], amplitude=f["amplitude"], closure_rms=float(r["closure_rms"]))


@tool("orbit_bump", restore=_bump_restore, keep=True, figures={"bump": _bump_figure})
def orbit_bump(machine: Machine, bpm: str | int, amplitude: float | tuple[float | None, float | None],
               angle: float | tuple[float | None, float | None] | None = None, plane: str = "x",
               n_correctors: int = 3, orm: Any = None, rf: bool | None = None,
               correctors: Sequence[str] | None = None, exclude_correctors: Sequence[str] = (),
               couple: bool = True, max_iter: int = 4, tol: float = 0.3e-6, n_avg: int = 1,
               figure_dir: str | Path | bool | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """A closed local orbit bump at one BPM (MML's ``setorbitbump``): position, and angle with 4 correctors.

    The nearest usable correctors around the BPM are chosen (3 for a position bump, 4 for position + angle: among
    the nearest candidates, the set needing the smallest kicks), the bump is solved with the ORM and applied, then
    refined from the measured orbit until it is closed outside the correctors' span (rms change below ``tol``) and
    the BPM shows the requested amplitude. Horizontal bumps at fixed RF frequency change the path length through
    the dispersion; when the correctors alone cannot close that, the RF frequency is used as an extra variable
    (``rf``), see :mod:`acc_bluesky.analysis.bump`.

    Args:
        machine: the connected machine.
        bpm: BPM name (``"BPM_012"``) or position.
        amplitude: orbit change at the BPM as the BPM reads it [m]; a float for ``plane``, or ``(x, y)`` with
            ``None`` for a plane left alone.
        angle: angle change at the BPM [rad] (model), float for ``plane`` or ``(x, y)``; needs 4 correctors.
        plane: ``"x"`` or ``"y"`` when ``amplitude`` is a float.
        n_correctors: 3 (position) or 4 (position + angle, or a position bump closed without the RF).
        orm: a run of ``measure_orm``/``model_orm``, an OrbitResponse, ``"model"`` or ``None`` (the model;
            measured orbits close it).
        rf: use the RF frequency as an extra variable (``None``: when needed).
        correctors: force the corrector names (per plane in order of the planes bumped), else chosen.
        exclude_correctors: never use these.
        couple: also use the other plane's correctors at the bump's locations to cancel the coupling leakage.
        max_iter: measured refinements at most.
        tol: closure goal: rms orbit change outside the span [m].
        n_avg: orbit acquisitions averaged.
        figure_dir: folder of the figure ``bump`` (the orbit change along the ring, the span and the correctors);
            ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid. Results: ``<family>_step`` setpoint changes [A], ``rf_step`` [Hz], achieved amplitude,
        closure rms.
    """
    from ..plan_stubs.orbit import bump_iterations, bump_setups, load_orm

    amps, angs, planes, b = _bump_targets(machine, bpm, amplitude, angle, plane, n_correctors)
    resp = (yield from load_orm(machine, "model" if orm is None else orm, rf_column=True))
    now_sp = yield from snapshot_setpoints(machine, [*machine.hcors, *machine.vcors], rf=False)
    setups, geo = bump_setups(machine, resp, b, planes, amps, angs, n_correctors, rf, correctors,
                              exclude_correctors, couple, now_sp)
    all_cors = list(dict.fromkeys(c for s in setups for c in (*s["cors"], *s["aux"])))
    outside = np.ones(len(machine.bpm), dtype=bool)
    for s in setups:
        outside &= ~s["inside"]
    yield from open_tool_run(bpm_names=machine.bpm.names, bump_correctors=all_cors,
                             bump_span_bpms=[machine.bpm.names[i] for i in np.nonzero(~outside)[0]],
                             bump_rf=any(s["rf"] for s in setups), orm_uid=resp.uid or resp.kind,
                             num_points=int(max_iter) + 1)
    return (yield from bump_iterations(machine, resp, b, setups, all_cors, outside, max_iter=max_iter, tol=tol,
                                       n_avg=n_avg))


# ======================================================================================================
# measure_dispersion
@thread_safe_figure
def _dispersion_figure(result: Dispersion, path: Path) -> None:
    result.plot(path)


@tool("dispersion", restore=rf_only, figures={"dispersion": _dispersion_figure},
      ring_only="the dispersion is measured from RF frequency steps, which change the beam energy only in a ring "
                "(steer the line's trajectory with correct_trajectory)")
def measure_dispersion(machine: Machine, df: float | None = None, n_steps: int = 1, n_avg: int = 1,
                       settle: float = 0.0, figure_dir: str | Path | bool | None = None,
                       md: dict | None = None) -> MsgGenerator[str]:
    """Measure the dispersion at every BPM from RF frequency steps (MML's ``measdisp``).

    The RF frequency is stepped symmetrically around its present value, ``f0 + k df`` for
    ``k = -n_steps .. n_steps``; the orbit is read at each step (one event each) and the RF put back. The momentum
    deviation of a step is ``dp = -df / (f0 alpha_c)`` with the momentum compaction ``alpha_c`` of the profile's
    design lattice. The dispersion is the slope of the orbit against ``dp`` per BPM (symmetric steps cancel the
    second-order dispersion). Figure: the dispersion along the ring (``figures.dispersion``).

    Args:
        machine: the connected machine.
        df: RF step [Hz]; default the profile's ``tools.dispersion.df``, else the step of ``|dp/p| = 3e-4``
            (``analysis.rf_step_for_dp``: ``3e-4 alpha_c f_RF``, design ``alpha_c``).
        n_steps: steps on each side of ``f0``.
        n_avg: orbit acquisitions averaged per step.
        settle: wait after each RF move [s].
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid; ``Dispersion.from_run(catalog[uid])`` reads ``eta_x``, ``eta_y`` [m].
    """
    df = machine.profile.tool_defaults("dispersion").get("df") if df is None else df
    alpha_c = momentum_compaction(machine.profile.load_lattice())
    f0 = float((yield from bps.rd(machine.rf.frequency)))
    df = float(rf_step_for_dp(f0, alpha_c) if df is None else df)  # no step given: |dp/p| = 3e-4
    if df == 0 or not np.isfinite(df):
        raise ValueError(f"df must be a non-zero, finite RF step in Hz, got {df}")
    offsets = np.arange(-int(n_steps), int(n_steps) + 1) * df
    for d in offsets:
        machine.rf.frequency_limits.check("RF frequency", f0 + d, "Hz")
    yield from open_tool_run(bpm_names=machine.bpm.names, bpm_s=np.asarray(machine.bpm.s, dtype=float).tolist(),
                             alpha_c=alpha_c, rf_frequency=f0, rf_offsets=offsets.tolist(), num_points=len(offsets))
    n = len(machine.bpm)
    rec = Record("dispersion", {
        "step": ("", (), "step index (0 = reference frequency)"), "df": ("Hz", (), "RF frequency offset from f0"),
        "rf_frequency": ("Hz", (), "RF frequency setpoint"), "dp": ("", (), "momentum deviation -df / (f0 alpha_c)"),
        "x": ("m", (n,), "horizontal orbit"), "y": ("m", (n,), "vertical orbit"),
    }, hinted=("df", "dp"), dtypes={"step": "integer"})
    xs, ys = [], []
    for k, d in enumerate(offsets):
        yield from move(machine.rf, f0 + d)
        if settle:
            yield from bps.sleep(settle)
        x, y = yield from read_orbit(machine, n_avg, where=f"at RF offset {d:+g} Hz")
        xs.append(x)
        ys.append(y)
        rec.update(step=k - int(n_steps), df=d, rf_frequency=f0 + d, dp=-d / (f0 * alpha_c), x=x, y=y)
        yield from emit(rec)
    yield from move(machine.rf, f0)
    ex, ey = dispersion_from_orbits(np.array(xs), np.array(ys), offsets, f0, alpha_c)
    return Dispersion(ex, ey, machine.bpm.names, offsets, f0, alpha_c, s=machine.bpm.s)
