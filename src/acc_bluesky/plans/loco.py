"""LOCO as Bluesky plans: ``loco`` (fit the optics model to a measured orbit response, recorded as a run) and
``correct_optics`` (cancel the fitted gradient errors through the quadrupole setpoints).

The physics is in :mod:`acc_bluesky.analysis.loco` (``fit_loco``, ``optics_correction``); the plans are tools on
the scaffold (:mod:`acc_bluesky.plan_stubs.tool`): one FAIR run each, the inputs named by uid, the result in the
run's ``results`` stream (``LocoResult.from_run(catalog[uid])``), figures, and ``correct_optics`` restores every
setpoint it changed when it is aborted, stopped or fails.

Iterating, as MML users do (each step its own run, each reading the one before from the catalogue)::

    for _ in range(2):
        orm = RE(ap.measure_orm(m)).plan_result
        disp = RE(ap.measure_dispersion(m)).plan_result
        fit = RE(ap.loco(m, orm=orm, dispersion=disp)).plan_result
        RE(ap.correct_optics(m, loco=fit))

The second ``loco`` starts from the corrected setpoints (read from the machine), and ``correct_optics`` aims at the
design optics, not at "minus the last fit": a second pass refines the first instead of applying it twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis._common import rms
from ..analysis.dispersion import Dispersion
from ..analysis.loco import (
    FIT_CHOICES,
    LocoResult,
    OpticsCorrection,
    beta_beat,
    corrected_lattice,
    fit_loco,
    optics_correction,
)
from ..analysis.orm import OrbitResponse
from ..analysis.tune import MODEL_FAMILY_TYPES
from ..machine import Machine
from ..plan_stubs.machine import check_limits
from ..plan_stubs.optics import family_setpoints, move_families
from ..plan_stubs.runs import resolve
from ..plan_stubs.tool import Restore, ToolError, ToolResult, open_tool_run, thread_safe_figure, tool

__all__ = ["loco", "correct_optics"]  # noqa: RUF022 - the order of the tools

_RING_ONLY = "LOCO fits the closed-orbit response of a ring"
#: Family types whose setpoints shape the linear optics (read as the start model of the fit).
_OPTICS_TYPES = MODEL_FAMILY_TYPES
#: Family types ``correct_optics`` moves.
_CORRECTION_TYPES = ("quadrupole", "skew")


def _model_families(machine: Machine) -> list[str]:
    return [n for n, f in machine.families.items() if f.type in _OPTICS_TYPES]


def _start_fit(fn: Callable[..., Any], **kwargs: Any) -> MsgGenerator[tuple[dict[str, Any] | None, Any]]:
    """Start ``fn(on_layout=..., **kwargs)`` in a worker thread (the RunEngine's loop stays responsive: Ctrl-C,
    pause, abort, the queue server's status; a fit of tens of seconds must not freeze it) and wait until it reports
    its layout (``on_layout(start keys)``) or ends. Returns ``(layout or None, handle)``; ``yield from
    _finish(handle)`` waits for its result (and raises its exception)."""
    handle: dict[str, Any] = {}

    async def layout() -> Any:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        def report(md: Any) -> None:  # in the worker thread
            loop.call_soon_threadsafe(lambda: got.done() or got.set_result(md))

        task = loop.run_in_executor(None, functools.partial(fn, on_layout=report, **kwargs))
        task.add_done_callback(lambda _: got.done() or got.set_result(None))
        handle["task"] = task
        return await got

    futures = yield from bps.wait_for([layout])
    if futures is None:  # iterated without a RunEngine (list(plan))
        seen: list[Any] = []
        try:
            handle["value"] = fn(on_layout=seen.append, **kwargs)
        except Exception as err:  # noqa: BLE001 - raised by _finish, after the run is open
            handle["error"] = err
        return (seen[0] if seen else None), handle
    return futures[0].result(), handle


def _finish(handle: dict[str, Any]) -> MsgGenerator[Any]:
    """The result of :func:`_start_fit`'s function (its exception raised here, in the plan)."""
    if "task" in handle:
        futures = yield from bps.wait_for([lambda: handle["task"]])
        return futures[0].result()
    if "error" in handle:
        raise handle["error"]
    return handle["value"]


def _fit(machine: Machine, resp: OrbitResponse, disp: Dispersion | None, **kwargs: Any):
    result = fit_loco(machine.profile, resp, disp, **kwargs)
    return result, result.beta_beat(machine.profile)


# ======================================================================================================
# loco
def _loco_value(result: ToolResult) -> LocoResult:
    return result.value


@thread_safe_figure
def _gradients_figure(result: ToolResult, path: Path) -> None:
    _loco_value(result).plot_gradients(path)


@thread_safe_figure
def _chi2_figure(result: ToolResult, path: Path) -> None:
    _loco_value(result).plot_chi2(path)


def _check_fit(machine: Machine, args: dict[str, Any]) -> None:
    fit = args.get("fit")
    if isinstance(fit, str):
        fit = (fit,)
    unknown = [f for f in (fit or ()) if f not in FIT_CHOICES]
    if unknown or not fit:
        raise ToolError(f"loco: fit must name what to fit among {FIT_CHOICES}, got {args.get('fit')!r}. Nothing was "
                        "recorded.")
    noise = args.get("bpm_noise")
    if noise is not None and not (np.isfinite(noise) and noise > 0):
        raise ToolError(f"loco: bpm_noise is the rms noise of one orbit reading [m], > 0; got {noise!r}")


@tool("loco", needs_beam=False, ring_only=_RING_ONLY, validate=_check_fit,
      figures={"gradients": _gradients_figure, "chi2": _chi2_figure})
def loco(machine: Machine, orm: Any, dispersion: Any = None,
         fit: Sequence[str] = ("quads", "bpm_gains", "bpm_rolls", "corrector_gains"), quads: Any = None,
         skews: Any = None, group: Any = "element", bpm_noise: float | None = None, rcond: float | None = None,
         n_sv: int | None = None, gradient_prior: float | None = None, max_iter: int = 12,
         exclude_bpms: Sequence[str] = (),
         exclude_correctors: Sequence[str] = (), figure_dir: str | Path | bool | None = None,
         md: dict | None = None) -> MsgGenerator[str]:
    """Fit the linear optics model to a measured orbit response matrix (and dispersion): MML's LOCO.

    Nothing moves: the plan reads the present setpoints of the optics families (the model the fit starts from is
    the design lattice with them: measure and fit without moving the magnets in between), fits
    (:func:`~acc_bluesky.analysis.loco.fit_loco`: analytic Jacobian, Gauss-Newton/Levenberg-Marquardt with an SVD
    cut, outliers, dead BPMs and stuck correctors excluded automatically; in a worker thread, so that the RunEngine
    stays responsive) and records the fit as a run, opened while the fit iterates (once it
    has its parameters): in the start document what is known then, the input runs by uid (``orm_uid``,
    ``dispersion_uid``), the request (``loco_fit``, ``loco_options``), the setpoints (``loco_setpoints``), every
    parameter's name, kind and units (``loco_names``, ``loco_kinds``, ``loco_units``) and the fitted magnets
    (``element_*``); in the ``results`` stream what the fit found: values and uncertainties, the residual ORM and
    dispersion, the beta-beat of the fitted model, the chi-square per iteration, the singular values and how many
    were kept, the exclusions with their reasons, the iterations and the fit time. A fit that fails leaves its
    run closed with ``exit_status`` fail and the error as the reason. Read it back with
    ``LocoResult.from_run(catalog[uid])`` (runs recorded before, with the outcome in the start document, too).
    Figures: fitted gradient errors against s (``figures.gradients``), chi-square per iteration
    (``figures.chi2``).

    Args:
        machine: the connected machine.
        orm: a ``measure_orm`` run (uid, partial uid, Tiled run, ``RE(...)`` result) or an ``OrbitResponse``.
        dispersion: a ``measure_dispersion`` run or a ``Dispersion`` (optional; without it the ORM's RF column is
            used when it has one).
        fit: what to fit, among ``quads``, ``skew``, ``bpm_gains``, ``bpm_rolls``, ``corrector_gains``,
            ``corrector_rolls``, ``energy``, ``rf`` (``rf``, the dispersion scale, is added with a dispersion).
        quads: magnets whose gradients are fitted: family names, device names or lattice indices (default: every
            quadrupole). ``skews``: the same for skew gradients (with ``"skew"`` in ``fit``).
        group: ``"element"`` (one ``dK`` [m^-2] per magnet), ``"family"`` (one ``dK/K`` per family: one power
            supply), or ``{group name: [families/devices]}``.
        bpm_noise: rms noise of one orbit reading [m]: the weights, and the uncertainties in absolute terms.
            Default: the profile's ``tools.loco.bpm_noise``; without one the weights are uniform and the
            uncertainties are scaled by the fit residual.
        rcond: relative singular-value cut of the normalised gradient Jacobian (default ``tools.loco.rcond``,
            else 3e-4; none with a ``gradient_prior``); ``n_sv``: keep this many singular values instead.
        gradient_prior: expected rms relative gradient error ``dK/K`` [1] (the magnets' field tolerance): a
            Gaussian prior instead of the cut, the minimum-mean-square-error fit of the individual gradients (default
            ``tools.loco.gradient_prior``, else none).
        max_iter: maximum Gauss-Newton iterations.
        exclude_bpms, exclude_correctors: names left out by request (besides those excluded automatically).
        figure_dir: folder of the figures; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    t0 = time.perf_counter()
    defaults = machine.profile.tool_defaults("loco")
    fit = (fit,) if isinstance(fit, str) else tuple(fit)
    noise = bpm_noise if bpm_noise is not None else defaults.get("bpm_noise")
    prior = gradient_prior if gradient_prior is not None else defaults.get("gradient_prior")
    if prior is not None and not (np.isfinite(prior) and prior > 0):
        raise ToolError(f"loco: gradient_prior is an rms relative gradient error (> 0), got {prior!r}")
    if prior is not None and noise is None:
        raise ToolError("loco: gradient_prior needs bpm_noise [m] (the noise of what each ORM step recorded: one "
                        "acquisition's / sqrt(n_avg)), or tools.loco.bpm_noise in the profile. Nothing was recorded.")
    rc = rcond if rcond is not None else (None if prior is not None else float(defaults.get("rcond", 3e-4)))
    resp = yield from resolve(orm, OrbitResponse, tools=("orbit_response",), what="orm")
    disp = None
    if dispersion is not None:
        disp = yield from resolve(dispersion, Dispersion, tools=("dispersion",), what="dispersion")
    setpoints = yield from family_setpoints(machine, _model_families(machine))
    t_fit = time.perf_counter()
    layout, handle = yield from _start_fit(
        functools.partial(_fit, machine, resp, disp), fit=fit, quads=quads, skews=skews, group=group,
        setpoints=setpoints, bpm_noise=noise, rcond=rc, n_sv=n_sv, gradient_prior=prior, max_iter=max_iter,
        exclude_bpms=exclude_bpms, exclude_correctors=exclude_correctors)
    # The run opens now, while the fit iterates in its thread: the writer stores the start document meanwhile, and
    # after the fit only the results event and the stop document are left. The start document holds what is known
    # once the fit has its parameters (names, kinds, units, fitted magnets, start model, options; ``layout``; the
    # request alone when the fit failed before that); the outcome (chi-square, singular values, exclusions ...) is
    # in the results. A fit that raises closes the run with exit_status fail and the error as its reason.
    upfront = {"loco_fit": list(fit), "orm_uid": resp.uid, "dispersion_uid": None if disp is None else disp.uid,
               "loco_setpoints": setpoints, "loco_run_layout": 2, "num_points": 0}
    yield from open_tool_run(**(upfront | (layout or {})))
    result, beta = yield from _finish(handle)
    t_fit = time.perf_counter() - t_fit
    result.timing["plan_fit"] = t_fit
    res = result.to_results(beta)
    units = {k: u for k, (u, _) in LocoResult.RESULT_KEYS.items()}
    desc = {k: d for k, (_, d) in LocoResult.RESULT_KEYS.items()}
    result.timing["plan_before_store"] = time.perf_counter() - t0
    return ToolResult(res, units, desc, value=result)


# ======================================================================================================
# correct_optics
def _correction_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    return Restore(tuple(n for n, f in machine.families.items() if f.type in _CORRECTION_TYPES), rf=False)


@thread_safe_figure
def _beta_figure(result: ToolResult, path: Path) -> None:
    from matplotlib.figure import Figure

    v = result.value
    s = v["s"]
    fig = Figure(figsize=(10, 6), dpi=100)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, p in zip(axes, "xy"):
        b, a = v[f"beta_beat_{p}_before"], v[f"beta_beat_{p}_after"]
        ax.plot(s, 100 * b, ".-", lw=0.7, ms=3, label=f"before (model fitted to the machine), rms {100 * rms(b):.2f} %")
        ax.plot(s, 100 * a, ".-", lw=0.7, ms=3, label=f"after (predicted), rms {100 * rms(a):.2f} %")
        ax.set_ylabel(f"beta-beat {p} [%]")
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("s [m]")
    fig.suptitle(f"correct_optics from LOCO {str(v['loco_uid'])[:8]} (fraction {v['fraction']:g})")
    fig.tight_layout()
    fig.savefig(path)


def _model_at(result: LocoResult, machine: Machine, setpoints: dict[str, np.ndarray]):
    """The fitted model (the fit's magnet errors) at other setpoints: what the machine is at ``setpoints``."""
    fams = {f: np.asarray(v, dtype=float) for f, v in setpoints.items()}
    stub = OpticsCorrection(setpoints=fams, current=fams, delta_hw={}, delta_k={}, devices={}, fraction=0.0)
    return corrected_lattice(result, stub, machine.profile)


@tool("optics_correction", restore=_correction_restore, keep=True, needs_beam=True, ring_only=_RING_ONLY,
      figures={"beta_beat": _beta_figure}, family_kind="quadrupole")
def correct_optics(machine: Machine, loco: Any, families: Sequence[str] | None = None, fraction: float = 1.0,
                   figure_dir: str | Path | bool | None = None, md: dict | None = None) -> MsgGenerator[str]:
    """Cancel the gradient errors a LOCO fit found: move the quadrupole (and skew) setpoints so that the fitted
    model becomes the design optics (MML LOCO's "set model").

    Per fitted magnet, with ``dK`` its fitted error (a calibration or field error: it stays when the current
    changes), the new setpoint is the one whose nominal strength is ``K_nom(I) + fraction (K_design - dK -
    K_nom(I))``, converted to hardware units [A] through each family's calibration. Measured at the design
    setpoints this is minus the fitted error; measured after an earlier correction (the fit started from the
    corrected setpoints) it does not apply that correction twice. Every new setpoint is checked against the limits
    of its family before anything moves: one outside refuses the whole correction (``LimitError`` naming the magnet,
    its value and the limits) and nothing moves. Magnets out of service are left alone.

    Recorded: the setpoints before/after of every magnet of the moved families [A] (``setpoints_before``,
    ``setpoints_after``, names in the start document's ``magnets``) and the strength changes (``dk``), the
    beta-beat at the BPMs of the model fitted to the machine before and after (predicted: the LOCO model at the
    present and the new setpoints, against the design), their rms. Figure: beta-beat before/after
    (``figures.beta_beat``). When aborted, stopped or failing, every quadrupole and skew setpoint is put back.

    Args:
        machine: the connected machine.
        loco: a ``loco`` run (uid, partial uid, Tiled run, ``RE(...)`` result) or a ``LocoResult``.
        families: quadrupole (or skew) families to move (default: every family with a fitted magnet).
        fraction: the part of the correction applied, in (0, 1] (1: all of it).
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    if not (isinstance(fraction, (int, float)) and np.isfinite(fraction) and 0 < fraction <= 1):
        raise ToolError(f"correct_optics: fraction must be in (0, 1], got {fraction!r}. Nothing was moved.")
    result = yield from resolve(loco, LocoResult, tools=("loco",), what="loco")
    if not any(k in ("normal", "skew") for k in result.element_kinds):
        raise ToolError(f"correct_optics: the LOCO run {str(result.uid)[:8]} fitted no gradient (fit had no "
                        "'quads' or 'skew'): nothing to correct. Nothing was moved.")
    if families is not None:
        families = [families] if isinstance(families, str) else list(families)
        for f in families:
            if f not in machine.families or machine.families[f].type not in _CORRECTION_TYPES:
                raise ToolError(f"correct_optics: {f!r} is not a quadrupole or skew family of "
                                f"{machine.profile.name!r} (families: "
                                f"{sorted(n for n, g in machine.families.items() if g.type in _CORRECTION_TYPES)}). "
                                "Nothing was moved.")
    now = yield from family_setpoints(machine, _model_families(machine))
    corr = optics_correction(result, machine.profile, setpoints=now, families=families, fraction=float(fraction),
                             check_limits=True)  # LimitError (profile limits) before anything moves
    for f, sp in corr.setpoints.items():  # and the devices' limits (the same unless changed at run time)
        check_limits(machine.families[f], sp, f"correct_optics: new setpoints of {f}")
    if not corr.setpoints:
        raise ToolError("correct_optics: no family to move (" + "; ".join(
            f"{k}: {v}" for k, v in list(corr.skipped.items())[:5]) + "). Nothing was moved.")
    design = machine.profile.load_lattice()
    bpms = result.bpm_refpts if result.bpm_refpts is not None else machine.bpm.refpts
    before = beta_beat(_model_at(result, machine, {f: now[f] for f in corr.setpoints}), design, bpms)
    after = beta_beat(corrected_lattice(result, corr, machine.profile), design, bpms)
    fams = list(corr.setpoints)
    yield from open_tool_run(loco_uid=result.uid, orm_uid=result.orm_uid, families=fams, fraction=float(fraction),
                             hardware_units={f: corr.units.get(f, "") for f in fams},
                             physics_units={f: str(machine.families[f].physics_units) for f in fams},
                             magnets=[d for f in fams for d in corr.devices[f]], skipped=dict(corr.skipped),
                             num_points=0)
    moved = {f: np.asarray(corr.setpoints[f], dtype=float) for f in fams if np.any(corr.delta_hw[f])}
    yield from move_families(machine, moved)
    # packed results (the writer's cost is per key, not per byte): the magnets of every moved family in the order
    # of the start document's ``magnets``; no event stream (it would repeat setpoints_after, one key per family)
    s = np.asarray(machine.bpm.s, dtype=float) if len(bpms) == len(machine.bpm) else np.arange(len(bpms), dtype=float)
    res: dict[str, Any] = {
        "setpoints_before": np.concatenate([corr.current[f] for f in fams]),
        "setpoints_after": np.concatenate([corr.setpoints[f] for f in fams]),
        "dk": np.concatenate([corr.delta_k[f] for f in fams]),
        "beta_beat_before": np.vstack(before), "beta_beat_after": np.vstack(after),
        "beta_beat_rms": np.array([[rms(before[0]), rms(before[1])], [rms(after[0]), rms(after[1])]]),
    }
    hu = "/".join(sorted({corr.units.get(f, "") for f in fams}))
    pu = "/".join(sorted({str(machine.families[f].physics_units) for f in fams}))
    units = {"setpoints_before": hu, "setpoints_after": hu, "dk": pu, "beta_beat_before": "", "beta_beat_after": "",
             "beta_beat_rms": ""}
    desc = {"setpoints_before": "setpoint of every magnet of the moved families before the correction (start "
                                "document: magnets)",
            "setpoints_after": "setpoint of every magnet of the moved families after the correction",
            "dk": "change of the nominal strength of every magnet (0: not moved)",
            "beta_beat_before": "beta-beat (x: row 0, y: row 1) at the BPMs of the LOCO model at the setpoints "
                                "before the correction, against the design",
            "beta_beat_after": "the same, predicted after the correction",
            "beta_beat_rms": "rms beta-beat: rows before / after (predicted), columns x / y"}
    value = {"s": s, **{f"beta_beat_{p}_{w}": res[f"beta_beat_{w}"][k] for k, p in enumerate("xy")
                        for w in ("before", "after")}}
    value |= {**res, "loco_uid": result.uid, "fraction": float(fraction), "families": fams,
             "correction": corr, "skipped": dict(corr.skipped)}
    return ToolResult(res, units, desc, value=value)
