"""First turns as Bluesky plans: ``measure_trajectory_response``, ``correct_trajectory``,
``thread_first_turns`` (pySC's first_turn / stitch / balance with injection steering, MML's trajectory tools) and
``ramp_sextupoles`` (pySC's sextupole ramp after threading: down until the beam has a closed orbit, then back up in
steps with the orbit corrected at each).

Each is a :func:`~acc_bluesky.plan_stubs.tool.tool` that needs no stored beam (a ring with no closed orbit yet, a
transfer line): the BPMs acquire in ``trajectory`` mode, the injection fires one shot per reading, and the
correctors move by real plan moves (one per family and step). Whatever they moved is put back when they are
aborted, stopped or fail: correctors, injection trims and the BPM acquisition mode. ``correct_trajectory`` and
``thread_first_turns`` keep their result when they complete; the BPM mode is always put back.

On a transfer line the trajectory tools work the same with one pass (``turns=1``); threading needs a ring.
Units: positions [m], correctors [A] (kicks [rad]), injection trims m / rad.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis._common import rms
from ..analysis.correction import INJECTION_KNOB_LIMITS, limit_step
from ..analysis.trajectory import (
    ThreadingResult,
    TrajectoryReading,
    TrajectoryResponse,
    model_trajectory_response,
    reached,
    response_steps,
    trajectory_noise,
    trajectory_step,
)
from ..analysis.trajectory import thread_first_turns as _threading
from ..machine import Machine
from ..plan_stubs.machine import BeamLostError, Record, check_limits, emit, move, read_orbit, snapshot_setpoints
from ..plan_stubs.optics import family_setpoints, resolve_families
from ..plan_stubs.orbit import step_sizes
from ..plan_stubs.runs import resolve
from ..plan_stubs.tool import Restore, ToolResult, open_tool_run, thread_safe_figure, tool
from ..plan_stubs.trajectory import (
    CorrectorVector,
    beam_settings,
    need_beam_devices,
    read_shots,
    restore_beam_settings,
    set_acquisition,
)
from .orbit import _Correction, _correction_record, _correction_system, _iterate, _orm_of

__all__ = ["correct_trajectory", "design_sextupoles", "measure_trajectory_response", "ramp_sextupoles",
           "thread_first_turns"]

#: stage codes of the threading events (``stage`` field)
STAGES = {"first_turn": 0, "wiggle": 1, "stitch": 2, "balance": 3}


def _corrector_names(machine: Machine, correctors: Any) -> list[str] | None:
    if correctors is None:
        return None
    if isinstance(correctors, str):
        return [correctors]
    return [c if isinstance(c, str) else c.name for c in correctors]


def _corrector_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    cv = CorrectorVector(machine, _corrector_names(machine, args.get("correctors")))
    return Restore(tuple(cv.families))


def _all_correctors(machine: Machine, args: dict[str, Any]) -> Restore:
    return Restore(tuple(sorted([*machine.hcors, *machine.vcors])))


def _vector(x: np.ndarray, y: np.ndarray, turns: int) -> np.ndarray:
    """(n, T) readings -> the response's row order ``[x turn 0 .. T-1, y turn 0 .. T-1]``."""
    return np.concatenate([np.asarray(x)[:, :turns].T.reshape(-1), np.asarray(y)[:, :turns].T.reshape(-1)])


def _check_turns(machine: Machine, turns: int, tool_name: str) -> None:
    if machine.profile.kind != "ring" and turns != 1:
        raise ValueError(f"{tool_name}: {machine.profile.name} is a transfer line: one pass (turns=1), got {turns}")


def _response_of(machine: Machine, response: Any, turns: int, names: list[str] | None
                 ) -> MsgGenerator[TrajectoryResponse]:
    if response is None or (isinstance(response, str) and response == "model"):
        return model_trajectory_response(machine, names, turns=turns)
    resp = yield from resolve(response, TrajectoryResponse, ("trajectory_response",), "trajectory response")
    if resp.turns < turns:
        raise ValueError(f"the trajectory response has {resp.turns} turn(s): {turns} are needed (measure it with "
                         f"turns={turns}, or response='model')")
    return resp.truncated(turns) if resp.turns > turns else resp


def _steering_setup(machine: Machine, response: Any, turns: int
                    ) -> MsgGenerator[tuple[TrajectoryResponse, CorrectorVector, np.ndarray, dict[str, Any]]]:
    """What the steering plans start from: the response, its correctors, their setpoints [A], the beam settings."""
    resp = yield from _response_of(machine, response, turns, None)
    cv = CorrectorVector(machine, resp.corrector_names)
    sp0 = yield from cv.read()
    snap = yield from beam_settings(machine)
    return resp, cv, sp0, snap


def _open_steering_run(machine: Machine, resp: TrajectoryResponse, turns: int, num_points: int
                       ) -> MsgGenerator[None]:
    """BPMs in trajectory mode for ``turns`` turns, then the steering plan's run."""
    yield from set_acquisition(machine, "trajectory", turns)
    yield from open_tool_run(bpm_names=machine.bpm.names, corrector_names=resp.corrector_names,
                             trm_uid=resp.uid or resp.kind, turns=turns, num_points=num_points)


def _restoring(machine: Machine, body, snap: dict[str, Any], state: dict[str, Any], keep: bool
               ) -> MsgGenerator[Any]:
    """Run ``body`` and put back the BPM mode always, the injection trims unless ``keep`` and it completed."""
    def cleanup() -> MsgGenerator[None]:
        yield from restore_beam_settings(machine, snap, injection=not (keep and state.get("done")), kick=False)

    return (yield from bpp.finalize_wrapper(body, cleanup()))


def _set_injection(machine: Machine, trims: np.ndarray) -> MsgGenerator[None]:
    sigs = machine.injection.knobs()[:4]
    pairs: list[Any] = []
    for s, v in zip(sigs, np.asarray(trims, dtype=float)):
        pairs += [s, float(v)]
    yield from move(*pairs)


# ======================================================================================================
# measure_trajectory_response
@thread_safe_figure
def _trm_figure(result: TrajectoryResponse, path: Path) -> None:
    result.plot(path, hw=True)


@tool("trajectory_response", restore=_corrector_restore, needs_beam=False, figures={"trm": _trm_figure})
def measure_trajectory_response(machine: Machine, correctors: Any = None, turns: int = 1,
                                delta: float | None = None, delta_physics: float | None = None,
                                injection: bool = True, injection_delta: Sequence[float] | None = None,
                                n_avg: int = 1, model: bool = False, figure_dir: str | Path | bool | None = None,
                                md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Measure the response of the first ``turns`` turns of the injected beam to the correctors and the injection.

    Each corrector in turn is stepped by ``+delta`` and ``-delta``, one injected shot (``n_avg`` averaged) is read
    by the BPMs in ``trajectory`` mode at each step, and the corrector is put back; then the four injection trims
    (x, px, y, py) likewise. BPMs the beam does not reach give NaN rows. With ``model=True`` nothing moves: the
    run records pyAT's analytical trajectory response of the design lattice (``TrajectoryResponseMatrix``).

    Args:
        machine: the connected machine (a ring, or a transfer line with ``turns=1``).
        correctors: corrector device or family names (default: every in-service corrector, h then v).
        turns: turns of the response (1 for a line).
        delta: half step [A]. Default (with ``delta_physics``): per corrector, the step that measures its column to
            5 % rms through the shot noise (the injected beam's jitter carried by the model, the BPMs' turn-by-turn
            noise: :func:`~acc_bluesky.analysis.trajectory.response_steps`), at least the profile's
            ``tools.orbit_response`` step (else 10 urad), at most what moves the trajectory 2 mm at a BPM of a
            line (0.5 mm in a ring, whose sextupoles make larger steps nonlinear) or the corrector's limits; a
            warning names the columns left noisier than 10 %.
        delta_physics: half step [rad] instead of ``delta``.
        injection: also measure the columns of the injection trims.
        injection_delta: half steps of the injection trims (x [m], px [rad], y [m], py [rad]); default sized as
            the correctors' (at least 10 um, 1 urad, 10 um, 1 urad).
        n_avg: shots averaged per step.
        model: record the model response instead of measuring.
        figure_dir: folder of the figure (``trm``); ``False``: none.
        md: metadata merged into the run's start document.

    Returns:
        the run uid; ``TrajectoryResponse.from_run(cat[uid])`` gives ``matrix`` [m/rad], ``matrix_hw`` [m/A] and
        ``injection``, rows ``[x turn 0.., y turn 0..]``.
    """
    _check_turns(machine, turns, "measure_trajectory_response")
    names = _corrector_names(machine, correctors)
    base = model_trajectory_response(machine, names, turns=turns)
    if model:
        yield from open_tool_run(**base.start_metadata(), num_points=0)
        return base
    need_beam_devices(machine, "measure_trajectory_response")
    cv = CorrectorVector(machine, base.corrector_names)
    devs = [machine.device(c) for c in cv.names]
    sp0 = yield from cv.read()
    d_hw, d_ph = step_sizes(machine, devs, sp0, delta, delta_physics)
    excursion = 2e-3 if machine.profile.kind != "ring" else 0.5e-3  # (a ring's sextupoles: keep the steps linear)
    sized_c, sized_i, err_c, _ = response_steps(base, trajectory_noise(machine.profile, base), n_avg,
                                                    floor=float(np.min(np.abs(d_ph))) if len(d_ph) else 1e-5,
                                                    max_excursion=excursion)
    if delta is None and delta_physics is None:  # sized to the noise, per corrector
        for j, d in enumerate(devs):
            k0 = float(d.to_physics(sp0[j]))
            step = max(float(sized_c[j]), abs(float(d_ph[j])))
            d_hw[j] = float(d.to_hw(k0 + step)) - sp0[j]
            room = min(d.limits.high - sp0[j], sp0[j] - d.limits.low)  # both signs are stepped
            least = abs(float(d.to_hw(k0 + d_ph[j])) - sp0[j])  # the default step
            if abs(d_hw[j]) > max(room, least):
                d_hw[j] = float(np.sign(d_hw[j]) * max(room, least))
                err_c[j] *= step / abs(float(d.to_physics(sp0[j] + d_hw[j])) - k0)
            d_ph[j] = float(d.to_physics(sp0[j] + d_hw[j])) - k0
        noisy = [(n, e) for n, e in zip(cv.names, err_c) if e > 0.1]
        if noisy:
            warnings.warn(f"measure_trajectory_response: {len(noisy)} column(s) will be noisy: the step that keeps the "
                          f"trajectory within {excursion * 1e3:g} mm and the corrector within its limits measures "
                          f"them to only {max(e for _, e in noisy):.0%} ({', '.join(n for n, _ in noisy[:5])}); "
                          "raise n_avg", stacklevel=2)
    # (the sized injection steps are at least INJECTION_STEP_FLOOR)
    inj_d = sized_i if injection_delta is None else np.asarray(injection_delta, dtype=float).reshape(4)
    snap = yield from beam_settings(machine)
    n, t = len(machine.bpm), int(turns)
    rows = 2 * t * n

    def body() -> MsgGenerator[TrajectoryResponse]:
        yield from set_acquisition(machine, "trajectory", t)
        yield from open_tool_run(**{**base.start_metadata(), "trm_kind": "measured"}, delta_hw=d_hw.tolist(),
                                 num_points=len(devs) + (4 if injection else 0))
        rec = Record("trm", {
            "index": ("", (), "column: corrector index in corrector_names, then the injection trims x, px, y, py"),
            "delta": ("A | m | rad", (), "half step of this column (A for a corrector)"),
            "plus": ("m", (rows,), "trajectory [x turns; y turns] at +delta"),
            "minus": ("m", (rows,), "trajectory [x turns; y turns] at -delta"),
            "reached": ("BPM passages", (), "passages the beam made at +delta (the fewer of the two steps)")},
            hinted=("index", "reached"), dtypes={"index": "integer"})
        m_hw = np.full((rows, len(devs)), np.nan)
        inj = np.full((rows, 4), np.nan)
        for j in range(len(devs)):
            v = sp0.copy()
            traj = []
            reach = []
            for sign in (1.0, -1.0):
                v[j] = sp0[j] + sign * d_hw[j]
                yield from cv.set(v)
                x, y, _ = yield from read_shots(machine, machine.injection, n_avg)
                traj.append(_vector(x, y, t))
                reach.append(reached((x.T, y.T)))
            m_hw[:, j] = (traj[0] - traj[1]) / (2 * d_hw[j])
            rec.update(index=j, delta=d_hw[j], plus=traj[0], minus=traj[1], reached=min(reach))
            yield from emit(rec)
        yield from cv.set(sp0)
        if injection:
            trim0 = np.asarray(snap["injection"][:4], dtype=float)
            for k in range(4):
                traj = []
                for sign in (1.0, -1.0):
                    tr = trim0.copy()
                    tr[k] += sign * inj_d[k]
                    yield from _set_injection(machine, tr)
                    x, y, _ = yield from read_shots(machine, machine.injection, n_avg)
                    traj.append(_vector(x, y, t))
                inj[:, k] = (traj[0] - traj[1]) / (2 * inj_d[k])
                rec.update(index=len(devs) + k, delta=inj_d[k], plus=traj[0], minus=traj[1], reached=0)
                yield from emit(rec)
            yield from _set_injection(machine, trim0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m_rad = m_hw * (d_hw / d_ph)[None, :]
        return TrajectoryResponse(m_rad, m_hw, inj if injection else base.injection * np.nan, base.bpm_names,
                                  base.corrector_names, base.planes, t, base.bpm_refpts, base.corrector_refpts,
                                  kind="measured", metadata={"profile": machine.profile.name, "seed": machine.seed})

    return (yield from _restoring(machine, body(), snap, {}, keep=False))


# ======================================================================================================
# correct_trajectory
@thread_safe_figure
def _trajectory_figure(result: ToolResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = result.value
    fig = Figure(figsize=(10.0, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, p in zip(axes, ("x", "y")):
        ax.plot(r[f"{p}_before"] * 1e3, ".-", lw=0.7, ms=3, label=f"before ({r['reached_before']} passages)")
        ax.plot(r[f"{p}_after"] * 1e3, ".-", lw=0.7, ms=3, label=f"after ({r['reached_after']} passages)")
        ax.set_ylabel(f"{p} [mm]")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("BPM passage")
    fig.suptitle(r["title"])
    fig.tight_layout()
    fig.savefig(path)


@tool("trajectory_correction", restore=_all_correctors, keep=True, needs_beam=False,
      figures={"trajectory": _trajectory_figure})
def correct_trajectory(machine: Machine, response: Any = None, turns: int = 1, max_iter: int = 10, n_avg: int = 1,
                       injection: bool = True, tikhonov: float = 0.02, gain: float = 1.0,
                       max_step: float | None = None, tol: float | None = None, min_improvement: float = 0.02,
                       figure_dir: str | Path | bool | None = None, md: dict[str, Any] | None = None
                       ) -> MsgGenerator[str]:
    """Steer the injected beam's trajectory towards zero by SVD on the BPMs it reaches (MML / pySC trajectory
    correction), growing the window as the beam goes further.

    Each iteration injects (``n_avg`` shots averaged), finds the BPM passages the beam makes, computes the step of
    the correctors upstream of the last one reached (and of the injection trims) that flattens the trajectory there
    (:func:`~acc_bluesky.analysis.trajectory.trajectory_step`, Tikhonov-regularised SVD), makes it safe (limits,
    ``max_step``) and applies it. A step that shortens the beam's reach, or makes the trajectory worse at the same
    reach, is taken back and the correction stops. One event per iteration.

    Args:
        machine: the connected machine (a ring: the first ``turns`` turns; a transfer line: one pass).
        response: the trajectory response: ``None`` / ``"model"`` (the design lattice's), a
            :class:`TrajectoryResponse` or a run of ``measure_trajectory_response``.
        turns: turns corrected (1 for a line).
        max_iter: iterations at most.
        n_avg: shots averaged per reading (injection jitter).
        injection: also steer with the injection trims (x, px, y, py).
        tikhonov: Tikhonov regularisation (relative to the largest weighted singular value).
        gain: fraction of each step applied (0 < gain <= 1).
        max_step: largest corrector move per iteration [A].
        tol: stop when the beam goes all the way and the rms trajectory (both planes) is below this [m].
        min_improvement: stop when the rms fell by less than this fraction at full reach.
        figure_dir: folder of the figure (``trajectory``: before / after); ``False``: none.
        md: metadata merged into the run's start document.

    Returns:
        the run uid; results: trajectories before/after [m], passages reached, rms, corrector changes [A],
        injection trims.
    """
    need_beam_devices(machine, "correct_trajectory")
    _check_turns(machine, turns, "correct_trajectory")
    if not 0 < gain <= 1:
        raise ValueError(f"gain must be in (0, 1], got {gain}")
    t = int(turns)
    resp, cv, sp0, snap = yield from _steering_setup(machine, response, t)
    n = len(machine.bpm)
    bad = ~np.asarray(machine.bpm.good, dtype=bool)
    total = t * n
    state: dict[str, Any] = {}

    def read() -> MsgGenerator[tuple[np.ndarray, int]]:
        x, y, _ = yield from read_shots(machine, machine.injection, n_avg)
        return _vector(x, y, t), reached((x[:, :t].T, y[:, :t].T), bad)

    def size(v: np.ndarray, k: int) -> float:
        """rms (both planes) over the first ``k`` passages (the response's row order is passage order)."""
        return float(np.hypot(rms(v[:k]), rms(v[total:total + k]))) if k else float("nan")

    def body() -> MsgGenerator[ToolResult]:
        yield from _open_steering_run(machine, resp, t, int(max_iter))
        rec = Record("trajectory_correction", {
            "iteration": ("", (), "iteration (1-based)"),
            "reached_before": ("BPM passages", (), "passages the beam made before the step"),
            "reached_after": ("BPM passages", (), "passages the beam made after the step"),
            "rms_before": ("m", (), "rms trajectory (both planes) over the passages reached, before"),
            "rms_after": ("m", (), "rms trajectory (both planes) over the passages reached, after"),
            "trajectory": ("m", (2 * total,), "trajectory [x turns; y turns] after the step"),
            "undone": ("", (), "1 if the step was taken back")},
            hinted=("iteration", "reached_after", "rms_after"), dtypes={"iteration": "integer", "undone": "integer",
                                                                        "reached_before": "integer",
                                                                        "reached_after": "integer"})
        sp = sp0.copy()
        inj = np.asarray(snap["injection"][:4], dtype=float)
        v, k = yield from read()
        first = (v.copy(), k)
        it = 0
        stop = ""
        for it in range(1, int(max_iter) + 1):
            if k == 0:
                stop = "no BPM sees the beam: check the injection"
                break
            dev = np.where(np.concatenate([np.arange(total), np.arange(total)]) < k, v, np.nan)
            st = trajectory_step(resp, dev, n_passages=k, turns=t, injection=injection, tikhonov=tikhonov, bad=bad)
            step, rep = limit_step(gain * st.dk, sp, cv.low, cv.high, max_step=max_step, names=cv.names)
            for msg in rep.messages:
                warnings.warn(f"correct_trajectory iteration {it}: {msg}", stacklevel=2)
            lim = np.asarray(INJECTION_KNOB_LIMITS, dtype=float)
            new_inj = np.clip(inj + gain * st.dinj, -lim, lim) if injection else inj
            yield from cv.set(sp + step)
            if injection:
                yield from _set_injection(machine, new_inj)
            va, ka = yield from read()
            before, after = size(v, k), size(va, ka)
            worse = ka < k or (ka == k and after > before)
            rec.update(iteration=it, reached_before=k, reached_after=ka, rms_before=before, rms_after=after,
                       trajectory=va, undone=int(worse))
            yield from emit(rec)
            if worse:
                yield from cv.set(sp)
                if injection:
                    yield from _set_injection(machine, inj)
                v, k = yield from read()
                stop = "a step made the trajectory worse: taken back"
                break
            sp, inj, v, k = sp + step, new_inj, va, ka
            if k >= total and tol is not None and after <= tol:
                stop = f"rms {after * 1e6:.1f} um <= tol"
                break
            if k >= total and after > before * (1.0 - min_improvement * gain):
                stop = "converged (the rms no longer falls)"
                break
        state["done"] = True
        res = {"x_before": first[0][:total], "y_before": first[0][total:], "x_after": v[:total], "y_after": v[total:],
               "reached_before": int(first[1]), "reached_after": int(k), "rms_before": size(*first),
               "rms_after": size(v, k), "iterations": int(it), "corrector_correction": sp - sp0,
               "injection": inj, "message": stop or f"{it} iterations"}
        units = {"x_before": "m", "y_before": "m", "x_after": "m", "y_after": "m", "reached_before": "BPM passages",
                 "reached_after": "BPM passages", "rms_before": "m", "rms_after": "m", "iterations": "",
                 "corrector_correction": "A", "injection": "m | rad", "message": ""}
        title = (f"{machine.profile.facility} {machine.profile.accelerator}: trajectory correction, {it} "
                 f"iteration(s), {first[1]} -> {k} of {total} passages")
        return ToolResult(res, units, {"corrector_correction": "total change of each corrector (corrector_names)",
                                       "injection": "injection trims x, px, y, py at the end"},
                          value={**res, "title": title})

    return (yield from _restoring(machine, body(), snap, state, keep=True))


# ======================================================================================================
# thread_first_turns
@thread_safe_figure
def _threading_figure(result: ThreadingResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(2, 1, sharex=True)
    a1.plot(result.reached, ".-")
    a1.set_ylabel("BPM passages reached")
    a1.grid(alpha=0.3)
    r = np.asarray(result.rms).reshape(-1, 2)
    a2.semilogy(r[:, 0] * 1e3, ".-", label="x")
    a2.semilogy(r[:, 1] * 1e3, ".-", label="y")
    a2.set_ylabel("rms reading [mm]")
    a2.set_xlabel("reading")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(f"threading: {'success' if result.success else 'FAILED'} ({result.stage}), {result.steps} readings")
    fig.tight_layout()
    fig.savefig(path)


@tool("first_turns", restore=_all_correctors, keep=True, needs_beam=False,
      ring_only="threading closes the trajectory on itself turn after turn: a transfer line is steered with "
                "correct_trajectory", figures={"threading": _threading_figure})
def thread_first_turns(machine: Machine, turns: int = 2, response: Any = None, n_avg: int = 1,
                       injection: bool = True, tikhonov: float = 0.02, max_step: float | None = None,
                       max_readings: int = 600, figure_dir: str | Path | bool | None = False,
                       md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Thread the injected beam from "lost after a few BPMs" to ``turns`` full turns (pySC's first_turn, stitch,
    balance, with injection steering); then the closed orbit exists and ``correct_orbit`` takes over.

    Drives :func:`acc_bluesky.analysis.trajectory.thread_first_turns` (the decisions) through the devices: every
    request of the algorithm is a real plan move (the correctors family by family, the injection trims), every
    reading an injected shot read by the BPMs in ``trajectory`` mode for ``turns`` turns. One event per reading
    (``stage``: 0 first turn, 1 wiggle, 2 stitch, 3 balance; ``reached``; ``turns_reached``; rms): a live table
    shows the progress. Aborted, stopped or failed: correctors and injection trims are put back; completed: the
    machine keeps the threaded state (even when it did not reach ``turns``: the result says how far it got).

    Args:
        machine: the connected machine (a ring).
        turns: turns to thread (>= 2).
        response: the trajectory response of at least ``turns`` turns: ``None`` / ``"model"`` (the design
            lattice's), a :class:`TrajectoryResponse` or a run of ``measure_trajectory_response``.
        n_avg: shots averaged per reading.
        injection: also steer with the injection trims.
        tikhonov: Tikhonov regularisation of each SVD step.
        max_step: largest corrector move per step [A].
        max_readings: readings at most.
        figure_dir: folder of the figure (``threading``: reach and rms per reading); default ``False`` (none).
        md: metadata merged into the run's start document.

    Returns:
        the run uid; ``ThreadingResult.from_run(cat[uid])``: ``success``, ``stage``, ``reached`` per reading,
        final ``setpoints`` [A] (``corrector_names`` in the start document) and ``injection`` trims.
    """
    need_beam_devices(machine, "thread_first_turns")
    if turns < 2:
        raise ValueError(f"threading needs turns >= 2 (the first turn, then its closure), got {turns}")
    t = int(turns)
    resp, cv, sp0, snap = yield from _steering_setup(machine, response, t)
    n = len(machine.bpm)
    bad = ~np.asarray(machine.bpm.good, dtype=bool)
    state: dict[str, Any] = {}

    def body() -> MsgGenerator[ThreadingResult]:
        yield from _open_steering_run(machine, resp, t, int(max_readings))
        rec = Record("threading", {
            "reading": ("", (), "reading number (1-based)"),
            "stage": ("", (), "0 first turn, 1 wiggle, 2 stitch, 3 balance"),
            "reached": ("BPM passages", (), "BPM passages the beam made"),
            "turns_reached": ("turns", (), "turns the beam made (passages / BPMs)"),
            "rms_x": ("m", (), "rms horizontal reading over the passages reached"),
            "rms_y": ("m", (), "rms vertical reading over the passages reached")},
            hinted=("reading", "stage", "turns_reached", "rms_x", "rms_y"),
            dtypes={"reading": "integer", "stage": "integer", "reached": "integer"})
        inj0 = np.asarray(snap["injection"][:4], dtype=float)
        gen = _threading(resp, sp0, cv.low, cv.high, turns=t, injection=inj0 if injection else None, bad=bad,
                         tikhonov=tikhonov, max_step=max_step, max_readings=int(max_readings))
        req = next(gen)
        count = 0
        while True:
            if req.correctors is not None:
                yield from cv.set(req.correctors)
            if req.injection is not None:
                yield from _set_injection(machine, req.injection)
            x, y, _ = yield from read_shots(machine, machine.injection, n_avg)
            reading = TrajectoryReading(x.T, y.T)
            count += 1
            k = reached(reading, bad)
            rec.update(reading=count, stage=STAGES.get(req.stage, -1), reached=k, turns_reached=k / n,
                       rms_x=rms(reading.x), rms_y=rms(reading.y))
            yield from emit(rec)
            try:
                req = gen.send(reading)
            except StopIteration as stop:
                result = stop.value
                break
        state["done"] = True
        return result

    return (yield from _restoring(machine, body(), snap, state, keep=True))


# ======================================================================================================
# ramp_sextupoles
def _sextupole_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    fams = resolve_families(machine, args.get("families"), "sextupole")
    return Restore(tuple(sorted({*fams, *machine.hcors, *machine.vcors})), rf=bool(args.get("fit_rf", True)))


def _check_fractions(machine: Machine, args: dict[str, Any]) -> None:
    f = np.asarray(args.get("fractions", ()), dtype=float).reshape(-1)
    if f.size == 0 or not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f > 1) or np.any(np.diff(f) <= 0):
        raise ValueError(f"ramp_sextupoles: fractions must rise strictly within [0, 1] (of the reference "
                         f"strengths), got {args.get('fractions')!r}")
    if not 0 < float(args.get("min_step", 0.05)) < 1:
        raise ValueError(f"ramp_sextupoles: min_step must be in (0, 1), got {args.get('min_step')!r}")


def design_sextupoles(machine: Machine, families: Sequence[str]) -> dict[str, np.ndarray]:
    """The design setpoints [A] of the sextupole ``families``: the profile's lattice strengths through each
    family's calibration (what the magnets are at in the model)."""
    from ..analysis.tune import family_strengths

    ring = machine.profile.load_lattice()
    e = machine.profile.energy
    out = {}
    for f in families:
        k = family_strengths(ring, machine.profile, f)
        out[f] = np.asarray(machine.families[f].calibration.physics2hw(k, e, e), dtype=float).reshape(-1)
    return out


@thread_safe_figure
def _ramp_figure(result: ToolResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = result.value
    fig = Figure(figsize=(9.0, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(2, 1, sharex=True)
    steps = np.arange(1, len(r["fraction"]) + 1)
    stored = np.asarray(r["stored"], dtype=bool)
    a1.plot(steps, r["fraction"], "-", color="0.6")
    a1.plot(steps[stored], np.asarray(r["fraction"])[stored], "o", label="closed orbit")
    a1.plot(steps[~stored], np.asarray(r["fraction"])[~stored], "x", color="r", label="no closed orbit")
    a1.set_ylabel("sextupoles [fraction of reference]")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(steps, np.asarray(r["rms_x"]) * 1e6, ".-", label="x")
    a2.plot(steps, np.asarray(r["rms_y"]) * 1e6, ".-", label="y")
    a2.set_ylabel("rms orbit after correction [um]")
    a2.set_xlabel("step")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(r["title"])
    fig.tight_layout()
    fig.savefig(path)


@tool("sextupole_ramp", restore=_sextupole_restore, keep=True, needs_beam=False, validate=_check_fractions,
      ring_only="the sextupoles are ramped around a closed orbit, which only a ring has", family_kind="sextupole",
      figures={"ramp": _ramp_figure})
def ramp_sextupoles(machine: Machine, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                    families: Sequence[str] | str | None = None, reference: str | dict[str, Any] = "design",
                    orm: Any = "model",
                    fit_rf: bool = True, n_sv: int | None = None, max_iter: int = 3, min_step: float = 0.05,
                    n_avg: int = 1, figure_dir: str | Path | bool | None = None,
                    md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Bring the sextupoles to their reference strengths in steps, correcting the closed orbit at each step (pySC's
    sextupole ramp after threading; what a control room does when the threaded beam does not store).

    After threading, the closed orbit passes the sextupoles off-centre (hundreds of um) and their feed-down (a
    quadrupole and skew quadrupole per sextupole) can leave no stable closed orbit: two turns survive, a stored beam
    does not. Then, from the present strengths: (1) while no closed orbit is seen (in-service BPMs read NaN in
    orbit mode), the sextupoles go down to the next lower of ``fractions`` (0 last) until one is; (2) the orbit is
    corrected there (SVD with ``orm``, ``fit_rf``: the RF frequency brings the beam on energy); (3) the sextupoles
    go up to each higher fraction in turn, the orbit corrected after each; a step that loses the closed orbit is
    halved (down to ``min_step``), and if even that loses it the sextupoles go back to the last fraction with a
    closed orbit and the ramp stops (``success`` 0). Each family moves as one vector (fraction x its reference
    setpoints); every move is checked against the limits before anything moves. One ``sextupole_ramp`` event per
    step in the stream ``sextupole_ramp`` (fraction, closed orbit or not, rms after its correction); the orbit
    corrections' iterations are the ``primary`` events (as ``correct_orbit``'s).
    Aborted, stopped or failed: sextupoles, correctors and the RF frequency are put back; completed: kept.

    Args:
        machine: the connected machine (a ring).
        fractions: the rising fractions of the reference strengths to stop at (within [0, 1]; the last is where
            the ramp ends, 1 = the reference).
        families: sextupole families ramped (default every sextupole family).
        reference: the strengths the fractions are of: ``"design"`` (the model lattice's, through the
            calibration), or ``{family: setpoints [A]}``.
        orm: the orbit response for the corrections: ``"model"``, an :class:`OrbitResponse` or a run of
            ``measure_orm``.
        fit_rf: correct with the RF frequency too [Hz].
        n_sv: singular values of each correction (default: as ``correct_orbit``).
        max_iter: correction iterations per step.
        min_step: the smallest fraction step tried when a step loses the closed orbit.
        n_avg: orbit acquisitions averaged per reading.
        figure_dir: folder of the figure (``ramp``: fraction and rms orbit per step); ``False``: none.
        md: metadata merged into the run's start document.

    Returns:
        the run uid; results: ``fraction`` per step, ``stored`` (1: closed orbit), ``rms_x``, ``rms_y`` after
        each step's correction [m], ``final_fraction``, ``success`` (1: the last of ``fractions`` reached with a
        closed orbit), the families' final setpoints ``<family>_setpoint`` [A], ``message``.
    """
    fams = resolve_families(machine, families, "sextupole")
    ladder = [float(v) for v in np.asarray(fractions, dtype=float).reshape(-1)]
    if isinstance(reference, str):
        if reference != "design":
            raise ValueError(f"ramp_sextupoles: reference must be 'design' or {{family: setpoints}}, got {reference!r}")
        ref = design_sextupoles(machine, fams)
    else:
        missing = [f for f in fams if f not in reference]
        if missing:
            raise KeyError(f"ramp_sextupoles: reference has no setpoints for {missing}")
        ref = {f: np.broadcast_to(np.asarray(reference[f], dtype=float), (len(machine.families[f]),)).copy()
               for f in fams}
    for f in fams:  # every setpoint the ramp may reach, within the limits, before anything moves
        for a in (0.0, 1.0):
            check_limits(machine.families[f], a * ref[f], f"ramp_sextupoles: {a:g} x the reference of {f}")
    sext0 = yield from family_setpoints(machine, fams)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.concatenate([sext0[f][ref[f] != 0] / ref[f][ref[f] != 0] for f in fams])
    now = float(np.median(ratios)) if ratios.size else 1.0
    resp = yield from _orm_of(machine, orm, fit_rf)
    system, nsv, _ = _correction_system(machine, resp, fit_rf, n_sv, None, None, None, (), ())
    snap = yield from snapshot_setpoints(machine, sorted({machine.device(c).family_name
                                                          for c in resp.corrector_names}), rf=fit_rf)
    corr = _Correction(machine, resp, system, snap, float(snap["RF:frequency"]) if fit_rf else float("nan"),
                       fit_rf, None)
    good = np.asarray(machine.bpm.good, dtype=bool)
    orbit_rec = _correction_record(machine, corr.groups)
    yield from open_tool_run(families=fams, orm_uid=resp.uid or resp.kind, bpm_names=machine.bpm.names,
                             start_fraction=now, reference={f: ref[f].tolist() for f in fams},
                             num_points=2 * len(ladder) + 2)
    rec = Record("sextupole_ramp", {
        "step": ("", (), "step number (1-based)"),
        "fraction": ("", (), "sextupole strengths as a fraction of the reference"),
        "stored": ("", (), "1: a closed orbit (every in-service BPM reads a position)"),
        "rms_x": ("m", (), "rms horizontal orbit after the step's correction (NaN: no closed orbit)"),
        "rms_y": ("m", (), "rms vertical orbit after the step's correction (NaN: no closed orbit)"),
        "iterations": ("", (), "orbit correction iterations of the step")},
        hinted=("step", "fraction", "stored", "rms_x", "rms_y"),
        dtypes={"step": "integer", "stored": "integer", "iterations": "integer"})
    hist: dict[str, list[float]] = {"fraction": [], "stored": [], "rms_x": [], "rms_y": []}

    def set_fraction(a: float) -> MsgGenerator[None]:
        pairs: list[Any] = []
        for f in fams:
            pairs += [machine.families[f], a * ref[f]]
        yield from move(*pairs)

    def stored() -> MsgGenerator[bool]:
        x, y = yield from read_orbit(machine, n_avg, check=False)
        return bool(np.all(np.isfinite(x[good]) & np.isfinite(y[good])))

    def step(a: float, move_first: bool = True) -> MsgGenerator[bool]:
        """Sextupoles to ``a``; if a closed orbit exists, correct it. One event. True if stored."""
        if move_first:
            yield from set_fraction(a)
        ok = yield from stored()
        its, rx, ry = 0, float("nan"), float("nan")
        if ok:
            sp_before, f_before = {f: v.copy() for f, v in corr.sp.items()}, corr.f
            try:
                out = yield from _iterate(machine, corr, np.zeros(len(good)), np.zeros(len(good)), nsv=nsv,
                                          tikhonov=None, gain=1.0, max_iter=max_iter, tol=None, n_avg=n_avg,
                                          min_improvement=0.02, exclude_bpms=(), auto_cut=n_sv is None,
                                          rec=orbit_rec)
                its = int(out["iterations"])
                x, y = out["last"]
                rx, ry = rms(x, good), rms(y, good)
            except BeamLostError:  # a correction step lost the closed orbit: taken back, the step is judged on that
                pairs: list[Any] = []
                for f, v in sp_before.items():
                    pairs += [machine.families[f], v]
                if fit_rf:
                    pairs += [machine.rf, f_before]
                yield from move(*pairs)
                corr.sp, corr.f = sp_before, f_before
                ok = yield from stored()
                if ok:
                    x, y = yield from read_orbit(machine, n_avg, check=False)
                    rx, ry = rms(x, good), rms(y, good)
        hist["fraction"].append(a)
        hist["stored"].append(float(ok))
        hist["rms_x"].append(rx)
        hist["rms_y"].append(ry)
        rec.update(step=len(hist["fraction"]), fraction=a, stored=int(ok), rms_x=rx, rms_y=ry, iterations=its)
        yield from emit(rec, stream="sextupole_ramp")
        return ok

    message = ""
    ok = yield from step(now, move_first=False)
    last_good = now if ok else None
    below = [a for a in reversed([0.0, *ladder]) if a < now - 1e-9]
    below = list(dict.fromkeys(below))
    while last_good is None and below:
        a = below.pop(0)
        if (yield from step(a)):
            last_good = a
    if last_good is None:
        yield from set_fraction(now)
        raise BeamLostError(f"ramp_sextupoles: no closed orbit with the sextupoles at any fraction from {now:.3g} "
                            "down to 0 of the reference: thread the first turns (thread_first_turns, "
                            "correct_trajectory) first. Everything it moved is put back.")
    for target in [a for a in ladder if a > last_good + 1e-9]:
        lo = last_good
        while lo < target - 1e-9:
            trial = target
            while True:
                if (yield from step(trial)):
                    lo = last_good = trial
                    break
                if trial - lo <= min_step + 1e-9:
                    trial = None
                    break
                trial = lo + max(0.5 * (trial - lo), min_step)
            if trial is None:
                break
        if last_good < target - 1e-9:
            yield from step(last_good)  # back where the closed orbit was, corrected again
            message = (f"no closed orbit above {last_good:.3g} of the reference (a step of {min_step:g} lost it): "
                       f"the sextupoles are left at {last_good:.3g}")
            break
    final = last_good
    success = abs(final - ladder[-1]) < 1e-9 and bool(hist["stored"][-1])
    sp = yield from family_setpoints(machine, fams)
    res: dict[str, Any] = {k: np.asarray(v, dtype=float) for k, v in hist.items()}
    res.update(final_fraction=np.asarray(final), success=np.asarray(int(success)), start_fraction=np.asarray(now),
               message=message or f"sextupoles at {final:.3g} of the reference with a closed orbit")
    units = {"fraction": "", "stored": "", "rms_x": "m", "rms_y": "m", "final_fraction": "", "success": "",
             "start_fraction": "", "message": ""}
    for f in fams:
        res[f"{f}_setpoint"] = np.asarray(sp[f], dtype=float)
        units[f"{f}_setpoint"] = "A"
    title = (f"{machine.profile.facility} {machine.profile.accelerator}: sextupole ramp {now:.2f} -> {final:.2f}, "
             f"{len(hist['fraction'])} steps" + ("" if success else " (stopped)"))
    return ToolResult(res, units, {"fraction": "sextupole fraction of the reference at each step",
                                   "stored": "1: closed orbit at that step", "final_fraction": "where the ramp ended",
                                   "success": "1: the last fraction was reached with a closed orbit",
                                   "start_fraction": "the sextupoles' fraction of the reference at the start"},
                      value={**res, "title": title})
