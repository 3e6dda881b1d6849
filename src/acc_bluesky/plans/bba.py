"""Beam-based alignment as Bluesky plans: ``measure_bba`` (MML's quadcenter one BPM at a time, or the parallel
method over shared orbits) and ``apply_bba`` (the offsets as a golden orbit run for ``correct_orbit(target=...)``).

The physics is in :mod:`acc_bluesky.analysis.bba`; the scans are the stubs of :mod:`acc_bluesky.plan_stubs.bba`.
Both plans are tools on the scaffold: one run, FAIR metadata, one event per orbit read, the result in the run,
every quadrupole and corrector put back exactly after each BPM (block) and when the plan is interrupted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis._common import rms
from ..analysis.bba import (
    PLANES,
    BBAResult,
    bba_model,
    bba_pairs,
    fit_bba,
    parallel_blocks,
    quadrupole_step,
    shared_correctors,
)
from ..machine import Machine
from ..plan_stubs.bba import (
    BBASkip,
    MoveCounter,
    PointSet,
    bba_record,
    block_sweep,
    serial_scan,
)
from ..plan_stubs.machine import read_orbit, snapshot_setpoints
from ..plan_stubs.runs import resolve
from ..plan_stubs.tool import (
    Restore,
    ToolError,
    ToolResult,
    open_tool_run,
    thread_safe_figure,
    tool,
)
from ..profile import LimitError

__all__ = ["measure_bba", "apply_bba"]  # noqa: RUF022 - the order of the tools

METHODS = ("quadcenter", "parallel")
#: rms reading [m] (either plane) above which the orbit BBA starts from is too far from a corrected one: the
#: quadrupole steps then change the optics through the sextupoles and the offsets come out wrong by microns
#: (profile ``tools.bba.max_orbit_rms``). EBS, seed 1, offsets against the truth, parallel / quadcenter: 0.6 / 0.14
#: um rms at a 47 / 38 um orbit, 1.3 / 0.27 um at 110 / 60 um, 4.3 / 0.8 um at 310 / 144 um, 32 / 7.7 um (250 / 26
#: um at worst) at the uncorrected 1.0 / 0.47 mm.
MAX_ORBIT_RMS = 200e-6


def _bba_restore(machine: Machine, args: dict[str, Any]) -> Restore:
    fams = [*machine.quad, *machine.hcors, *machine.vcors]
    return Restore(tuple(dict.fromkeys(fams)), rf=False)


@thread_safe_figure
def _bba_figure(result: BBAResult, path: Path) -> None:
    result.plot(path)


def _defaults(machine: Machine) -> dict[str, Any]:
    return machine.profile.tool_defaults("bba")


def _as_names(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str) or hasattr(v, "connect"):
        v = [v]
    return [x.name if hasattr(x, "connect") else str(x) for x in v]


def _check_quads(machine: Machine, quads: Any) -> Any:
    """Quadrupole names as devices of this machine: a family name (one power supply for several magnets in the
    sense of a setpoint array) is refused, naming its devices."""
    if quads is None or isinstance(quads, dict):
        return quads
    names = _as_names(quads)
    for q in names:
        if q in machine.quad:
            fam = machine.quad[q]
            raise ToolError(f"measure_bba: {q!r} is a quadrupole family ({len(fam)} magnets); BBA steps one magnet: "
                            f"give its devices ({fam.names[0]} ...), one per BPM. Nothing was moved.")
        dev = machine.device(q)
        if getattr(dev, "family_name", None) not in machine.quad:
            raise ToolError(f"measure_bba: {q!r} is not a quadrupole (it is in family "
                            f"{getattr(dev, 'family_name', '?')}). Nothing was moved.")
    return names


@tool("bba", restore=_bba_restore, figures={"bba": _bba_figure},
      ring_only="BBA finds where a quadrupole step leaves the closed orbit unchanged: it needs a closed orbit")
def measure_bba(machine: Machine, bpms: Sequence[str] | None = None, planes: Sequence[str] = ("x", "y"),
                quads: Sequence[str] | None = None, correctors: Sequence[str] | None = None,
                method: str = "quadcenter", n_steps: int | None = None, dk: float | None = None,
                amplitude: float | None = None, n_avg: int | None = None, max_distance: float | None = None,
                block_size: int | None = None, settle: float = 0.0, figure_dir: str | Path | bool | None = None,
                md: dict | None = None) -> MsgGenerator[str]:
    """Beam-based alignment: the reading of each BPM when the beam passes through the magnetic centre of its
    quadrupole (MML's ``quadcenter``), the golden-orbit target of that BPM.

    Each BPM is paired with its nearest individually powered quadrupole (every quadrupole device of the profile is
    one power supply). The quadrupole is stepped by ``dk`` at several orbits; the orbit change it makes is the
    response to a kick ``-dK L (x - c)``, zero when the beam passes through the centre ``c``. Fitting that change
    (all BPMs projected on its common direction: model-free) against the BPM's reading gives the crossing; the part
    of the BPM's motion that comes from the beam *angle* changing at the quadrupole is taken out with the model, so
    the offset is the reading for the beam through the centre with the angle of the orbit the measurement started
    from (see :mod:`acc_bluesky.analysis.bba`). Results: ``BBAResult.from_run(catalog[uid])``; figure: the
    bow-tie of the BPM with the largest offset and the offsets along the ring (``figures.bba``).

    Methods:
        ``"quadcenter"``: one BPM and plane at a time: a probe orbit change centres a scan of the corrector with
        the largest response at the quadrupole (among those whose wave has an extremum there) over
        ``2 n_steps + 1`` values; the quadrupole toggles at each (``~2 (2 n_steps + 1) + 3`` moves per BPM and
        plane); the BPM's magnets are put back before the next.
        ``"parallel"``: both planes of every BPM from orbits shared by all quadrupoles: blocks of ``block_size``
        quadrupoles, each block with one x and one y corrector (chosen from three per plane spread in phase); per
        level the two correctors go to ``-theta``, the quadrupoles are stepped one after the other, the correctors
        go to ``+theta``, the quadrupoles go back one after the other. One move per quadrupole and orbit, each
        quadrupole's orbit change alone in the difference of two reads (no separation by the model), both planes
        at once: ``~2 n_steps`` moves per quadrupole instead of ``~12`` per BPM and plane.

    Args:
        machine: the connected machine.
        bpms: BPM names (default: every BPM in service).
        planes: ``("x", "y")`` or one of them (both are always measured by the parallel method).
        quads: one quadrupole device name per BPM of ``bpms`` (default: the nearest to each).
        correctors: corrector names to choose from (default: every corrector in service).
        method: ``"quadcenter"`` or ``"parallel"``.
        n_steps: quadcenter: corrector values on each side of the centre (default 2: 5 values); parallel: orbit
            pairs per block (default 1: two mirrored orbits).
        dk: relative quadrupole step (0.01 = +1 %); default: per quadrupole, the step that shifts a tune by the
            profile's ``tools.bba.tune_shift`` (0.01) in the model, at most 5 %.
        amplitude: orbit change [m] at the quadrupole over the scan (quadcenter: half range around the centre;
            parallel: at the median quadrupole of a block at the outer orbits); default ``tools.bba.amplitude``,
            else 100 um (quadcenter), 90 um (parallel).
        n_avg: orbit acquisitions averaged per read (default 1 for quadcenter; 4 for parallel, which has two
            points per quadrupole where quadcenter has five: reads cost no magnet move).
        max_distance: a BPM whose nearest quadrupole centre is farther [m] is skipped (default
            ``tools.bba.max_distance``, else 2 m).
        block_size: parallel: quadrupoles per block (default ``tools.bba.block_size``, else 8).
        settle: wait after each move [s].
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    prof = machine.profile
    defaults = _defaults(machine)
    if method not in METHODS:
        raise ToolError(f"measure_bba: method must be one of {METHODS}, got {method!r}. Nothing was moved.")
    planes = tuple(planes)
    if not planes or any(p not in PLANES for p in planes):
        raise ToolError(f"measure_bba: planes must be among ('x', 'y'), got {planes!r}. Nothing was moved.")
    if method == "parallel":
        planes = PLANES
    n_steps = int(n_steps if n_steps is not None else (2 if method == "quadcenter" else 1))
    n_avg = int(n_avg if n_avg is not None else defaults.get("n_avg", 1 if method == "quadcenter" else 4))
    amplitude = float(amplitude if amplitude is not None else defaults.get(
        "amplitude", 100e-6 if method == "quadcenter" else 90e-6))
    if not 0 < amplitude <= 2e-3:
        raise ToolError(f"measure_bba: amplitude is the orbit change at the quadrupole [m], in (0, 2e-3]; got "
                        f"{amplitude!r}. Nothing was moved.")
    max_distance = float(max_distance if max_distance is not None else defaults.get("max_distance", 2.0))
    block_size = int(block_size if block_size is not None else defaults.get("block_size", 8))
    tune_shift = float(defaults.get("tune_shift", 0.01))
    model_error = float(defaults.get("model_error", 0.05))
    quads = _check_quads(machine, quads)
    correctors = correctors if isinstance(correctors, dict) else _as_names(correctors)
    bpm_list = _as_names(bpms)
    if bpm_list is not None:
        for b in bpm_list:
            machine.bpm.index_of(b)
    model = bba_model(prof)
    bad = [i for i, g in enumerate(machine.bpm.good) if not g]
    serial = method == "quadcenter"
    # quadcenter: both planes paired (the plane not measured still centres the beam), the measured ones kept
    all_pairs, skipped = bba_pairs(prof, bpm_list, PLANES if serial else planes, quads, correctors,
                                   max_distance=max_distance, exclude_bpms=bad, choose_corrector=serial,
                                   min_tune_shift=0.1 * tune_shift)
    pairs = [p for p in all_pairs if p.plane in planes]
    skipped = [s for s in skipped if s[1] in planes]
    messages = [f"{b} {p}: skipped: {why}" for b, p, why in skipped]
    if not pairs:
        raise ToolError("measure_bba: no BPM can be measured: " + ("; ".join(messages) or "none selected")
                        + ". Nothing was moved and no run was recorded.")
    for m in messages:
        warnings.warn(f"measure_bba: {m}", stacklevel=2)
    dks = {p.quad_index: quadrupole_step(model, p.quad_index, dk, tune_shift=tune_shift) for p in pairs}
    if any(not (0 < abs(v) <= 0.2) for v in dks.values()):
        raise ToolError(f"measure_bba: dk must be a relative step in (0, 0.2], got {dk!r}. Nothing was moved.")
    blocks = []
    if method == "parallel":
        shared = {p: shared_correctors(model, p, int(defaults.get("shared_correctors", 3)), correctors) for p in PLANES}
        uq = sorted({p.quad_index for p in pairs}, key=lambda q: model.quad.s[q])
        blocks = parallel_blocks(model, uq, shared, [dks[q] for q in uq], block_size=block_size,
                                 amplitude=amplitude)
        by_block = {q: b for b in blocks for q in b.quads}
        for p in pairs:  # the corrector of a BPM is its block's
            c = by_block[p.quad_index].correctors[PLANES.index(p.plane)]
            rq = model.quad_response([p.quad_index], [c], p.plane)[0, 0]
            rb = model.bpm_response([p.bpm_index], [c], p.plane)[0, 0]
            p.corrector, p.r_quad, p.r_bpm, p.angle_term = c, float(rq), float(rb), float(rb - p.m11 * rq)
    quad_list = list(dict.fromkeys(model.quads[p.quad_index].name for p in pairs))
    qnum = {q: k for k, q in enumerate(quad_list)}
    fams = list(dict.fromkeys([*(machine.device(q).family_name for q in quad_list),
                               *(machine.device(p.corrector).family_name for p in all_pairs if p.corrector)]))
    snap = yield from snapshot_setpoints(machine, fams, rf=False)
    x0, y0 = yield from read_orbit(machine, n_avg, where="reading the orbit BBA starts from")
    good = np.asarray(machine.bpm.good, dtype=bool)
    orbit_rms = [rms(x0, good), rms(y0, good)]
    max_orbit = float(defaults.get("max_orbit_rms", MAX_ORBIT_RMS))
    if max(orbit_rms) > max_orbit:
        text = (f"the orbit it starts from is {orbit_rms[0] * 1e6:.0f} / {orbit_rms[1] * 1e6:.0f} um rms (x / y "
                f"readings), above tools.bba.max_orbit_rms = {max_orbit * 1e6:.0f} um: off-centre in the sextupoles, "
                "the quadrupole steps change the optics and the offsets come out wrong by microns to tens of microns "
                "(EBS, parallel method: 0.6 um rms at a 50 um orbit, 4 um at 300 um, 32 um at 1 mm). Correct the "
                "orbit first (correct_orbit), then measure")
        messages.append(text)
        warnings.warn(f"measure_bba: {text}", stacklevel=2)

    def sp(name: str) -> float:
        d = machine.device(name)
        return float(snap[d.family_name][d.index])

    yield from open_tool_run(
        bpm_names=machine.bpm.names, method=method, bba_quads=quad_list,
        bba_measurements=[[p.bpm, p.plane, p.quad, p.corrector] for p in pairs],
        bba_bpms=list(dict.fromkeys(p.bpm for p in pairs)),
        bba_blocks=[{"quads": [model.quads[q].name for q in b.quads], "signs": b.signs, "dk": b.dk,
                     "correctors": list(b.correctors), "theta": list(b.theta)} for b in blocks],
        bba_skipped=[list(s) for s in skipped], n_steps=n_steps, amplitude=amplitude,
        start_orbit_rms=orbit_rms, max_orbit_rms=max_orbit,
        dk_used={model.quads[q].name: v for q, v in dks.items()},
        num_points=(len(pairs) * (4 * n_steps + 2) + len({p.bpm for p in pairs}) * 2 if serial
                    else sum(2 * n_steps * (len(b.quads) + 1) for b in blocks)))
    record = bba_record(len(machine.bpm))
    counter = MoveCounter()
    points: dict[tuple[str, str], PointSet] = {}
    if serial:
        by_bpm: dict[str, dict[str, Any]] = {}
        for p in all_pairs:
            by_bpm.setdefault(p.bpm, {})[p.plane] = p

        def crossing(pts: PointSet, thetas: np.ndarray) -> float:
            fit, _, _ = fit_bba(pts.readings, pts.corrections, np.array(pts.diffs), model_error=model_error)
            if not fit.ok or np.ptp(fit.z) == 0:
                return float("nan")
            return float(np.polyval(np.polyfit(fit.z, thetas, 1), fit.offset))

        for k, bpm in enumerate(dict.fromkeys(p.bpm for p in pairs)):
            mine = by_bpm[bpm]
            meas = [p for p in planes if p in mine]
            qname = mine[meas[0]].quad
            try:
                got = yield from serial_scan(
                    machine, model, mine, meas, index=k, quad_number=qnum[qname], sp_quad=sp(qname),
                    sp_cors={p: sp(pr.corrector) for p, pr in mine.items()}, dk=dks[mine[meas[0]].quad_index],
                    amplitude=amplitude, n_steps=n_steps, n_avg=n_avg, settle=settle, record=record,
                    counter=counter, fit=crossing)
                points.update({(bpm, p): v for p, v in got.items()})
            except BBASkip as err:
                messages.append(f"{err}; skipped")
                warnings.warn(f"measure_bba: {err}; the BPM is skipped", stacklevel=2)
    else:
        pairs_of: dict[int, list] = {}
        for p in pairs:
            pairs_of.setdefault(p.quad_index, []).append(p)
        terms = {(p.bpm, p.plane): p.angle_term for p in pairs}
        for k, b in enumerate(blocks):
            try:
                got = yield from block_sweep(
                    machine, model, b, index=k, quad_numbers=[qnum[model.quads[q].name] for q in b.quads],
                    sp_quads=[sp(model.quads[q].name) for q in b.quads], sp_cors=[sp(c) for c in b.correctors],
                    levels=n_steps, n_avg=n_avg, settle=settle, terms=terms, pairs_of=pairs_of, record=record,
                    counter=counter)
                points.update(got)
            except LimitError as err:
                messages.append(f"block {k}: {err}; its BPMs are skipped")
                warnings.warn(f"measure_bba: block {k}: {err}; its BPMs are skipped", stacklevel=2)
    expected = {}
    for p in pairs:  # the abscissa range the scan should give: the beam moved at the quadrupole, seen at the BPM
        if serial:
            expected[(p.bpm, p.plane)] = 2 * amplitude * abs(p.m11)
        else:
            b = next(b for b in blocks if p.quad_index in b.quads)
            expected[(p.bpm, p.plane)] = 2 * b.theta[PLANES.index(p.plane)] * abs(p.r_quad * p.m11)
    return _result(machine, model, pairs, points, blocks, counter, messages, model_error, method, expected)


def _result(machine: Machine, model, pairs, points, blocks, counter: MoveCounter, messages: list[str],
            model_error: float, method: str, expected: dict[tuple[str, str], float]) -> BBAResult:
    names = list(dict.fromkeys(p.bpm for p in pairs))
    row = {b: k for k, b in enumerate(names)}
    n = len(names)
    off, unc, chi2, snr, stat, sys_, corr = (np.full((n, 2), np.nan) for _ in range(7))
    rej, npts = np.zeros((n, 2), dtype=int), np.zeros((n, 2), dtype=int)
    first_new = len(messages)
    qn = [["", ""] for _ in range(n)]
    cn = [["", ""] for _ in range(n)]
    pmax = max((len(v.readings) for v in points.values()), default=1)
    bz, ba = np.full((n, 2, pmax), np.nan), np.full((n, 2, pmax), np.nan)
    for pair in pairs:
        i, p = row[pair.bpm], PLANES.index(pair.plane)
        qn[i][p], cn[i][p] = pair.quad, pair.corrector
        pts = points.get((pair.bpm, pair.plane))
        if pts is None:
            continue
        fit, c_star, u = fit_bba(pts.readings, pts.corrections, np.array(pts.diffs), model_error=model_error)
        npts[i, p] = len(pts.readings)
        if not fit.ok:
            messages.append(f"{pair.bpm} {pair.plane}: the bow-tie fit failed ({fit.message})")
            continue
        span = float(np.ptp(fit.z[~fit.rejected]))
        want = expected.get((pair.bpm, pair.plane), 0.0)
        if span < 0.1 * want:
            messages.append(f"{pair.bpm} {pair.plane}: no lever arm: the BPM moved by {span * 1e6:.2f} um over the "
                            f"scan instead of ~{want * 1e6:.0f} um ({pair.corrector} without effect: dead or "
                            "disconnected?)")
            continue
        if not fit.snr > 5:
            messages.append(f"{pair.bpm} {pair.plane}: no crossing measured: the orbit change of the step varied by "
                            f"{fit.snr:.1f} times the noise ({pair.quad} without effect: dead or disconnected?)")
            continue
        sign = np.sign(fit.coef[0]) or 1.0
        off[i, p], unc[i, p], stat[i, p] = fit.offset, u, fit.uncertainty
        sys_[i, p], corr[i, p] = model_error * abs(c_star), c_star
        chi2[i, p], snr[i, p], rej[i, p] = fit.chi2, fit.snr, int(fit.rejected.sum())
        bz[i, p, :fit.z.size], ba[i, p, :fit.a.size] = fit.z, fit.a * sign
    for msg in messages[first_new:]:
        warnings.warn(f"measure_bba: {msg}", stacklevel=3)
    # moves per BPM: serial exactly; parallel: each block's moves shared by its BPMs
    per = np.zeros(n)
    for key, v in counter.per.items():
        if isinstance(key, tuple) and key[0] == "block":
            b = blocks[key[1]]
            bp = [row[p.bpm] for p in pairs if p.quad_index in b.quads]
            for i in set(bp):
                per[i] += v / len(set(bp))
        elif key in row:
            per[row[key]] += v
    s = np.array([machine.bpm.s[machine.bpm.index_of(b)] for b in names]) if n else np.zeros(0)
    return BBAResult(names, off, unc, qn, cn, chi2, snr, rej, npts, stat, sys_, corr, counter.total, per,
                     method=method, s=s, bowtie_z=bz, bowtie_a=ba, messages=messages)


# ======================================================================================================
# apply_bba
@tool("golden_orbit", needs_beam=False)
def apply_bba(machine: Machine, bba: Any, md: dict | None = None) -> MsgGenerator[str]:
    """Record the BBA offsets as a golden orbit: a run whose results ``golden_x``, ``golden_y`` [m] (every BPM of
    the machine) are what ``correct_orbit(machine, target=run)`` steers the readings to. Nothing moves.

    BPMs (or planes) not measured keep the target 0 (their reading); ``measured_x``, ``measured_y`` (1/0) say
    which are BBA offsets, ``uncertainty_x``, ``uncertainty_y`` [m] their uncertainties (NaN where not measured).

    Args:
        machine: the connected machine.
        bba: a ``measure_bba`` run (uid, partial uid, Tiled run, ``RE(...)`` result) or a ``BBAResult``.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    result = yield from resolve(bba, BBAResult, tools=("bba",), what="bba")
    names = machine.bpm.names
    gx, gy, meas = result.golden_orbit(names)
    if not meas.any():
        raise ToolError("apply_bba: the BBA run has no offset measured; nothing to record")
    pos = {b: k for k, b in enumerate(result.bpm_names)}
    ux, uy = np.full(len(names), np.nan), np.full(len(names), np.nan)
    for i, b in enumerate(names):
        k = pos.get(b)
        if k is not None:
            ux[i], uy[i] = result.uncertainty[k]
            ux[i] = ux[i] if meas[i, 0] else np.nan
            uy[i] = uy[i] if meas[i, 1] else np.nan
    yield from open_tool_run(bba_uid=result.uid, bpm_names=names, num_points=0,
                             n_measured=[int(meas[:, 0].sum()), int(meas[:, 1].sum())])
    res = {"golden_x": gx, "golden_y": gy, "measured_x": meas[:, 0].astype(int), "measured_y": meas[:, 1].astype(int),
           "uncertainty_x": ux, "uncertainty_y": uy}
    units = {"golden_x": "m", "golden_y": "m", "measured_x": "", "measured_y": "", "uncertainty_x": "m",
             "uncertainty_y": "m"}
    desc = {"golden_x": "golden orbit x: BBA offset of each BPM (0 where not measured)",
            "golden_y": "golden orbit y: BBA offset of each BPM (0 where not measured)",
            "measured_x": "1 where golden_x is a BBA offset", "measured_y": "1 where golden_y is a BBA offset",
            "uncertainty_x": "uncertainty of golden_x (NaN where not measured)",
            "uncertainty_y": "uncertainty of golden_y (NaN where not measured)"}
    return ToolResult(res, units, desc, value={**res, "rms_x": rms(gx[meas[:, 0]]), "rms_y": rms(gy[meas[:, 1]])})
