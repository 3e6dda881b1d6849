"""Tune and chromaticity tools as Bluesky plans (MML's meastuneresp, settune, measchro, measchroresp, setchro).

Every plan is a :func:`~acc_bluesky.plan_stubs.tool.tool` taking the :class:`~acc_bluesky.machine.Machine` and
``md=None`` last: one FAIR run (tool names ``tune``, ``tune_response``, ``tune_correction``, ``chromaticity``,
``chromaticity_response``, ``chromaticity_correction``), one event per reading in the ``primary`` stream (progress
is visible live), its result in the run's ``results`` stream (analysis needs only the catalogue), the run uid
returned. Whatever a plan changes (family setpoints, RF frequency) is put back exactly when it is aborted, stopped
or fails; measurements also put everything back when they succeed, corrections keep their result.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis.chromaticity import (
    Chromaticity,
    ChromaticityResponse,
    dp_from_rf_steps,
    model_chromaticity_response,
    model_momentum_compaction,
    rf_steps_for_dp,
    scan_points,
)
from ..analysis.plots import chromaticity_fit_plot, family_response_figure, tune_diagram
from ..analysis.tune import (
    MODEL_FAMILY_TYPES,
    FamilyResponse,
    MeasuredTunes,
    TuneResponse,
    model_tune_response,
    resonance_distance,
    resonance_gaps,
)
from ..machine import Machine
from ..plan_stubs.machine import Record, check_limits
from ..plan_stubs.optics import family_setpoints, move_families, read_tunes, resolve_families
from ..plan_stubs.runs import resolve
from ..plan_stubs.tool import Restore, ToolResult, open_tool_run, thread_safe_figure, tool
from ..profile import LimitError

__all__ = [
    "measure_tune",
    "measure_tune_response",
    "correct_tune",
    "measure_chromaticity",
    "measure_chromaticity_response",
    "correct_chromaticity",
]

#: Tune change [fractional tune units] that the default step of ``measure_tune_response`` aims at.
TUNE_RESPONSE_DQ = 2e-3
#: Chromaticity change that the default step of ``measure_chromaticity_response`` aims at.
CHROMATICITY_RESPONSE_DXI = 1.0
_RING_ONLY_TUNE = "betatron tunes exist only in a ring"
_RING_ONLY_CHROM = "the chromaticity is measured from RF frequency steps, which change the beam energy only in a ring"


# Result keys of each tool: name -> (units, physics meaning), written in the results stream's descriptor.
_TUNE_KEYS = {
    "qx": ("", "horizontal fractional tune (mean of the readings)"),
    "qy": ("", "vertical fractional tune (mean of the readings)"),
    "qx_std": ("", "standard deviation of the qx readings"),
    "qy_std": ("", "standard deviation of the qy readings"),
    "samples": ("", "every reading (n_avg x 2): qx, qy"),
}
_TUNE_RESPONSE_KEYS = {
    "dQ_dI": ("1/A", "tune response (2 x families): rows qx, qy; columns the start document's families"),
    "dQ_dK": ("1/(m^-2)", "tune response per unit of family strength (through the calibration slope)"),
    "Q_reference": ("", "tunes at the reference setting"),
    "Q_reference_std": ("", "spread of the reference readings"),
    "delta": ("A", "half step per family"),
    "Q_plus": ("", "tunes with each family at +delta (2 x families)"),
    "Q_minus": ("", "tunes with each family at -delta (2 x families)"),
}
_TUNE_CORRECTION_KEYS = {
    "q_history": ("", "measured tunes (qx, qy) before each correction and after the last"),
    "q_std_history": ("", "spread of the readings of each measurement"),
    "steps_hw": ("A", "family steps applied per iteration (iterations x families)"),
    "delta_hw": ("A", "total change per family"),
    "delta_physics": ("m^-2", "total change per family in physics units"),
    "q_before": ("", "tunes before the correction"),
    "q_after": ("", "tunes after the correction"),
    "target": ("", "requested fractional tunes"),
    "converged": ("", "1 if both planes ended within tol of the target"),
    "iterations": ("", "number of corrections applied"),
    "response_hw": ("1/A", "tune response used (2 x families)"),
}
_CHROM_KEYS = {
    "xi": ("", "chromaticities (xi_x, xi_y) = dQ/d(dp/p) at the starting RF frequency"),
    "xi_std": ("", "standard errors of xi from the fit residuals"),
    "dp": ("", "momentum deviation dp/p of each scan point (model momentum compaction)"),
    "df": ("Hz", "RF frequency step of each point from f_rf"),
    "qx": ("", "mean horizontal tune per point"),
    "qy": ("", "mean vertical tune per point"),
    "qx_std": ("", "spread of the qx readings per point"),
    "qy_std": ("", "spread of the qy readings per point"),
    "coeffs_x": ("", "fit coefficients of qx(dp), increasing powers of dp"),
    "coeffs_y": ("", "fit coefficients of qy(dp), increasing powers of dp"),
    "order": ("", "polynomial order of the fit"),
    "f_rf": ("Hz", "starting RF frequency (restored after the scan)"),
    "alphas": ("", "path-length polynomial of the model: dC/C = a1 dp + a2 dp^2 (a1: momentum compaction)"),
}
_CHROM_RESPONSE_KEYS = {
    "dxi_dI": ("1/A", "chromaticity response (2 x families): rows xi_x, xi_y; columns the start document's "
                      "families"),
    "dxi_dK": ("1/(m^-3)", "chromaticity response per unit of family strength (through the calibration slope)"),
    "xi_reference": ("", "chromaticities at the reference setting"),
    "delta": ("A", "half step per family"),
    "xi_plus": ("", "chromaticities with each family at +delta (2 x families)"),
    "xi_minus": ("", "chromaticities with each family at -delta (2 x families)"),
}
_CHROM_CORRECTION_KEYS = {
    "xi_history": ("", "measured chromaticities before each correction and after the last"),
    "xi_std_history": ("", "fit errors of each measurement"),
    "steps_hw": ("A", "family steps applied per iteration (iterations x families)"),
    "delta_hw": ("A", "total change per family"),
    "delta_physics": ("m^-3", "total change per family in physics units"),
    "xi_before": ("", "chromaticities before the correction"),
    "xi_after": ("", "chromaticities after the correction"),
    "target": ("", "requested chromaticities"),
    "converged": ("", "1 if both planes ended within tol of the target"),
    "iterations": ("", "number of corrections applied"),
    "response_hw": ("1/A", "chromaticity response used (2 x families)"),
}


# ----------------------------------------------------------------------------------------------------
# helpers
def _result(res: dict[str, Any], keys: dict[str, tuple[str, str]], value: Any = None, **override) -> ToolResult:
    """Results with the units and meanings of ``keys`` (``override``: key -> (units, description))."""
    keys = keys | override
    return ToolResult(res, {k: u for k, (u, _) in keys.items() if k in res},
                      {k: d for k, (_, d) in keys.items() if k in res}, value=value)


def _check_n_avg(n_avg: int) -> int:
    if isinstance(n_avg, bool) or not isinstance(n_avg, (int, np.integer)) or n_avg < 1:
        raise ValueError(f"n_avg must be an integer >= 1 (readings averaged per point), got {n_avg!r}")
    return int(n_avg)


def _check_iter(max_iter: int, tol: float, what: str) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1 (correction iterations), got {max_iter!r}")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number ({what}), got {tol!r}")


def _pair(value: Sequence[float], name: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        v = np.array([])
    if v.shape != (2,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be two finite numbers (x, y), got {value!r}")
    return v


def _slopes(machine: Machine, families: Sequence[str], base: dict[str, np.ndarray]) -> np.ndarray:
    """d(physics)/d(A) of each family at its operating point (mean of its in-service setpoints)."""
    e = machine.profile.energy
    out = []
    for n in families:
        fam = machine.families[n]
        hw = float(np.mean(base[n][fam.good])) if np.any(fam.good) else float(np.mean(base[n]))
        out.append(float(np.atleast_1d(fam.calibration.slope(hw, e, e))[0]))
    return np.asarray(out)


def _physics_units(machine: Machine, families: Sequence[str]) -> list[str]:
    return [str(machine.families[n].physics_units) for n in families]


def _model_setpoints(machine: Machine) -> MsgGenerator[dict[str, np.ndarray]]:
    names = [n for n, f in machine.families.items() if f.type in MODEL_FAMILY_TYPES]
    return (yield from family_setpoints(machine, names))


def _steps(delta: float | Sequence[float] | dict[str, float] | None, families: list[str],
           default: np.ndarray, what: str) -> np.ndarray:
    if delta is None:
        d = np.asarray(default, dtype=float)
    elif isinstance(delta, dict):
        unknown = set(delta) - set(families)
        if unknown:
            raise KeyError(f"delta names families that are not measured: {sorted(unknown)}; families: {families}")
        d = np.array([float(delta.get(n, default[j])) for j, n in enumerate(families)])
    else:
        d = np.broadcast_to(np.asarray(delta, dtype=float), (len(families),)).astype(float)
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise ValueError(f"{what}: delta must be positive steps in A (one per family or one for all), got {delta!r}")
    return d


def _needs_default(delta: Any, families: list[str]) -> bool:
    return delta is None or (isinstance(delta, dict) and bool(set(families) - set(delta)))


def _check_steps(machine: Machine, fams: list[str], base, d: np.ndarray, bipolar: bool, what: str) -> None:
    for j, n in enumerate(fams):
        good = machine.families[n].good
        for sgn in ((1, -1) if bipolar else (1,)):
            check_limits(machine.families[n], base[n] + sgn * d[j] * good, f"{what}: step {sgn * d[j]:+.4g} A of {n}")


def _family_restore(kind: str, rf: bool):
    def restore(machine: Machine, args: dict[str, Any]) -> Restore:
        fams = args.get("families")
        names = resolve_families(machine, fams, kind) if fams is not None else [
            n for n, f in machine.families.items() if f.type == kind]
        return Restore(tuple(names), rf=rf)

    return restore


def _response(machine: Machine, response: Any, cls: type[FamilyResponse], families: list[str] | None,
              measure, model) -> MsgGenerator[FamilyResponse]:
    """The ``response=`` parameter: ``None`` (measured now, its own run), ``"model"``, a result or a run."""
    if response is None:
        uid = yield from measure(machine, families)
        response = uid
    if isinstance(response, str) and response == "model":
        sp = yield from _model_setpoints(machine)
        resp = model(machine.profile, families, setpoints=sp)
        if not np.all(np.isfinite(resp.matrix_hw)):
            # the design lattice at setpoints that compensate errors it does not have (after LOCO, say) may be
            # unstable: the machine's optics is then close to the design's, whose response is used
            warnings.warn(f"the design lattice at the present setpoints has no {resp.observable} (linearly "
                          "unstable: the setpoints compensate errors the model does not have); the response of "
                          "the design optics at the design setpoints is used", RuntimeWarning, stacklevel=2)
            resp = model(machine.profile, families, setpoints=None)
        return resp
    if isinstance(response, FamilyResponse) and not isinstance(response, cls):
        raise TypeError(f"expected a {cls.__name__}, got a {type(response).__name__}")
    tools = ("tune_response",) if cls is TuneResponse else ("chromaticity_response",)
    return (yield from resolve(response, cls, tools=tools, what="response"))


# ----------------------------------------------------------------------------------------------------
# tunes
@thread_safe_figure
def _tunes_figure(result: MeasuredTunes, path: Path) -> None:
    q, dq = result.q, result.q_std
    tune_diagram(float(q[0]), float(q[1]), path,
                 title=f"measured tunes {q[0]:.5f} +- {dq[0]:.1e}, {q[1]:.5f} +- {dq[1]:.1e} "
                       f"({len(result.samples)} readings)")


def _response_figure(observable: str):
    @thread_safe_figure
    def draw(result: ToolResult, path: Path) -> None:
        r = result.value
        family_response_figure(path, r.families, r.matrix_hw, observable, reference=r.reference,
                               title=f"measured {observable} response")
    return draw


@tool("tune", ring_only=_RING_ONLY_TUNE, units={k: u for k, (u, _) in _TUNE_KEYS.items()},
      descriptions={k: d for k, (_, d) in _TUNE_KEYS.items()}, figures={"tune_diagram": _tunes_figure})
def measure_tune(machine: Machine, n_avg: int = 1, figure_dir: str | Path | bool | None = None,
                 md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Read the fractional tunes from the tune monitor.

    Args:
        machine: the connected machine.
        n_avg: number of readings averaged (one event each in ``primary``).
        figure_dir: folder of the figure ``tune_diagram`` (the working point among the resonance lines);
            ``False``: none.
        md: metadata merged into the run's start document.

    Stores ``qx``, ``qy`` (fractional tunes), ``qx_std``, ``qy_std`` (spread of the readings) and ``samples``
    (n_avg, 2). Read back with ``MeasuredTunes.from_run(cat[uid])``. Tool name ``tune``.
    """
    n_avg = _check_n_avg(n_avg)
    yield from open_tool_run()
    r = yield from read_tunes(machine, n_avg, where="while reading the tunes")
    return MeasuredTunes(r.mean, r.std, r.samples)


def _tune_noise(machine: Machine, n_avg: int) -> float:
    """rms noise [tune units] of a mean of ``n_avg`` tune readings (profile ``errors.tune_noise``)."""
    return float(machine.profile.spec.errors.tune_noise) / np.sqrt(max(int(n_avg), 1))


def _headroom(machine: Machine, name: str, base: np.ndarray, bipolar: bool) -> float:
    """Largest step [A] of every in-service magnet of family ``name`` from ``base`` that stays within its limits
    (both ways if ``bipolar``); negative if a magnet is already outside."""
    fam = machine.families[name]
    lim = fam.limits
    v = np.asarray(base, dtype=float)[np.asarray(fam.good, dtype=bool)]
    if lim is None or v.size == 0:
        return float("inf")
    room = lim.high - v
    if bipolar:
        room = np.minimum(room, v - lim.low)
    return float(np.min(room))


def _capped_steps(machine: Machine, families: list[str], base: dict[str, np.ndarray], bipolar: bool,
                  model: FamilyResponse, change: float, fallback: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Default steps [A] of ``families`` from ``model``: each aims at moving its observable by ``change``
    (``fallback`` [A] for a family the model sees no effect of), capped to the headroom of the family's magnets.
    Returns (aimed step, capped step, expected |change| of the capped step, headroom)."""
    size = np.nan_to_num(np.max(np.abs(model.select(families).matrix_hw), axis=0), nan=0.0)
    with np.errstate(divide="ignore"):
        aim = np.where(size > 0, change / np.where(size > 0, size, 1.0), fallback)
    room = np.array([_headroom(machine, n, base[n], bipolar) for n in families])
    step = np.where(aim > room, np.maximum(room, 0.0) * (1 - 1e-9), aim)  # (1 - 1e-9): rounding stays inside
    return aim, step, size * step, room


def _tune_step_plan(machine: Machine, families: list[str], base: dict[str, np.ndarray], bipolar: bool,
                    model: TuneResponse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Default steps [A] of ``families`` from ``model``: each aims at TUNE_RESPONSE_DQ, capped to the headroom of
    the family's magnets (:func:`_capped_steps`)."""
    return _capped_steps(machine, families, base, bipolar, model, TUNE_RESPONSE_DQ, 0.1)


def _default_tune_steps(machine: Machine, families: list[str], base: dict[str, np.ndarray], bipolar: bool,
                        n_avg: int, explicit: bool, defaulted: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Default steps [A] for the families in ``defaulted``, within the limits; the families kept.

    A step capped to the headroom is announced (warning: the step, the cap, the expected dQ). A family whose capped
    step moves the tunes by less than the tune-monitor noise is left out with a warning, or refused if the caller
    named it (``explicit``)."""
    model = model_tune_response(machine.profile, families, setpoints=(yield from _model_setpoints(machine)))
    aim, step, dq, room = _tune_step_plan(machine, families, base, bipolar, model)
    noise = _tune_noise(machine, n_avg)
    weak, capped, dropped = [], [], set()
    for j, n in enumerate(families):
        if n not in defaulted:
            continue
        lim = machine.families[n].limits
        if step[j] <= 0 or dq[j] < noise:
            dropped.add(n)
            weak.append(f"{n} (headroom {room[j]:.4g} A to the limits [{lim.low:g}, {lim.high:g}] A: step "
                        f"{step[j]:.4g} A, expected dQ {dq[j]:.2e})")
        elif step[j] < aim[j]:
            capped.append(f"{n}: {aim[j]:.4g} A -> {step[j]:.4g} A (limits [{lim.low:g}, {lim.high:g}] A), expected "
                          f"dQ {dq[j]:.2e} instead of {TUNE_RESPONSE_DQ:g}")
    why = (f"moves the tunes by less than the tune-monitor noise ({noise:.1e} rms for n_avg={n_avg}, profile "
           "errors.tune_noise) within its limits")
    if weak and explicit:
        raise ValueError(f"measure_tune_response: {len(weak)} family(ies) cannot be measured: the largest step "
                         f"{'both ways ' if bipolar else ''}{why}: {'; '.join(weak)}. Leave them out of 'families', "
                         "give their step in 'delta', raise n_avg, or check the setpoints and the profile's limits. "
                         "Nothing was moved.")
    if capped:
        warnings.warn(f"measure_tune_response: the default step of {len(capped)} family(ies) was capped to the "
                      f"limits (the tune change is smaller than {TUNE_RESPONSE_DQ:g}, the response noisier): "
                      f"{'; '.join(capped)}", RuntimeWarning, stacklevel=2)
    if weak:
        warnings.warn(f"measure_tune_response: leaving out {len(weak)} family(ies) whose largest step {why}: "
                      f"{'; '.join(weak)}", RuntimeWarning, stacklevel=2)
    keep = [n for n in families if n not in dropped]
    return np.array([step[families.index(n)] for n in keep]), keep


@tool("tune_response", restore=_family_restore("quadrupole", rf=False), ring_only=_RING_ONLY_TUNE,
      family_kind="quadrupole", figures={"response": _response_figure("tune")})
def measure_tune_response(machine: Machine, families: Sequence[str] | str | None = None,
                          delta: float | Sequence[float] | dict[str, float] | None = None, bipolar: bool = True,
                          n_avg: int = 1, figure_dir: str | Path | bool | None = None,
                          md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Measure the tune response matrix dQ/dI of quadrupole families (MML ``meastuneresp``).

    Each family in turn is stepped by ``+delta`` (and ``-delta`` if bipolar) on every in-service magnet, the tunes
    are read, and the family is put back.

    Args:
        machine: the connected machine.
        families: family names (default: every quadrupole family of the machine).
        delta: half step [A]: one value, one per family, or ``{family: A}``. Default: sized from the model so that
            each step moves the tunes by about 2e-3, capped to the headroom of the family's magnets to their limits
            (a warning gives the capped step and the tune change expected from it). A family whose largest step
            within the limits would move the tunes by less than the tune-monitor noise (profile
            ``errors.tune_noise``, divided by sqrt(n_avg)) is left out with a warning naming it; if ``families``
            named it, the plan refuses before anything moves. Steps given here are never capped: a step past the
            limits is refused.
        bipolar: step both ways (central difference) or only ``+delta`` (against the reference reading).
        n_avg: tune readings averaged per point.
        figure_dir: folder of the figure ``response`` (bars per family, per A); ``False``: none.
        md: metadata merged into the run's start document.

    Stores ``dQ_dI`` (2 x n, per A), ``dQ_dK`` (2 x n, per m^-2 through the calibration slope), ``Q_reference``,
    ``delta`` [A] and the raw tunes. Read back with ``TuneResponse.from_run(cat[uid])``. Tool ``tune_response``.
    """
    fams = resolve_families(machine, families, "quadrupole")
    n_avg = _check_n_avg(n_avg)
    base = yield from family_setpoints(machine, fams)
    if _needs_default(delta, fams):
        given = set(delta) if isinstance(delta, dict) else set()
        default, fams = yield from _default_tune_steps(machine, fams, base, bipolar, n_avg, families is not None,
                                                       [n for n in fams if n not in given])
        if not fams:
            raise ValueError("measure_tune_response: no quadrupole family can be stepped enough within its limits "
                             "to see the tunes move (see the warning above); give the steps in 'delta' or check "
                             "the setpoints and the profile's limits. Nothing was moved.")
    else:
        default = np.zeros(len(fams))
    d = _steps(delta, fams, default, "measure_tune_response")
    _check_steps(machine, fams, base, d, bipolar, "measure_tune_response")
    units = _physics_units(machine, fams)
    yield from open_tool_run(families=fams, physics_units=units, response_kind="measured",
                             delta_hw=[float(x) for x in d])
    info = Record("step", {
        "family": ("", (), "index of the stepped family in the start document's 'families' (-1: reference point)"),
        "delta": ("A", (), "step applied to every in-service magnet of that family")}, dtypes={"family": "integer"})
    info.update(family=-1, delta=0.0)
    r0 = yield from read_tunes(machine, n_avg, extra=[info], where="at the reference point")
    plus, minus = np.full((2, len(fams)), np.nan), np.full((2, len(fams)), np.nan)
    for j, n in enumerate(fams):
        fam = machine.families[n]
        for sgn, store in ((1, plus), (-1, minus)) if bipolar else ((1, plus),):
            info.update(family=j, delta=sgn * d[j])
            yield from bps.mv(fam, base[n] + sgn * d[j] * fam.good)
            r = yield from read_tunes(machine, n_avg, extra=[info], where=f"while {n} was stepped by "
                                                                          f"{sgn * d[j]:+.4g} A")
            store[:, j] = r.mean
        yield from bps.mv(fam, base[n])
    mhw = (plus - minus) / (2 * d) if bipolar else (plus - r0.mean[:, None]) / d
    resp = TuneResponse(families=fams, matrix_hw=mhw, matrix=mhw / _slopes(machine, fams, base), reference=r0.mean,
                        delta=d, kind="measured", physics_units=units)
    res = resp.to_results() | {"Q_plus": plus, "Q_reference_std": r0.std} | ({"Q_minus": minus} if bipolar else {})
    pu = "/".join(sorted(set(units))) or "physics unit"
    return _result(res, _TUNE_RESPONSE_KEYS, value=resp, dQ_dK=(f"1/({pu})", _TUNE_RESPONSE_KEYS["dQ_dK"][1]))


def _line(m: int, n: int) -> str:
    return " + ".join(t for t in (f"{m} qx" if m else "", f"{n} qy" if n else "") if t).replace("+ -", "- ")


def _check_resonances(machine: Machine, target: np.ndarray, present: np.ndarray, margin: float) -> None:
    """Refuse a target that moves the working point towards a resonance line and ends too close to it (profile
    ``tools.tune_correction.resonance_order``, default 3, and ``resonance_distance`` [tune units], default 0.01):
    stepping quadrupoles there loses the beam. A line the present tunes are already that close to (a machine's own
    working point) only refuses a target that is closer to it than the present tunes by more than ``margin`` (the
    tune reading's resolution): small moves along or away from the line are allowed."""
    d = machine.profile.tool_defaults("tune_correction")
    order, dist = int(d.get("resonance_order", 3)), float(d.get("resonance_distance", 0.01))
    ok = np.all(np.isfinite(present))
    for gap, (m, n, p) in resonance_gaps(float(target[0]), float(target[1]), order):
        if gap >= dist:
            continue
        now = resonance_distance(float(present[0]), float(present[1]), (m, n, p)) if ok else float("inf")
        if gap >= now - margin:  # not moving towards the line (within the reading's resolution)
            continue
        here = (f"the present tunes ({present[0]:.4f}, {present[1]:.4f}) are {now:.4f} from it, the target moves "
                "towards it" if ok else "the present tunes could not be read")
        raise ValueError(
            f"correct_tune: target ({target[0]:g}, {target[1]:g}) is {gap:.4f} from the resonance "
            f"{_line(m, n)} = {p} (order {abs(m) + abs(n)}); {here}. A target within {dist:g} of a resonance "
            f"of order <= {order} is refused if it is closer to the line than the present tunes (by more than "
            f"{margin:.1e}) (profile tools.tune_correction.resonance_distance / resonance_order). Choose a "
            "target farther from the line. Nothing was moved.")


def _present_tunes(machine: Machine, n_avg: int) -> MsgGenerator[np.ndarray]:
    """The tunes now (mean of ``n_avg`` readings), read outside any run (nothing recorded)."""
    q = []
    for _ in range(n_avg):
        qx = yield from bps.rd(machine.tune.x)
        qy = yield from bps.rd(machine.tune.y)
        q.append((np.nan if qx is None else float(qx), np.nan if qy is None else float(qy)))
    return np.mean(np.asarray(q, dtype=float), axis=0)


def _response_advice(kind: str, tool: str) -> str:
    if kind == "model":
        return f"use a measured response (response=None or a {tool} run): the model's may differ from the machine's"
    return "measure the response again at the new working point (response=None)"


def _not_converged(what: str, iterations: int, left: np.ndarray, tol: float, units: str, advice: str) -> None:
    warnings.warn(f"{what}: not converged after {iterations} correction(s) (max_iter={iterations}): still "
                  f"({left[0]:+.3g}, {left[1]:+.3g}){units} from the target, tol {tol:g}. {advice}",
                  RuntimeWarning, stacklevel=3)


@thread_safe_figure
def _tune_figure(result: ToolResult, path: Path) -> None:
    v = result.value
    qh = np.asarray(v["q_history"])
    tune_diagram(qh[-1, 0], qh[-1, 1], path, history=qh[:-1], order=4, target=v["target"],
                 title=f"tune correction with {', '.join(v['families'])}")


@tool("tune_correction", restore=_family_restore("quadrupole", rf=False), keep=True, ring_only=_RING_ONLY_TUNE,
      figures={"tune_diagram": _tune_figure}, family_kind="quadrupole")
def correct_tune(machine: Machine, target: tuple[float, float], families: Sequence[str] | None = None,
                 response: Any = None, max_iter: int = 3, tol: float = 1e-4, n_avg: int = 1,
                 figure_dir: str | Path | bool | None = None, md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Move the fractional tunes to ``target`` with two (or more) quadrupole families (MML ``settune``).

    Iterates: read the tunes, solve ``response @ dI = target - q`` (SVD, least norm), check the limits, apply;
    stops when both planes are within ``tol`` or after ``max_iter`` corrections.

    Args:
        machine: the connected machine.
        target: fractional tunes (qx, qy), each in (0, 1).
        families: quadrupole families to use (default: the best-conditioned pair of the response, by SVD; with
            ``response=None`` the pair is chosen from the model, among the families that can be measured within
            their limits).
        response: ``None`` (measure it now, as its own ``tune_response`` run of only the families used),
            ``"model"`` (pyAT, design lattice at the present setpoints), a
            :class:`~acc_bluesky.analysis.TuneResponse`, or a run of ``measure_tune_response``.
        max_iter: maximum number of corrections.
        tol: convergence threshold on each plane [tune units].
        n_avg: tune readings averaged per measurement.
        figure_dir: folder of the tune-diagram PNG (``False``: none).
        md: metadata merged into the run's start document.

    Stores ``q_history`` (k x 2), ``steps_hw`` (iterations x families, A), ``delta_hw`` (total A per family),
    ``delta_physics`` (m^-2), ``q_before``, ``q_after``, ``converged``. Tool ``tune_correction``. On abort, stop or
    failure the families are put back as they were.

    A target within ``tools.tune_correction.resonance_distance`` (default 0.01) of a resonance line of order <=
    ``resonance_order`` (default 3) is refused before anything moves if it is closer to that line than the present
    tunes (read first); moves along or away from a line the working point already sits near are allowed. Ending
    ``max_iter`` corrections unconverged warns with the distance left.
    """
    tgt = _pair(target, "target")
    if np.any((tgt <= 0) | (tgt >= 1)):
        raise ValueError(f"target must be fractional tunes in (0, 1), got {tuple(tgt)}; e.g. for Q = 76.21 give 0.21")
    _check_iter(max_iter, tol, "tune units")
    n_avg = _check_n_avg(n_avg)
    if families is not None:
        families = resolve_families(machine, families, "quadrupole")
        if len(families) < 2:
            raise ValueError(f"correcting two tunes needs at least two families, got {families}")
    present = yield from _present_tunes(machine, n_avg)
    _check_resonances(machine, tgt, present, max(tol, 3 * _tune_noise(machine, n_avg)))

    def measure(m, fams):
        return measure_tune_response(m, fams, n_avg=n_avg)

    to_measure = families
    if response is None and families is None:
        # measure only the pair the correction will use: the best-conditioned pair of the model among the
        # families whose default step (capped to the limits) moves the tunes by more than the monitor noise
        model = yield from _response(machine, "model", TuneResponse, None, measure, model_tune_response)
        base = yield from family_setpoints(machine, model.families)
        _, _, dq, _ = _tune_step_plan(machine, model.families, base, True, model)
        usable = [n for j, n in enumerate(model.families) if dq[j] >= max(_tune_noise(machine, n_avg), 1e-300)]
        if len(usable) < 2:
            raise ValueError(f"correct_tune: fewer than two quadrupole families ({usable}) can be stepped within "
                             "their limits enough to measure their tune response; give 'families' and 'response' "
                             "(e.g. response='model'), or check the setpoints and the profile's limits. Nothing "
                             "was moved.")
        to_measure = list(model.best_pair(allowed=usable))
    resp = yield from _response(machine, response, TuneResponse, to_measure, measure, model_tune_response)
    fams = list(families) if families is not None else list(resp.best_pair())
    sub = resp.select(fams)
    snap = yield from family_setpoints(machine, fams)
    max_dq = float(machine.profile.tool_defaults("tune_correction").get("max_dq", 0.02))
    yield from open_tool_run(families=fams, physics_units=_physics_units(machine, fams), response_kind=resp.kind,
                             response_uid=resp.uid, max_dq=max_dq)
    info = Record("correction", {"iteration": ("", (), "correction iteration (0: before any correction)")},
                  dtypes={"iteration": "integer"})
    current = {n: snap[n].copy() for n in fams}
    q_hist, s_hist, steps = [], [], []
    converged = False
    for it in range(int(max_iter) + 1):
        info.update(iteration=it)
        r = yield from read_tunes(machine, n_avg, extra=[info],
                                  where=f"while reading the tunes in iteration {it} of the tune correction")
        q_hist.append(r.mean)
        s_hist.append(r.std)
        dq = tgt - r.mean
        if np.all(np.abs(dq) <= tol):
            converged = True
            break
        if it == max_iter:
            break
        step = sub.step(np.clip(dq, -max_dq, max_dq))  # at most max_dq per iteration and plane
        new = {n: current[n] + step[j] * machine.families[n].good for j, n in enumerate(fams)}
        for n in fams:
            check_limits(machine.families[n], new[n], f"correct_tune iteration {it + 1} (dq = {dq[0]:+.2e}, "
                                                      f"{dq[1]:+.2e})")
        yield from move_families(machine, new)
        current = new
        steps.append(step)
        yield from bps.trigger_and_read([machine.families[n].setpoints for n in fams] + [info], name="corrections")
    if not converged:
        left = tgt - q_hist[-1]
        need = int(np.ceil(np.max(np.abs(tgt - q_hist[0])) / max_dq))
        _not_converged("correct_tune", len(steps), left, tol, "", (
            f"Each iteration moves the tunes by at most max_dq = {max_dq:g} per plane (profile "
            f"tools.tune_correction.max_dq), so this change needs at least {need} iterations: give a larger "
            f"max_iter, split the change into smaller steps (intermediate targets), or "
            f"{_response_advice(resp.kind, 'measure_tune_response')}."))
    steps_a = np.asarray(steps, dtype=float).reshape(-1, len(fams))
    total = steps_a.sum(axis=0)
    qh = np.asarray(q_hist)
    res = {"q_history": qh, "q_std_history": np.asarray(s_hist), "steps_hw": steps_a, "delta_hw": total,
           "delta_physics": total * _slopes(machine, fams, snap), "q_before": qh[0], "q_after": qh[-1],
           "target": tgt, "converged": int(converged), "iterations": len(steps), "response_hw": sub.matrix_hw}
    pu = "/".join(sorted(set(_physics_units(machine, fams))))
    return _result(res, _TUNE_CORRECTION_KEYS, value={**res, "families": fams},
                   delta_physics=(pu, "total change per family in physics units"))


# ----------------------------------------------------------------------------------------------------
# chromaticity
_ALPHA_CACHE: dict[tuple, np.ndarray] = {}


def _alphas(machine: Machine, setpoints: dict[str, np.ndarray], dp_max: float) -> np.ndarray:
    key = (machine.profile.sha256, float(dp_max),
           tuple((n, np.asarray(v, dtype=float).tobytes()) for n, v in sorted(setpoints.items())))
    hit = _ALPHA_CACHE.get(key)
    if hit is None:
        if len(_ALPHA_CACHE) > 32:
            _ALPHA_CACHE.clear()
        try:
            hit = np.asarray(model_momentum_compaction(machine.profile, setpoints, dp_range=dp_max), dtype=float)
            ok = hit.size > 0 and bool(np.all(np.isfinite(hit)))
        except Exception:  # noqa: BLE001 - pyAT on an unstable model lattice
            ok = False
        if not ok:  # as for the responses: the design optics when the model at the setpoints has none
            warnings.warn("the design lattice at the present setpoints has no momentum compaction (linearly "
                          "unstable: the setpoints compensate errors the model does not have); the design "
                          "optics' is used for the RF scan", RuntimeWarning, stacklevel=2)
            hit = np.asarray(model_momentum_compaction(machine.profile, None, dp_range=dp_max), dtype=float)
        _ALPHA_CACHE[key] = hit
    return hit.copy()


def _chrom_settings(machine: Machine, dp_max: float | None, steps: int | None, order: int | None
                    ) -> tuple[float, int, int]:
    d = machine.profile.tool_defaults("chromaticity")
    dp_max = float(d.get("dp_max", 2e-3)) if dp_max is None else float(dp_max)
    steps = int(d.get("steps", 5)) if steps is None else steps
    order = int(d.get("order", 2)) if order is None else order
    scan_points(dp_max, steps)  # validates
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 (polynomial fit of Q(dp)), got {order!r}")
    if steps < order + 2:
        raise ValueError(f"a fit of order {order} needs steps >= {order + 2} points, got {steps}")
    return dp_max, steps, order


def _rf_plan(machine: Machine, dp_max: float, steps: int, what: str) -> MsgGenerator[tuple[float, np.ndarray,
                                                                                            np.ndarray, np.ndarray]]:
    """Frequencies of a scan (from the model's momentum compaction), limits checked before anything moves."""
    f0 = float((yield from bps.rd(machine.rf.frequency)))
    alphas = _alphas(machine, (yield from _model_setpoints(machine)), dp_max)
    dps = scan_points(dp_max, steps)
    df = rf_steps_for_dp(dps, f0, alphas)
    try:
        machine.rf.frequency_limits.check("RF frequency", f0 + df, "Hz")
    except LimitError as err:
        raise LimitError(f"{what}: the scan dp/p = +-{dp_max:g} needs RF steps up to {np.max(np.abs(df)):.1f} Hz "
                         f"from {f0:.1f} Hz: {err}") from None
    return f0, alphas, dps, df


def _scan(machine: Machine, f0: float, alphas: np.ndarray, df: np.ndarray, order: int, n_avg: int,
          info: Record, settle: float, where: str, **fixed: float) -> MsgGenerator[Chromaticity]:
    """Emit the RF scan's events in the open run and fit; the RF is back at ``f0`` at the end."""
    f_read, qx, qy, point = [], [], [], []
    kf = machine.rf.frequency.name
    for i, d in enumerate(df):
        dp = float(dp_from_rf_steps(float(d), f0, alphas))
        info.update(point=i, df=float(d), dp=dp, **fixed)
        yield from bps.mv(machine.rf, f0 + float(d))
        if settle > 0:
            yield from bps.sleep(settle)
        r = yield from read_tunes(machine, n_avg, extra=[machine.rf, info],
                                  where=f"{where}, at scan point {i + 1}/{len(df)} (RF {d:+.1f} Hz, dp/p {dp:+.2e})")
        for k in range(n_avg):
            f_read.append(float(r.readings[k][kf]["value"]))
            qx.append(r.samples[k, 0])
            qy.append(r.samples[k, 1])
            point.append(i)
    yield from bps.mv(machine.rf, f0)
    return Chromaticity.from_scan(np.asarray(f_read) - f0, qx, qy, f0, alphas, order, point=point)


def _scan_info(extra: dict[str, tuple[str, tuple[int, ...], str]] | None = None,
               integers: Sequence[str] = ()) -> Record:
    fields = {"point": ("", (), "index of the scan point"),
              "df": ("Hz", (), "RF frequency step from the starting frequency"),
              "dp": ("", (), "momentum deviation dp/p of the point (model momentum compaction)")}
    return Record("scan", fields | (extra or {}), dtypes={k: "integer" for k in ("point", *integers)})


@thread_safe_figure
def _chrom_figure(result: Any, path: Path) -> None:
    chrom, title = (result.value["chrom"], result.value["title"]) if isinstance(result, ToolResult) else (
        result, "chromaticity: RF scan")
    chromaticity_fit_plot(chrom.dp, chrom.qx, chrom.qy, chrom.coeffs, path, xi=chrom.xi, xi_std=chrom.xi_std,
                          qx_std=chrom.qx_std, qy_std=chrom.qy_std, title=title)


@tool("chromaticity", restore=Restore((), rf=True), ring_only=_RING_ONLY_CHROM, figures={"fit": _chrom_figure},
      units={k: u for k, (u, _) in _CHROM_KEYS.items()}, descriptions={k: d for k, (_, d) in _CHROM_KEYS.items()})
def measure_chromaticity(machine: Machine, dp_max: float | None = None, steps: int | None = None,
                         order: int | None = None, n_avg: int = 1, settle: float = 0.0,
                         figure_dir: str | Path | bool | None = None, md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Measure the chromaticity by an RF frequency scan (MML ``measchro``).

    The tool chooses the RF steps: for each momentum deviation ``dp`` of the scan it sets the RF frequency that
    puts the beam there, from the model's momentum compaction (``df ~ -alpha_c f_rf dp``; pyAT ``get_mcf`` on the
    design lattice at the present setpoints, with its second-order term). There is no 4D/6D choice to make. The
    tunes are fitted with a polynomial in ``dp``; the chromaticity is its slope at ``dp = 0`` (the starting RF
    frequency, which is restored at the end).

    Args:
        machine: the connected machine.
        dp_max: largest |dp/p| of the scan (default: profile ``tools.chromaticity.dp_max``, else 2e-3).
        steps: number of scan points, odd >= 3 (default: profile ``tools.chromaticity.steps``, else 5).
        order: polynomial order of the fit, 1, 2 or 3 (default: profile ``tools.chromaticity.order``, else 2).
        n_avg: tune readings per point.
        settle: wait after each RF step [s].
        figure_dir: folder of the fit PNG (``False``: none).
        md: metadata merged into the run's start document.

    Stores ``xi``, ``xi_std``, the scan (``dp``, ``df`` [Hz], ``qx``, ``qy`` per point), the fit coefficients,
    ``f_rf`` [Hz] and the momentum-compaction polynomial ``alphas``. Read back with
    ``Chromaticity.from_run(cat[uid])``. Tool ``chromaticity``.
    """
    dp_max, steps, order = _chrom_settings(machine, dp_max, steps, order)
    n_avg = _check_n_avg(n_avg)
    f0, alphas, dps, df = yield from _rf_plan(machine, dp_max, steps, "measure_chromaticity")
    yield from open_tool_run(alpha_c=float(alphas[0]), rf_frequency=f0)
    return (yield from _scan(machine, f0, alphas, df, order, n_avg, _scan_info(), settle,
                             "during the chromaticity scan"))


def _default_chrom_steps(machine: Machine, families: list[str], setpoints: dict[str, np.ndarray],
                         base: dict[str, np.ndarray], bipolar: bool) -> np.ndarray:
    """Steps [A] that move the chromaticities by about CHROMATICITY_RESPONSE_DXI, from the model, capped to the
    headroom of each family's magnets to their limits (a warning names the capped families and the expected
    change)."""
    model = model_chromaticity_response(machine.profile, families, setpoints=setpoints)
    aim, step, dxi, _ = _capped_steps(machine, families, base, bipolar, model, CHROMATICITY_RESPONSE_DXI, 1.0)
    capped = [f"{n}: {a:.4g} A -> {s:.4g} A (expected dxi {z:.2g})"
              for n, a, s, z in zip(families, aim, step, dxi) if s < a]
    if capped:
        warnings.warn(f"measure_chromaticity_response: the default step of {len(capped)} family(ies) was capped to "
                      f"the room left to their limits: {'; '.join(capped)}. Give 'delta' to choose it.", stacklevel=3)
    return step


@tool("chromaticity_response", restore=_family_restore("sextupole", rf=True), ring_only=_RING_ONLY_CHROM,
      family_kind="sextupole", figures={"response": _response_figure("chromaticity")})
def measure_chromaticity_response(machine: Machine, families: Sequence[str] | str | None = None,
                                  delta: float | Sequence[float] | dict[str, float] | None = None,
                                  bipolar: bool = True, dp_max: float | None = None, steps: int | None = None,
                                  order: int | None = None, n_avg: int = 1,
                                  figure_dir: str | Path | bool | None = None,
                                  md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Measure the chromaticity response dxi/dI of sextupole families (MML ``measchroresp``).

    A reference RF scan, then for each family a scan with the family at ``+delta`` (and ``-delta``); the family and
    the RF frequency are put back after each step.

    Args:
        machine: the connected machine.
        families: sextupole family names (default: every sextupole family).
        delta: half step [A] (one, one per family, or ``{family: A}``); default sized from the model for a
            chromaticity change of about 1.
        bipolar: step both ways (central difference) or only ``+delta``.
        dp_max, steps, order: the RF scan of each point, as in :func:`measure_chromaticity`.
        n_avg: tune readings per scan point.
        figure_dir: folder of the figure ``response`` (bars per family, per A); ``False``: none.
        md: metadata merged into the run's start document.

    Stores ``dxi_dI`` (2 x n, per A), ``dxi_dK`` (2 x n, per m^-3), ``xi_reference``, ``delta``. Read back with
    ``ChromaticityResponse.from_run(cat[uid])``. Tool ``chromaticity_response``.
    """
    fams = resolve_families(machine, families, "sextupole")
    dp_max, steps, order = _chrom_settings(machine, dp_max, steps, order)
    n_avg = _check_n_avg(n_avg)
    base = yield from family_setpoints(machine, fams)
    default = _default_chrom_steps(machine, fams, (yield from _model_setpoints(machine)), base, bipolar) \
        if _needs_default(delta, fams) else np.zeros(len(fams))
    d = _steps(delta, fams, default, "measure_chromaticity_response")
    _check_steps(machine, fams, base, d, bipolar, "measure_chromaticity_response")
    f0, alphas, dps, df = yield from _rf_plan(machine, dp_max, steps, "measure_chromaticity_response")
    units = _physics_units(machine, fams)
    yield from open_tool_run(families=fams, physics_units=units, response_kind="measured", alpha_c=float(alphas[0]),
                             rf_frequency=f0, delta_hw=[float(x) for x in d])
    info = _scan_info({
        "family": ("", (), "index of the stepped family in the start document's 'families' (-1: reference)"),
        "delta": ("A", (), "step applied to every in-service magnet of that family")}, integers=("family",))
    ref = yield from _scan(machine, f0, alphas, df, order, n_avg, info, 0.0, "during the reference chromaticity scan",
                           family=-1, delta=0.0)
    plus, minus = np.full((2, len(fams)), np.nan), np.full((2, len(fams)), np.nan)
    for j, n in enumerate(fams):
        fam = machine.families[n]
        for sgn, store in ((1, plus), (-1, minus)) if bipolar else ((1, plus),):
            yield from bps.mv(fam, base[n] + sgn * d[j] * fam.good)
            c = yield from _scan(machine, f0, alphas, df, order, n_avg, info, 0.0,
                                 f"while {n} was stepped by {sgn * d[j]:+.4g} A", family=j, delta=sgn * d[j])
            store[:, j] = c.xi
        yield from bps.mv(fam, base[n])
    mhw = (plus - minus) / (2 * d) if bipolar else (plus - ref.xi[:, None]) / d
    resp = ChromaticityResponse(families=fams, matrix_hw=mhw, matrix=mhw / _slopes(machine, fams, base),
                                reference=ref.xi, delta=d, kind="measured", physics_units=units)
    res = resp.to_results() | {"xi_plus": plus} | ({"xi_minus": minus} if bipolar else {})
    pu = "/".join(sorted(set(units))) or "physics unit"
    return _result(res, _CHROM_RESPONSE_KEYS, value=resp, dxi_dK=(f"1/({pu})", _CHROM_RESPONSE_KEYS["dxi_dK"][1]))


@tool("chromaticity_correction", restore=_family_restore("sextupole", rf=True), keep=True,
      ring_only=_RING_ONLY_CHROM, figures={"fit": _chrom_figure}, family_kind="sextupole")
def correct_chromaticity(machine: Machine, target: tuple[float, float], families: Sequence[str] | None = None,
                         response: Any = "model", max_iter: int = 3, tol: float = 0.1,
                         dp_max: float | None = None, steps: int | None = None, order: int | None = None,
                         n_avg: int = 1, figure_dir: str | Path | bool | None = None,
                         md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Move the chromaticities to ``target`` with two (or more) sextupole families (MML ``setchro``).

    Iterates: measure the chromaticity (RF scan, as :func:`measure_chromaticity`), solve
    ``response @ dI = target - xi`` (SVD, least norm), check the limits, apply; stops when both planes are within
    ``tol`` or after ``max_iter`` corrections.

    Args:
        machine: the connected machine.
        target: chromaticities (xi_x, xi_y) = dQ/d(dp/p).
        families: sextupole families to use (default: the best-conditioned pair of the response, by SVD).
        response: ``"model"`` (pyAT ``get_chrom`` on the design lattice at the present setpoints), ``None``
            (measure it now as its own ``chromaticity_response`` run), a
            :class:`~acc_bluesky.analysis.ChromaticityResponse`, or a run of ``measure_chromaticity_response``.
        max_iter: maximum number of corrections.
        tol: convergence threshold on each plane.
        dp_max, steps, order: the RF scans, as in :func:`measure_chromaticity`.
        n_avg: tune readings per scan point.
        figure_dir: folder of the PNG of the last scan's fit (``False``: none).
        md: metadata merged into the run's start document.

    Stores ``xi_history`` (k x 2), ``xi_std_history``, ``steps_hw`` (iterations x families, A), ``delta_hw``,
    ``delta_physics`` (m^-3), ``xi_before``, ``xi_after``, ``converged``. Tool ``chromaticity_correction``.
    On abort, stop or failure the families and the RF frequency are put back as they were. Ending ``max_iter``
    corrections unconverged warns with the distance left.
    """
    tgt = _pair(target, "target")
    _check_iter(max_iter, tol, "chromaticity units")
    dp_max, steps, order = _chrom_settings(machine, dp_max, steps, order)
    n_avg = _check_n_avg(n_avg)
    if families is not None:
        families = resolve_families(machine, families, "sextupole")
        if len(families) < 2:
            raise ValueError(f"correcting two chromaticities needs at least two families, got {families}")

    def measure(m, fams):
        return measure_chromaticity_response(m, fams, dp_max=dp_max, steps=steps, order=order, n_avg=n_avg)

    resp = yield from _response(machine, response, ChromaticityResponse, families, measure,
                                model_chromaticity_response)
    fams = list(families) if families is not None else list(resp.best_pair())
    sub = resp.select(fams)
    snap = yield from family_setpoints(machine, fams)
    f0, alphas, dps, df = yield from _rf_plan(machine, dp_max, steps, "correct_chromaticity")
    yield from open_tool_run(families=fams, physics_units=_physics_units(machine, fams), response_kind=resp.kind,
                             response_uid=resp.uid, alpha_c=float(alphas[0]), rf_frequency=f0)
    info = _scan_info({"iteration": ("", (), "correction iteration (0: before any correction)")},
                      integers=("iteration",))
    current = {n: snap[n].copy() for n in fams}
    x_hist, s_hist, steps_l = [], [], []
    converged, chrom = False, None
    for it in range(int(max_iter) + 1):
        chrom = yield from _scan(machine, f0, alphas, df, order, n_avg, info, 0.0,
                                 f"during the chromaticity scan of iteration {it}", iteration=it)
        x_hist.append(chrom.xi)
        s_hist.append(chrom.xi_std)
        dxi = tgt - chrom.xi
        if np.all(np.abs(dxi) <= tol):
            converged = True
            break
        if it == max_iter:
            break
        step = sub.step(dxi)
        new = {n: current[n] + step[j] * machine.families[n].good for j, n in enumerate(fams)}
        for n in fams:
            check_limits(machine.families[n], new[n],
                         f"correct_chromaticity iteration {it + 1} (dxi = {dxi[0]:+.2f}, {dxi[1]:+.2f})")
        yield from move_families(machine, new)
        current = new
        steps_l.append(step)
        info.update(point=-1, df=0.0, dp=0.0, iteration=it + 1)
        yield from bps.trigger_and_read([machine.families[n].setpoints for n in fams] + [info], name="corrections")
    if not converged:
        _not_converged("correct_chromaticity", len(steps_l), tgt - x_hist[-1], tol, "", (
            "Give a larger max_iter, move in smaller steps (intermediate targets), or "
            f"{_response_advice(resp.kind, 'measure_chromaticity_response')}; a larger dp_max or n_avg makes each "
            "measurement less noisy."))
    steps_a = np.asarray(steps_l, dtype=float).reshape(-1, len(fams))
    total = steps_a.sum(axis=0)
    xh = np.asarray(x_hist)
    res = {"xi_history": xh, "xi_std_history": np.asarray(s_hist), "steps_hw": steps_a, "delta_hw": total,
           "delta_physics": total * _slopes(machine, fams, snap), "xi_before": xh[0], "xi_after": xh[-1],
           "target": tgt, "converged": int(converged), "iterations": len(steps_l), "response_hw": sub.matrix_hw}
    pu = "/".join(sorted(set(_physics_units(machine, fams))))
    title = f"after chromaticity correction with {', '.join(fams)} (target {tgt[0]:g}, {tgt[1]:g})"
    return _result(res, _CHROM_CORRECTION_KEYS, value={"chrom": chrom, "title": title, **res},
                   delta_physics=(pu, "total change per family in physics units"))
