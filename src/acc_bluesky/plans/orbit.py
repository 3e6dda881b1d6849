"""Orbit tools as Bluesky plans: ``measure_orm``, ``correct_orbit``, ``orbit_bump``, ``measure_dispersion``.

Every plan takes the :class:`~acc_bluesky.machine.Machine`, ``md=None`` last, opens one run with FAIR metadata
(``tool_metadata``), emits one event per step in the ``primary`` stream (LiveTable / BestEffortCallback show the
progress), stores its results in the run (``store_result``) and returns the run uid. Whatever it changed is put
back exactly when it is aborted, stopped or fails (``finalize_wrapper``); measurements always leave the machine as
they found it, corrections and bumps keep their result when they complete.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis import bump as _bump
from ..analysis._common import corrector_table, rms, run_start
from ..analysis.correction import CorrectionSystem, limit_step
from ..analysis.dispersion import Dispersion, dispersion_from_orbits
from ..analysis.orm import OrbitResponse, momentum_compaction, response_from_orbits
from ..analysis.orm import model_orm as _model_response
from ..data.metadata import tool_metadata
from ..plan_stubs.machine import BeamLostError, Record, emit, move, read_orbit, restoring, snapshot_setpoints
from ..plan_stubs.results import store_result

__all__ = [
    "measure_orm",
    "model_orm",
    "correct_orbit",
    "orbit_bump",
    "measure_dispersion",
    "load_orm",
    "BeamLostError",
]

# The runs recorded by these plans in this process: uid -> {"start": start document, **results}. A uid given to
# a plan (orm=uid, target=uid, restore_config(uid)) is found here first, then in the catalogue: right after a
# measurement no catalogue round trip is needed, and it works whatever catalogue the RunEngine writes to.
_RUNS: dict[str, dict[str, Any]] = {}
_RUNS_MAX = 16


def _keep(uid: str, md: dict[str, Any], holder: dict[str, Any]) -> None:
    if "results" not in holder:
        return
    _RUNS[uid] = {"start": {**md, "uid": uid}, **{k: np.array(v, copy=True) for k, v in holder["results"].items()}}
    while len(_RUNS) > _RUNS_MAX:
        _RUNS.pop(next(iter(_RUNS)))


def _store(holder: dict[str, Any], results: dict[str, Any], units: dict[str, str],
           descriptions: dict[str, str]) -> MsgGenerator[None]:
    """store_result, keeping a copy for :func:`_keep`."""
    holder["results"] = results
    yield from store_result(results, units=units, descriptions=descriptions)


def _run(inner: Any, md: dict[str, Any], holder: dict[str, Any]) -> MsgGenerator[str]:
    """Open the run around ``inner``; remember its results under its uid; return the uid."""
    uid = yield from bpp.run_wrapper(inner, md=md)
    _keep(uid, md, holder)
    return uid


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def _metadata(tool: str, machine, params: dict[str, Any], extra: dict[str, Any], md: dict | None,
              plan_name: str) -> dict:
    base = tool_metadata(tool, machine, plan_name=plan_name, **{k: _jsonable(v) for k, v in params.items()})
    return base | {k: _jsonable(v) for k, v in extra.items()} | (md or {})


def _catalog_run(uid: str):
    """A run by uid: one recorded by these plans in this process, else from the catalogue
    (``acc_bluesky.data.open_catalog()``: ``$ACC_BLUESKY_CATALOG`` or the default folder)."""
    if uid in _RUNS:
        return _RUNS[uid]
    from .. import data

    errors = []
    for name in ("current_catalog", "open_catalog"):
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            cat = fn()
        except Exception as err:  # noqa: BLE001 - try the next way to find the catalogue
            errors.append(f"{name}: {err}")
            continue
        if cat is None:
            continue
        try:
            return cat[uid]
        except KeyError:
            errors.append(f"{name}: no run {uid!r}")
    raise KeyError(f"no run {uid!r} in this session or the catalogue ({'; '.join(errors) or 'no catalogue'}); "
                   "pass the run itself (catalog[uid]) or an OrbitResponse")


def load_orm(orm: Any, machine=None) -> OrbitResponse:
    """An :class:`OrbitResponse` from a uid, a Tiled run, an OrbitResponse, or ``"model"`` (needs ``machine``)."""
    if isinstance(orm, OrbitResponse):
        return orm
    if isinstance(orm, str):
        if orm == "model":
            if machine is None:
                raise ValueError("orm='model' needs the machine")
            return _model_response(machine.profile, rf=True, setpoints=None)
        return OrbitResponse.from_run(_catalog_run(orm))
    if hasattr(orm, "metadata"):
        return OrbitResponse.from_run(orm)
    raise TypeError(f"orm must be a run uid, a Tiled run, an OrbitResponse, 'model' or None; got {type(orm).__name__}")


def _corrector_rows(machine, correctors: Any) -> list[tuple[str, str, int, str]]:
    """``[(device_name, family, index, plane)]`` from None, a MagnetFamily, Corrector devices or names."""
    if correctors is None:
        return corrector_table(machine.profile, None)
    if hasattr(correctors, "family_name") and hasattr(correctors, "names"):  # a MagnetFamily
        fam = machine.profile.families[correctors.family_name]
        return [r for r in corrector_table(machine.profile, [correctors.family_name])
                if r[2] not in fam.bad]
    if isinstance(correctors, str):
        correctors = [correctors]
    names = []
    for c in correctors:
        if hasattr(c, "device_name"):
            names.append(c.device_name)
        elif hasattr(c, "family_name") and hasattr(c, "names"):
            names.append(c.family_name)
        else:
            names.append(str(c))
    rows = corrector_table(machine.profile, names)
    if not rows:
        raise ValueError("no corrector selected")
    return rows


def _figure_dir(figure_dir: str | Path | None) -> Path:
    if figure_dir is not None:
        return Path(figure_dir)
    env = os.environ.get("ACC_BLUESKY_FIGURE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "acc_bluesky" / "figures"


# ======================================================================================================
# measure_orm
def _step_sizes(machine, rows, setpoints: dict[str, np.ndarray], delta: float | Sequence[float] | None,
                delta_physics: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Half steps per corrector: hardware [A] and physics [rad]."""
    e = machine.profile.energy
    m = len(rows)
    d_hw = np.zeros(m)
    d_ph = np.zeros(m)
    for j, (name, fam, i, _) in enumerate(rows):
        cal = machine.profile.families[fam].spec.calibration
        sp0 = float(setpoints[fam][i])
        k0 = cal.hw2physics(sp0, e, e)
        if delta_physics is not None:
            d_hw[j] = float(cal.physics2hw(k0 + delta_physics, e, e)) - sp0
        else:
            d_hw[j] = float(np.broadcast_to(np.asarray(delta, dtype=float), (m,))[j])
        d_ph[j] = float(cal.hw2physics(sp0 + d_hw[j], e, e)) - k0
    if np.any(~np.isfinite(d_hw)) or np.any(d_hw == 0):
        raise ValueError(f"corrector steps must be finite and non-zero; got delta={delta}, "
                         f"delta_physics={delta_physics}")
    return d_hw, d_ph


def _orm_plan(machine, rows, d_hw, d_ph, setpoints, *, bipolar: bool, n_avg: int, settle: float, rf: bool,
              df: float, f0: float, md: dict, out: dict) -> MsgGenerator[str]:
    n = len(machine.bpm)
    m = len(rows)
    resp_hw = np.full((2 * n, m), np.nan)
    resp_ph = np.full((2 * n, m), np.nan)
    rec = Record("orm", {
        "index": ("", (), "column of the corrector in the ORM (names in the start document: corrector_names)"),
        "setpoint0": ("A", (), "corrector setpoint before and after its steps"),
        "delta_plus": ("A", (), "corrector step of the first orbit (setpoint0 + delta_plus)"),
        "delta_minus": ("A", (), "corrector step of the second orbit (0 for one-sided: the reference orbit)"),
        "orbit_plus": ("m", (2 * n,), "orbit [x; y] at every BPM at setpoint0 + delta_plus"),
        "orbit_minus": ("m", (2 * n,), "orbit [x; y] at every BPM at setpoint0 + delta_minus"),
        "response_rms": ("m/A", (), "rms of this corrector's response column (both planes)"),
    }, hinted=("index", "response_rms"), dtypes={"index": "integer"})
    devs = {(fam, i): machine.families[fam][i] for (_, fam, i, _) in rows}

    def inner() -> MsgGenerator[None]:
        x0 = y0 = None
        if not bipolar:
            x0, y0 = yield from read_orbit(machine, n_avg, where="reading the reference orbit")
        pending: tuple[Any, float] | None = None  # the previous corrector, put back with the next step
        for j, (name, fam, i, _) in enumerate(rows):
            dev = devs[(fam, i)]
            sp0 = float(setpoints[fam][i])
            dp, dm = float(d_hw[j]), (-float(d_hw[j]) if bipolar else 0.0)
            if pending is not None and pending[0] is not dev:
                yield from move(pending[0], pending[1], dev, sp0 + dp)
            else:
                yield from move(dev, sp0 + dp)
            pending = None
            if settle:
                yield from bps.sleep(settle)
            xp, yp = yield from read_orbit(machine, n_avg, where=f"stepping {name} by {dp:+g} A")
            if bipolar:
                yield from move(dev, sp0 + dm)
                if settle:
                    yield from bps.sleep(settle)
                xm, ym = yield from read_orbit(machine, n_avg, where=f"stepping {name} by {dm:+g} A")
            else:
                xm, ym = x0, y0
            pending = (dev, sp0)
            col = response_from_orbits(xp, yp, xm, ym, dp - dm)
            resp_hw[:, j] = col
            kick = float(d_ph[j]) * (2.0 if bipolar else 1.0)
            resp_ph[:, j] = col * (dp - dm) / kick
            rec.update(index=j, setpoint0=sp0, delta_plus=dp, delta_minus=dm, orbit_plus=np.concatenate([xp, yp]),
                       orbit_minus=np.concatenate([xm, ym]), response_rms=rms(col))
            yield from emit(rec)
        if pending is not None:
            yield from move(*pending)
        rf_col = None
        if rf:
            rrec = Record("orm_rf", {
                "f0": ("Hz", (), "RF frequency before and after the steps"),
                "df_plus": ("Hz", (), "RF step of the first orbit"),
                "df_minus": ("Hz", (), "RF step of the second orbit"),
                "orbit_plus": ("m", (2 * n,), "orbit [x; y] at f0 + df_plus"),
                "orbit_minus": ("m", (2 * n,), "orbit [x; y] at f0 + df_minus"),
            })
            dfp, dfm = df, (-df if bipolar else 0.0)
            yield from move(machine.rf, f0 + dfp)
            if settle:
                yield from bps.sleep(settle)
            xp, yp = yield from read_orbit(machine, n_avg, where=f"stepping the RF frequency by {dfp:+g} Hz")
            if bipolar:
                yield from move(machine.rf, f0 + dfm)
                if settle:
                    yield from bps.sleep(settle)
                xm, ym = yield from read_orbit(machine, n_avg, where=f"stepping the RF frequency by {dfm:+g} Hz")
            else:
                xm, ym = x0, y0
            yield from move(machine.rf, f0)
            rf_col = response_from_orbits(xp, yp, xm, ym, dfp - dfm)
            rrec.update(f0=f0, df_plus=dfp, df_minus=dfm, orbit_plus=np.concatenate([xp, yp]),
                        orbit_minus=np.concatenate([xm, ym]))
            yield from emit(rrec, stream="rf")
        orm = OrbitResponse(
            matrix=resp_ph, matrix_hw=resp_hw, bpm_names=list(machine.bpm.names),
            corrector_names=[r[0] for r in rows], planes=[r[3] for r in rows], rf=rf_col, delta=d_hw,
            delta_physics=d_ph, df=df if rf else None, kind="measured",
            bpm_refpts=np.asarray(machine.bpm.refpts), corrector_refpts=np.array(
                [int(machine.profile.families[f].refpts[i]) for (_, f, i, _) in rows]))
        out["orm"] = orm
        yield from _store_orm(out, orm)

    uid = yield from _run(inner(), md, out)
    if "orm" in out:
        out["orm"].uid = uid
    return uid


_ORM_UNITS = {"orm": "m/rad", "orm_hw": "m/A", "orm_rf": "m/Hz", "df": "Hz"}
_ORM_DESCRIPTIONS = {
    "orm": "orbit response [x; y at every BPM] x corrector (start document: corrector_names), physics units",
    "orm_hw": "orbit response [x; y at every BPM] x corrector, hardware units",
    "orm_rf": "orbit response to the RF frequency [x; y]", "df": "half RF frequency step"}


def _store_orm(holder: dict[str, Any], orm: OrbitResponse) -> MsgGenerator[None]:
    res = orm.to_results()
    yield from _store(holder, res, {k: _ORM_UNITS[k] for k in res}, {k: _ORM_DESCRIPTIONS[k] for k in res})


def model_orm(machine, correctors: Any = None, rf: bool = True, method: str = "analytic",
              md: dict | None = None) -> MsgGenerator[str]:
    """Record the model orbit response of the design lattice as an ``orbit_response`` run: nothing moves.

    The same matrix as ``correct_orbit(orm="model")`` uses (pyAT's analytic response of the profile's design lattice,
    both planes at every BPM, in m/rad and, through the nominal calibrations, m/A), stored in the run
    (``orm_kind="model"``) so that a correction made with it, or a comparison with a measured ORM, can be analysed
    from the catalogue alone: ``OrbitResponse.from_run(catalog[uid])``, and ``correct_orbit(m, orm=uid)``.

    Args:
        machine: the connected machine (its profile gives the lattice, BPMs and correctors).
        correctors: ``None`` (every in-service corrector, h then v families), devices, or names (``"HST:003"``,
            ``"VST"``).
        rf: also the response to the RF frequency [m/Hz] (fixed path length: the dispersion term).
        method: ``"analytic"`` (pyAT's ``OrbitResponseMatrix.build_analytical``) or ``"tracking"`` (finite
            differences of ``find_orbit4``).
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    rows = _corrector_rows(machine, correctors)
    names = [r[0] for r in rows]
    resp = _model_response(machine.profile, names, rf=rf, method=method)
    params = {"correctors": "all" if correctors is None else names, "rf": rf, "method": method}
    _md = _metadata("orbit_response", machine, params, resp.start_metadata() | {"num_points": 0}, md, "model_orm")
    out: dict[str, Any] = {}
    uid = yield from _run(_store_orm(out, resp), _md, out)
    resp.uid = uid
    return uid


def measure_orm(machine, correctors: Any = None, delta: float | Sequence[float] | None = None,
                delta_physics: float | None = None, bipolar: bool = True, n_avg: int = 1, settle: float = 0.0,
                rf: bool = False, df: float | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """Measure the orbit response matrix: both planes at every BPM, to every chosen corrector (and the RF).

    Each corrector is stepped by ``+delta`` (and ``-delta`` if ``bipolar``) from its setpoint, the orbit is read,
    and the corrector is put back; one event per corrector in the ``primary`` stream holds both orbits. The
    full ``2n x m`` matrix (x and y rows for every corrector: the coupling blocks too) is stored in the run in
    m/A and m/rad; read it back with ``OrbitResponse.from_run(catalog[uid])``.

    Args:
        machine: the connected machine.
        correctors: ``None`` (every in-service corrector of every h then v family), a MagnetFamily, Corrector
            devices, or device/family names (``"HST:003"``, ``"VST"``).
        delta: corrector half step [A] (scalar or one per corrector); default: the profile's
            ``tools.orbit_response.delta``.
        delta_physics: half step as a kick [rad] instead (converted with each corrector's calibration).
        bipolar: ``+delta`` and ``-delta`` (True, second-order errors cancel) or ``+delta`` against a reference
            orbit read once at the start.
        n_avg: orbit acquisitions averaged per step.
        settle: wait after each move [s] (power-supply and eddy-current settling on a real machine).
        rf: also measure the response to the RF frequency (``rf`` stream, result ``orm_rf`` in m/Hz).
        df: RF half step [Hz]; default the profile's ``tools.orbit_response.df``, else ``tools.dispersion.df``,
            else 20 Hz.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    prof = machine.profile
    defaults = prof.tool_defaults("orbit_response")
    if delta is None and delta_physics is None:
        if "delta" in defaults:
            delta = float(defaults["delta"])
        elif "delta_physics" in defaults:
            delta_physics = float(defaults["delta_physics"])
        else:
            delta_physics = 1e-5
    elif delta is not None and delta_physics is not None:
        raise ValueError("give delta [A] or delta_physics [rad], not both")
    if df is None:
        df = float(defaults.get("df", prof.tool_defaults("dispersion").get("df", 20.0)))
    if int(n_avg) < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    if settle < 0:
        raise ValueError(f"settle must be >= 0 s, got {settle}")
    rows = _corrector_rows(machine, correctors)
    fams = sorted({r[1] for r in rows})

    def plan() -> MsgGenerator[str]:
        snap = yield from snapshot_setpoints(machine, fams, rf=rf)
        d_hw, d_ph = _step_sizes(machine, rows, snap, delta, delta_physics)
        # refuse before anything moves
        for j, (name, fam, i, _) in enumerate(rows):
            sp0 = float(snap[fam][i])
            lim = machine.families[fam].limits
            for v in ((sp0 + d_hw[j], sp0 - d_hw[j]) if bipolar else (sp0 + d_hw[j],)):
                lim.check(name, v, machine.families[fam].units)
        f0 = float(snap["RF:frequency"]) if rf else float("nan")
        if rf:
            for v in ((f0 + df, f0 - df) if bipolar else (f0 + df,)):
                machine.rf.frequency_limits.check("RF frequency", v, "Hz")
        params = {"correctors": "all" if correctors is None else [r[0] for r in rows],
                  "delta": None if delta is None else delta, "delta_physics": delta_physics, "bipolar": bipolar,
                  "n_avg": int(n_avg), "settle": settle, "rf": rf, "df": df if rf else None}
        extra = {"bpm_names": list(machine.bpm.names), "corrector_names": [r[0] for r in rows],
                 "corrector_planes": [r[3] for r in rows], "orm_kind": "measured",
                 "delta_hw": d_hw.tolist(), "delta_physics_rad": d_ph.tolist(),
                 "bpm_refpts": np.asarray(machine.bpm.refpts).tolist(),
                 "corrector_refpts": [int(prof.families[f].refpts[i]) for (_, f, i, _) in rows],
                 "num_points": len(rows)}
        _md = _metadata("orbit_response", machine, params, extra, md, "measure_orm")
        out: dict[str, Any] = {}
        return (yield from _orm_plan(machine, rows, d_hw, d_ph, snap, bipolar=bipolar, n_avg=int(n_avg),
                                     settle=settle, rf=rf, df=df, f0=f0, md=_md, out=out))

    return (yield from restoring(machine, plan(), families=fams, rf=rf))


# ======================================================================================================
# correct_orbit
def _target_orbit(target: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Golden orbit (x, y) [m] from None, arrays, a (2n,) vector, a run (uid or Tiled run) holding an orbit."""
    if target is None:
        return np.zeros(n), np.zeros(n)
    if isinstance(target, str) or hasattr(target, "metadata"):
        from ..analysis._common import run_results

        run = _catalog_run(target) if isinstance(target, str) else target
        res = run_results(run)
        for kx, ky in (("orbit_x", "orbit_y"), ("x_after", "y_after"), ("x", "y")):
            if kx in res and ky in res:
                return np.asarray(res[kx], float).reshape(-1), np.asarray(res[ky], float).reshape(-1)
        raise KeyError(f"run {target if isinstance(target, str) else ''} holds no orbit (results: {sorted(res)}); "
                       "save one with save_config (it records the orbit) or pass arrays")
    if isinstance(target, tuple) and len(target) == 2:
        tx, ty = (np.asarray(t, dtype=float).reshape(-1) for t in target)
    else:
        v = np.asarray(target, dtype=float).reshape(-1)
        if v.size != 2 * n:
            raise ValueError(f"target must be (x, y) arrays or a ({2 * n},) vector, got {v.size} values")
        tx, ty = v[:n], v[n:]
    if tx.shape != (n,) or ty.shape != (n,):
        raise ValueError(f"target orbit must have {n} values per plane, got {tx.shape}, {ty.shape}")
    return tx, ty


def _orbit_figure(path: Path, x0, y0, x1, y1, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, dpi=110)
    for ax, a, b, lab in ((axes[0], x0, x1, "x"), (axes[1], y0, y1, "y")):
        ax.plot(a * 1e3, color="tab:red", lw=0.8, label=f"before ({rms(a) * 1e6:.1f} um rms)")
        ax.plot(b * 1e3, color="tab:blue", lw=0.8, label=f"after ({rms(b) * 1e6:.1f} um rms)")
        ax.set_ylabel(f"{lab} [mm]")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("BPM index")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def correct_orbit(machine, orm: Any = None, n_sv: int | None = None, tikhonov: float | None = None,
                  bpm_weights: Sequence[float] | None = None, corrector_weights: Sequence[float] | None = None,
                  exclude_bpms: Sequence[str | int] = (), exclude_correctors: Sequence[str | int] = (),
                  fit_rf: bool = False, gain: float = 1.0, max_step: float | None = None, max_iter: int = 3,
                  tol: float | None = None, target: Any = None, n_avg: int = 1, min_improvement: float = 0.02,
                  figure_dir: str | Path | bool | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """Correct the closed orbit by SVD (MML's ``setorbit``), iterating until converged.

    Each iteration reads the orbit, computes the corrector steps that cancel ``gain`` x (reading - target) with
    the chosen singular values or Tikhonov regularisation, makes them safe (``max_step``, then each corrector
    clipped at its limit: the run says which), applies them (one put per family, plus the RF frequency with
    ``fit_rf``) and reads the orbit again: one event per iteration with the orbits before/after, the steps and
    the rms. Results: total correction per family [A], RF change [Hz], singular values used, orbits before and
    after; a PNG "orbit before/after" is written (path in the start document, ``figures``).

    Args:
        machine: the connected machine.
        orm: a run uid, a Tiled run, an :class:`OrbitResponse`, ``"model"`` (the design lattice's response), or
            ``None`` (measured now with :func:`measure_orm`, its own run).
        n_sv: number of singular values. Default (with ``tikhonov=None``): those above 1e-3 of the largest
            (profile ``tools.orbit_correction.rcond`` overrides 1e-3).
        tikhonov: Tikhonov regularisation alpha (in units of the weighted singular values) instead of a cut.
        bpm_weights: per BPM (n) or per reading (2n) weight, larger = corrected harder; 0 excludes.
        corrector_weights: per corrector of the ORM, larger = used more freely; 0 excludes.
        exclude_bpms: BPM names/indices not corrected (and not checked for NaN).
        exclude_correctors: corrector names/indices never moved.
        fit_rf: also correct with the RF frequency (MML's FitRF: the dispersion column) [Hz].
        gain: fraction of the computed correction applied per iteration (0 < gain <= 1).
        max_step: largest corrector move per iteration [A] (the whole step is scaled to respect it).
        max_iter: iterations at most.
        tol: stop when the rms of (reading - target) in both planes is below this [m].
        min_improvement: stop when an iteration reduced the larger of the two rms by less than this fraction of
            what the gain allows (``min_improvement * gain``): the correction cannot do better with these settings
            (noise, BPM offsets, the singular values kept). The result ``converged`` is 1 when ``tol`` was reached
            or the correction stalled so, 0 when ``max_iter`` ended it while it was still improving.
        target: golden orbit: ``(x, y)`` arrays [m], a (2n,) vector, or a run (uid or Tiled run) holding an
            orbit (``save_config`` records one).
        n_avg: orbit acquisitions averaged per reading.
        figure_dir: folder of the PNG (default ``$ACC_BLUESKY_FIGURE_DIR`` or the user data folder); ``False``:
            no figure.
        md: metadata merged into the start document.

    Returns:
        the uid of the correction run (the ORM measured with ``orm=None`` is its own run, ``orm_uid`` in the
        metadata).
    """
    if not 0 < gain <= 1:
        raise ValueError(f"gain must be in (0, 1], got {gain}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not 0 <= min_improvement < 1:
        raise ValueError(f"min_improvement must be in [0, 1), got {min_improvement}")
    if n_sv is not None and tikhonov is not None:
        raise ValueError("give n_sv or tikhonov, not both")
    n = len(machine.bpm)
    tx, ty = _target_orbit(target, n)
    holder: dict[str, Any] = {}

    def get_orm() -> MsgGenerator[OrbitResponse]:
        if orm is None:
            uid = yield from measure_orm(machine, rf=fit_rf)
            holder["orm_uid"] = uid
            return OrbitResponse.from_run(_RUNS[uid])
        r = load_orm(orm, machine)
        holder["orm_uid"] = r.uid or ("model" if r.kind == "model" else None)  # a recorded model: its run
        return r

    def plan() -> MsgGenerator[str]:
        resp = yield from get_orm()
        bad = ~np.asarray(machine.bpm.good, dtype=bool)
        system = CorrectionSystem.build(resp, fit_rf=fit_rf, bpm_weights=bpm_weights,
                                        corrector_weights=corrector_weights, exclude_bpms=exclude_bpms,
                                        exclude_correctors=exclude_correctors, bad_bpms=bad)
        nsv = n_sv
        if nsv is None and tikhonov is None:
            s = system.solver.used_singular_values()
            rcond = float(machine.profile.tool_defaults("orbit_correction").get("rcond", 1e-3))
            nsv = int(np.sum(s >= rcond * s[0]))
        n_all = len(system.solver.used_singular_values())
        if nsv is not None and not 1 <= int(nsv) <= n_all:
            raise ValueError(f"n_sv must be between 1 and {n_all} (number of singular values), got {nsv}")
        if tikhonov is not None and tikhonov < 0:
            raise ValueError(f"tikhonov alpha must be >= 0, got {tikhonov}")
        sv_used = system.solver.used_singular_values(nsv)
        excluded = [resp.bpm_index(b) for b in exclude_bpms]
        # correctors of the ORM grouped by family (one put per family per iteration)
        groups: dict[str, list[tuple[int, int]]] = {}
        for j, name in enumerate(resp.corrector_names):
            fam, _, num = name.rpartition(":")
            if fam not in machine.families:
                raise KeyError(f"the ORM's corrector {name!r} is not a device of this machine")
            groups.setdefault(fam, []).append((j, int(num) - 1))
        fams = list(groups)
        fig_path = None if figure_dir is False else (
            _figure_dir(figure_dir) / f"correct_orbit_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.png")
        params = {"orm": holder.get("orm_uid"), "n_sv": nsv, "tikhonov": tikhonov,
                  "bpm_weights": None if bpm_weights is None else "given",
                  "corrector_weights": None if corrector_weights is None else "given",
                  "exclude_bpms": [str(b) for b in exclude_bpms],
                  "exclude_correctors": [str(c) for c in exclude_correctors], "fit_rf": fit_rf, "gain": gain,
                  "max_step": max_step, "max_iter": int(max_iter), "tol": tol, "min_improvement": min_improvement,
                  "target": None if target is None else (
                      target if isinstance(target, str) else run_start(target).get("uid", "run")
                      if hasattr(target, "metadata") else "arrays (start document: target_x, target_y)"),
                  "n_avg": int(n_avg)}
        extra = {"orm_uid": holder.get("orm_uid"), "bpm_names": list(machine.bpm.names),
                 **({"target_x": tx.tolist(), "target_y": ty.tolist()} if target is not None else {}),
                 "corrector_names": list(resp.corrector_names),
                 "figures": {} if fig_path is None else {"orbit": str(fig_path)},
                 "num_points": int(max_iter)}
        _md = _metadata("orbit_correction", machine, params, extra, md, "correct_orbit")
        rec_fields: dict[str, tuple[str, tuple[int, ...], str]] = {
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
        }
        for fam in fams:
            k = len(machine.families[fam])
            rec_fields[f"{fam}_step"] = ("A", (k,), f"{fam} setpoint change of this iteration")
            rec_fields[f"{fam}_setpoint"] = ("A", (k,), f"{fam} setpoints after the step")
        rec = Record("orbit_correction", rec_fields, hinted=("iteration", "rms_x_after", "rms_y_after"),
                     dtypes={"iteration": "integer", "n_clipped": "integer"})
        state: dict[str, Any] = {"messages": []}

        def inner() -> MsgGenerator[None]:
            snap = yield from snapshot_setpoints(machine, fams, rf=fit_rf)
            start_sp = {f: snap[f].copy() for f in fams}
            f_start = float(snap["RF:frequency"]) if fit_rf else float("nan")
            sp = {f: snap[f].copy() for f in fams}
            f_now = f_start
            x, y = yield from read_orbit(machine, n_avg, ignore=excluded, where="reading the orbit to correct")
            x_first, y_first = x, y
            used = 0
            for it in range(1, int(max_iter) + 1):
                dev = np.concatenate([x - tx, y - ty])
                rx, ry = rms(dev[:n], ~bad), rms(dev[n:], ~bad)
                if tol is not None and max(rx, ry) <= tol:
                    state["converged"] = True
                    break
                dk, drf = system.step(dev, n_sv=nsv, tikhonov=tikhonov, gain=gain)
                # make the step safe: max_step then limits, per family
                cur = np.concatenate([[sp[f][i] for (_, i) in groups[f]] for f in fams])
                order = np.concatenate([[j for (j, _) in groups[f]] for f in fams]).astype(int)
                step = dk[order]
                lo = np.concatenate([[machine.families[f].limits.low] * len(groups[f]) for f in fams])
                hi = np.concatenate([[machine.families[f].limits.high] * len(groups[f]) for f in fams])
                names = [resp.corrector_names[j] for j in order]
                safe, rep = limit_step(step, cur, lo, hi, max_step, names)
                if fit_rf and rep.scale != 1.0:
                    drf *= rep.scale
                if fit_rf:
                    lim = machine.rf.frequency_limits
                    new_f = float(np.clip(f_now + drf, lim.low, lim.high))
                    if new_f != f_now + drf:
                        rep.messages.append(f"RF step clipped at the frequency limits [{lim.low}, {lim.high}] Hz")
                    drf = new_f - f_now
                state["messages"] += [f"iteration {it}: {msg}" for msg in rep.messages]
                for msg in rep.messages:
                    warnings.warn(f"correct_orbit iteration {it}: {msg}", stacklevel=2)
                args: list[Any] = []
                k = 0
                fam_steps = {}
                for f in fams:
                    idx = [i for (_, i) in groups[f]]
                    st = np.zeros(len(machine.families[f]))
                    st[idx] = safe[k:k + len(idx)]
                    k += len(idx)
                    fam_steps[f] = st
                    if np.any(st != 0):
                        sp[f] = sp[f] + st
                        args += [machine.families[f], sp[f]]
                if fit_rf and drf != 0.0:
                    f_now = f_now + drf
                    args += [machine.rf, f_now]
                if args:
                    yield from move(*args)
                xa, ya = yield from read_orbit(machine, n_avg, ignore=excluded,
                                               where=f"reading the orbit after correction step {it}")
                da = np.concatenate([xa - tx, ya - ty])
                upd = {"iteration": it, "rms_x_before": rx, "rms_y_before": ry, "rms_x_after": rms(da[:n], ~bad),
                       "rms_y_after": rms(da[n:], ~bad), "x_before": x, "y_before": y, "x_after": xa,
                       "y_after": ya, "rf_step": drf, "rf_frequency": f_now, "scale": rep.scale,
                       "n_clipped": len(rep.clipped)}
                for f in fams:
                    upd[f"{f}_step"] = fam_steps[f]
                    upd[f"{f}_setpoint"] = sp[f]
                rec.update(**upd)
                yield from emit(rec)
                used = it
                x, y = xa, ya
                worst_before, worst_after = max(rx, ry), max(upd["rms_x_after"], upd["rms_y_after"])
                if tol is not None and worst_after <= tol:
                    state["converged"] = True
                    break
                if worst_after > worst_before * (1.0 - min_improvement * gain):
                    state["converged"] = True  # stalled: more iterations would not help
                    break
            if fig_path is not None:
                holder["figure"] = str(_orbit_figure(
                    fig_path, x_first - tx, y_first - ty, x - tx, y - ty,
                    f"{machine.profile.facility} {machine.profile.accelerator}: orbit correction "
                    f"({used} iteration(s), {len(sv_used)} singular values)"))
            # (the orbits before each step are in the primary stream; the results hold the final state)
            res: dict[str, Any] = {
                "x_after": x, "y_after": y,
                "rms_x_before": rms(x_first - tx, ~bad), "rms_y_before": rms(y_first - ty, ~bad),
                "rms_x_after": rms(x - tx, ~bad), "rms_y_after": rms(y - ty, ~bad),
                "singular_values": system.solver.used_singular_values(), "n_sv": np.asarray(len(sv_used)),
                "iterations": np.asarray(used), "converged": np.asarray(int(state.get("converged", False))),
                "rf_correction": np.asarray(f_now - f_start if fit_rf else 0.0)}
            units = {k: "m" for k in res} | {"singular_values": "", "iterations": "", "rf_correction": "Hz",
                                              "n_sv": "", "converged": ""}
            for f in fams:
                res[f"{f}_correction"] = sp[f] - start_sp[f]
                units[f"{f}_correction"] = "A"
            desc = {"singular_values": "all weighted singular values (the first n_sv were used)",
                    "n_sv": "number of singular values used", "iterations": "iterations applied",
                    "converged": "1: tol reached or the last iteration no longer improved (min_improvement); 0: "
                                 "max_iter ended it while it still improved",
                    "rf_correction": "total RF frequency change", "x_after": "horizontal orbit at the end",
                    "y_after": "vertical orbit at the end"}
            yield from _store(holder, res, units, {k: desc.get(k, k.replace("_", " ")) for k in res})

        return (yield from _run(inner(), _md, holder))

    def whole() -> MsgGenerator[str]:
        return (yield from plan())

    cor_fams = sorted(set(machine.hcors) | set(machine.vcors))
    return (yield from restoring(machine, whole(), families=cor_fams, rf=True, on_success=False))


# ======================================================================================================
# orbit_bump
def orbit_bump(machine, bpm: str | int, amplitude: float | tuple[float | None, float | None],
               angle: float | tuple[float | None, float | None] | None = None, plane: str = "x",
               n_correctors: int = 3, orm: Any = None, *, rf: bool | None = None,
               correctors: Sequence[str] | None = None, exclude_correctors: Sequence[str] = (),
               couple: bool = True, max_iter: int = 4, tol: float = 0.3e-6, n_avg: int = 1,
               md: dict | None = None) -> MsgGenerator[str]:
    """A closed local orbit bump at one BPM (MML's ``setorbitbump``): position, and angle with 4 correctors.

    The nearest usable correctors around the BPM are chosen (3 for a position bump, 4 for position + angle:
    among the nearest candidates, the set needing the smallest kicks), the bump is solved with the ORM and
    applied, then refined from the measured orbit until it is closed outside the correctors' span (rms change
    below ``tol``) and the BPM shows the requested amplitude. Horizontal bumps at fixed RF frequency change the
    path length through the dispersion; when the correctors alone cannot close that (3 correctors, or 4 with an
    angle), the RF frequency is used as an extra variable (``rf``), see :mod:`acc_bluesky.analysis.bump`.

    Args:
        machine: the connected machine.
        bpm: BPM name (``"BPM:012"``) or index.
        amplitude: orbit change at the BPM as the BPM reads it [m]; a float for ``plane``, or ``(x, y)`` with
            ``None`` for a plane left alone.
        angle: angle change at the BPM [rad] (model), float for ``plane`` or ``(x, y)``; needs 4 correctors.
        plane: ``"x"`` or ``"y"`` when ``amplitude`` is a float.
        n_correctors: 3 (position) or 4 (position + angle, or a position bump closed without the RF).
        orm: run uid, Tiled run, OrbitResponse, ``"model"`` or ``None`` (the model; measured orbits close it).
        rf: use the RF frequency as an extra variable (``None``: when needed, see above).
        correctors: force the corrector names (per plane in order of the planes bumped), else chosen.
        exclude_correctors: never use these.
        couple: also use the other plane's correctors at the bump's locations to cancel the leakage x-y coupling
            puts into the other plane (they move only if the measured orbit needs them).
        max_iter: measured refinements at most.
        tol: closure goal: rms orbit change outside the span [m].
        n_avg: orbit acquisitions averaged.
        md: metadata merged into the start document.

    Returns:
        the run uid. Results: ``<family>_step`` setpoint changes [A], ``rf_step`` [Hz], achieved amplitude, closure rms.
    """
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
    prof = machine.profile
    n = len(machine.bpm)
    b = int(bpm) if isinstance(bpm, (int, np.integer)) else machine.bpm.names.index(str(bpm)) \
        if str(bpm) in machine.bpm.names else None
    if b is None or not 0 <= b < n:
        raise KeyError(f"unknown BPM {bpm!r}; names look like {machine.bpm.names[0]!r}, indices 0..{n - 1}")
    if not machine.bpm.good[b]:
        raise ValueError(f"BPM {machine.bpm.names[b]} is out of service: a bump there cannot be measured")

    def plan() -> MsgGenerator[str]:
        resp = _model_response(prof, rf=True) if orm is None else load_orm(orm, machine)
        if resp.rf is None:
            model = _model_response(prof, resp.corrector_names, rf=True)
            resp = OrbitResponse(resp.matrix, resp.matrix_hw, resp.bpm_names, resp.corrector_names, resp.planes,
                                 rf=model.rf, delta=resp.delta, delta_physics=resp.delta_physics, df=resp.df,
                                 kind=resp.kind, uid=resp.uid, bpm_refpts=resp.bpm_refpts,
                                 corrector_refpts=resp.corrector_refpts, metadata=resp.metadata)
        geo = _bump.bump_geometry(prof)
        now_sp = yield from snapshot_setpoints(machine, list(machine.hcors) + list(machine.vcors), rf=False)
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
                    fam, _, num = c.rpartition(":")
                    if fam in machine.families:
                        lim = machine.families[fam].limits
                        v = float(now_sp[fam][int(num) - 1])
                        headroom[c] = (lim.low - v, lim.high - v)
                cors, inside = _bump.choose_bump_correctors(resp, prof, b, p, n_correctors,
                                                            angle=False if ang is None else float(ang),
                                                            use_rf=use_rf, exclude=exclude_correctors, geometry=geo,
                                                            amplitude=float(amps[p]), headroom=headroom)
            arow = None
            if ang is not None:
                rows = _bump.angle_rows_hw(prof, resp, b, cors)
                arow = np.array([rows[c] for c in cors])
            aux = _bump.aux_correctors(resp, cors, p, geo, exclude_correctors) if couple else []
            seg = _bump.free_segment(geo, b, cors) if ang is not None else np.array([], dtype=int)
            setups.append({"plane": p, "amp": float(amps[p]), "angle": ang, "cors": cors, "inside": inside,
                           "rf": use_rf, "arow": arow, "aux": aux, "segment": seg})
        all_cors = list(dict.fromkeys(c for s in setups for c in (*s["cors"], *s["aux"])))
        fams = sorted({c.rpartition(":")[0] for c in all_cors})
        any_rf = any(s["rf"] for s in setups)
        outside_any = np.ones(n, dtype=bool)
        for s in setups:
            outside_any &= ~s["inside"]
        params = {"bpm": machine.bpm.names[b], "amplitude": [amps.get("x"), amps.get("y")],
                  "angle": [angs.get("x"), angs.get("y")], "n_correctors": n_correctors,
                  "orm": resp.uid if resp.kind == "measured" else "model", "rf": any_rf, "max_iter": max_iter,
                  "tol": tol, "n_avg": int(n_avg)}
        extra = {"bpm_names": list(machine.bpm.names), "bump_correctors": all_cors,
                 "bump_span_bpms": [machine.bpm.names[i] for i in np.nonzero(~outside_any)[0]],
                 "num_points": int(max_iter) + 1}
        _md = _metadata("orbit_bump", machine, params, extra, md, "orbit_bump")
        fields: dict[str, tuple[str, tuple[int, ...], str]] = {
            "iteration": ("", (), "0 = first application, then measured refinements"),
            "amplitude_x": ("m", (), "measured x change at the BPM"),
            "amplitude_y": ("m", (), "measured y change at the BPM"),
            "closure_rms": ("m", (), "rms orbit change outside the bump span (both planes)"),
            "x": ("m", (n,), "horizontal orbit"), "y": ("m", (n,), "vertical orbit"),
            "rf_step": ("Hz", (), "total RF frequency change"),
            "angle_x": ("rad", (), "x angle change at the BPM from the readings of its free segment "
                                   "(NaN: not measurable there, the model's is used)"),
            "angle_y": ("rad", (), "y angle change at the BPM from the readings of its free segment"),
        }
        for f in fams:
            fields[f"{f}_step"] = ("A", (len(machine.families[f]),),
                                   f"total change of the {f} setpoints (non-zero: the bump's correctors)")
        rec = Record("bump", fields, hinted=("iteration", "closure_rms"), dtypes={"iteration": "integer"})

        def family_steps(total: dict[str, float]) -> dict[str, np.ndarray]:
            out = {f: np.zeros(len(machine.families[f])) for f in fams}
            for c, v in total.items():
                fam, _, num = c.rpartition(":")
                out[fam][int(num) - 1] = v
            return out

        def inner() -> MsgGenerator[None]:
            snap = yield from snapshot_setpoints(machine, fams, rf=any_rf)
            sp0 = {c: float(snap[c.rpartition(":")[0]][int(c.rpartition(":")[2]) - 1]) for c in all_cors}
            f0 = float(snap["RF:frequency"]) if any_rf else float("nan")
            x0, y0 = yield from read_orbit(machine, n_avg, where="reading the reference orbit")
            ref = np.concatenate([x0, y0])
            total = dict.fromkeys(all_cors, 0.0)
            rf_total = 0.0
            residual = None
            closure = float("nan")
            got = {}
            measured_angle: dict[str, float | None] = {}
            for it in range(0, int(max_iter) + 1):
                dk = dict.fromkeys(all_cors, 0.0)
                drf = 0.0
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
                # limits before anything moves
                for c in all_cors:
                    fam = c.rpartition(":")[0]
                    machine.families[fam].limits.check(c, sp0[c] + total[c] + dk[c], machine.families[fam].units)
                if any_rf:
                    machine.rf.frequency_limits.check("RF frequency", f0 + rf_total + drf, "Hz")
                args: list[Any] = []
                for c in all_cors:
                    total[c] += dk[c]
                    fam, _, num = c.rpartition(":")
                    args += [machine.families[fam][int(num) - 1], sp0[c] + total[c]]
                if any_rf and drf:
                    rf_total += drf
                    args += [machine.rf, f0 + rf_total]
                yield from move(*args)
                x, y = yield from read_orbit(machine, n_avg, where=f"applying bump step {it}")
                residual = np.concatenate([x, y]) - ref
                out2 = np.concatenate([outside_any, outside_any])
                closure = rms(residual[out2])
                got = {"x": residual[b], "y": residual[n + b]}
                for s in setups:
                    if s["angle"] is not None:
                        measured_angle[s["plane"]] = _bump.angle_from_orbit(prof, b, s["plane"], residual,
                                                                            s["segment"])
                ma = {k: (np.nan if measured_angle.get(k) is None else measured_angle[k]) for k in ("x", "y")}
                rec.update(iteration=it, amplitude_x=got["x"], amplitude_y=got["y"], closure_rms=closure, x=x, y=y,
                           rf_step=rf_total, angle_x=ma["x"], angle_y=ma["y"],
                           **{f"{f}_step": v for f, v in family_steps(total).items()})
                yield from emit(rec)
                amp_ok = all(abs(got[s["plane"]] - s["amp"]) <= max(1e-3 * abs(s["amp"]), tol) for s in setups)
                ang_ok = all(s["angle"] is None or measured_angle.get(s["plane"]) is None
                             or abs(measured_angle[s["plane"]] - s["angle"]) <= max(2e-3 * abs(s["angle"]), 1e-8)
                             for s in setups)
                if closure <= tol and amp_ok and ang_ok:
                    break
            res = {**{f"{f}_step": v for f, v in family_steps(total).items()}, "rf_step": np.asarray(rf_total),
                   "amplitude_x": np.asarray(got.get("x", np.nan)), "amplitude_y": np.asarray(got.get("y", np.nan)),
                   "closure_rms": np.asarray(closure), "orbit_change_x": residual[:n], "orbit_change_y": residual[n:],
                   "inside": (~outside_any).astype(np.int64)}
            units = {**{f"{f}_step": "A" for f in fams}, "rf_step": "Hz", "amplitude_x": "m", "amplitude_y": "m",
                     "closure_rms": "m", "orbit_change_x": "m", "orbit_change_y": "m", "inside": ""}
            desc = {**{f"{f}_step": f"{f} setpoint changes (the bump's correctors: start document "
                                    "bump_correctors)" for f in fams}, "rf_step": "RF frequency change",
                    "amplitude_x": "x change at the BPM", "amplitude_y": "y change at the BPM",
                    "closure_rms": "rms change outside the span", "orbit_change_x": "x change at every BPM",
                    "orbit_change_y": "y change at every BPM", "inside": "1 = BPM inside the bump span"}
            yield from _store(holder, res, units, desc)

        holder: dict[str, Any] = {}
        return (yield from restoring(machine, _run(inner(), _md, holder), families=fams, rf=True,
                                     on_success=False))

    return (yield from plan())


# ======================================================================================================
# measure_dispersion
def measure_dispersion(machine, df: float | None = None, n_steps: int = 1, n_avg: int = 1, settle: float = 0.0,
                       md: dict | None = None) -> MsgGenerator[str]:
    """Measure the dispersion at every BPM from RF frequency steps (MML's ``measdisp``).

    The RF frequency is stepped symmetrically around its present value, ``f0 + k df`` for
    ``k = -n_steps .. n_steps``; the orbit is read at each step (one event each) and the RF put back. The
    momentum deviation of a step is ``dp = -df / (f0 alpha_c)`` with the momentum compaction ``alpha_c`` of the
    profile's design lattice (4D, pyAT ``get_mcf``): no twin needed. The dispersion is the slope of the orbit
    against ``dp`` per BPM (symmetric steps cancel the second-order dispersion).

    Args:
        machine: the connected machine.
        df: RF step [Hz]; default the profile's ``tools.dispersion.df`` (else 20 Hz).
        n_steps: steps on each side of ``f0``.
        n_avg: orbit acquisitions averaged per step.
        settle: wait after each RF move [s].
        md: metadata merged into the start document.

    Returns:
        the run uid; ``Dispersion.from_run(catalog[uid])`` reads ``eta_x``, ``eta_y`` [m].
    """
    prof = machine.profile
    if df is None:
        df = float(prof.tool_defaults("dispersion").get("df", 20.0))
    df = float(df)
    if df == 0 or not np.isfinite(df):
        raise ValueError(f"df must be a non-zero RF step in Hz, got {df}")
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    n = len(machine.bpm)
    offsets = np.arange(-int(n_steps), int(n_steps) + 1) * df
    alpha_c = momentum_compaction(prof.load_lattice())
    rec = Record("dispersion", {
        "step": ("", (), "step index (0 = reference frequency)"),
        "df": ("Hz", (), "RF frequency offset from f0"),
        "rf_frequency": ("Hz", (), "RF frequency setpoint"),
        "dp": ("", (), "momentum deviation -df / (f0 alpha_c)"),
        "x": ("m", (n,), "horizontal orbit"), "y": ("m", (n,), "vertical orbit"),
    }, hinted=("df", "dp"), dtypes={"step": "integer"})

    def plan() -> MsgGenerator[str]:
        f0 = float((yield from bps.rd(machine.rf.frequency)))
        for d in offsets:
            machine.rf.frequency_limits.check("RF frequency", f0 + d, "Hz")
        params = {"df": df, "n_steps": int(n_steps), "n_avg": int(n_avg), "settle": settle}
        extra = {"bpm_names": list(machine.bpm.names), "alpha_c": alpha_c, "rf_frequency": f0,
                 "rf_offsets": offsets.tolist(), "num_points": len(offsets)}
        _md = _metadata("dispersion", machine, params, extra, md, "measure_dispersion")

        def inner() -> MsgGenerator[None]:
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
            disp = Dispersion(ex, ey, list(machine.bpm.names), offsets, f0, alpha_c)
            res = disp.to_results()
            units = {"eta_x": "m", "eta_y": "m", "f_rf": "Hz", "alpha_c": ""}
            desc = {"eta_x": "horizontal dispersion at the BPMs", "eta_y": "vertical dispersion at the BPMs",
                    "f_rf": "reference RF frequency (offsets: start document rf_offsets)",
                    "alpha_c": "momentum compaction of the model"}
            yield from _store(holder, res, units, desc)

        holder: dict[str, Any] = {}
        return (yield from _run(inner(), _md, holder))

    return (yield from restoring(machine, plan(), families=(), rf=True))

