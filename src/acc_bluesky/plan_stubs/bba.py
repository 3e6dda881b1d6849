"""BBA plan stubs (never open a run): the bow-tie scan of one BPM (serial, MML's quadcenter) and the sweep of one
block of quadrupoles over two mirrored orbits (parallel). Both emit one event per orbit read in the ``primary``
stream and count every magnet setpoint change.

Units: quadrupole steps relative (a fraction of the strength), corrector changes [rad] (moved in A through each
device's calibration), orbit [m].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis.bba import PLANES, BbaModel, BbaPair, Block, kick_estimate
from .machine import Record, emit, move, read_orbit

__all__ = ["BBASkip", "MoveCounter", "PointSet", "bba_record", "block_sweep", "serial_scan"]


class BBASkip(RuntimeError):
    """One BPM cannot be measured (a limit, no lever arm): it is skipped, the others go on."""


@dataclass
class MoveCounter:
    """Magnet setpoint changes, in total and per key (a BPM, a block)."""

    total: int = 0
    per: dict[Any, int] = field(default_factory=dict)

    def add(self, key: Any, n: int = 1) -> None:
        self.total += n
        self.per[key] = self.per.get(key, 0) + n


@dataclass
class PointSet:
    """The bow-tie points of one BPM in one plane: the BPM's reading with the quadrupole stepped [m], the model's
    angle correction of each [m], the orbit change of the step at every BPM of the plane [m] (P, nbpm)."""

    readings: list[float] = field(default_factory=list)
    corrections: list[float] = field(default_factory=list)
    diffs: list[np.ndarray] = field(default_factory=list)

    def add(self, reading: float, correction: float, diff: np.ndarray) -> None:
        self.readings.append(float(reading))
        self.corrections.append(float(correction))
        self.diffs.append(np.asarray(diff, dtype=float))


def bba_record(nbpm: int) -> Record:
    return Record("bba", {
        "measurement": ("", (), "index of the BPM and plane (serial) or of the block (parallel) in the start "
                                "document (bba_measurements / bba_blocks)"),
        "step": ("", (), "orbit read within the measurement"),
        "quad": ("", (), "index (bba_quads) of the quadrupole stepped last, -1: none"),
        "quad_step": ("", (), "relative step of that quadrupole's strength now (0: back at its setpoint)"),
        "corrector_x": ("rad", (), "change of the horizontal corrector of the measurement from its setpoint"),
        "corrector_y": ("rad", (), "change of the vertical corrector of the measurement from its setpoint"),
        "x": ("m", (nbpm,), "horizontal orbit"),
        "y": ("m", (nbpm,), "vertical orbit"),
    }, hinted=("measurement", "step", "quad_step"), dtypes={"measurement": "integer", "step": "integer",
                                                              "quad": "integer"})


def _hw(dev, physics: float) -> float:
    return float(dev.to_hw(physics))


def _read(machine, n_avg: int, settle: float, where: str) -> MsgGenerator[np.ndarray]:
    if settle:
        yield from bps.sleep(settle)
    x, y = yield from read_orbit(machine, n_avg, where=where)
    return np.concatenate([x, y])


def serial_scan(machine, model: BbaModel, pairs: dict[str, BbaPair], measure: Sequence[str], *, index: int,
                quad_number: int, sp_quad: float, sp_cors: dict[str, float], dk: float, amplitude: float,
                n_steps: int, n_avg: int, settle: float, record: Record, counter: MoveCounter,
                fit: Any = None) -> MsgGenerator[dict[str, PointSet]]:
    """The bow-tie of one BPM (MML's quadcenter) in the planes ``measure``, one plane after the other.

    1. Probe: the orbit with the quadrupole at its setpoint and stepped by ``dk``; from this orbit change the
       model estimates, in both planes, how far the beam is from the quadrupole's centre.
    2. The other plane's corrector goes to its estimated crossing (the beam near the centre in that plane: the
       coupled orbit change of an off-centre beam would bias this plane's crossing); this plane's corrector
       goes to ``2 n_steps + 1`` values around its estimated crossing (the beam moves by ``+-amplitude`` at the
       quadrupole); at each the orbit is read with the quadrupole stepped and at its setpoint (the quadrupole
       toggles: two moves per point). Then this plane's corrector goes to the crossing it measured
       (``fit(points) -> corrector change``) and the next plane is scanned.
    3. The correctors and the quadrupole go back to their setpoints.

    ``pairs``: the pair of each plane with a corrector (both planes when available: the one not measured still
    centres the beam). Raises :class:`BBASkip` (after putting back what it moved) when a setpoint would leave
    its limits.
    """
    first = pairs[measure[0]]
    quad = machine.device(first.quad)
    cors = {p: machine.device(pr.corrector) for p, pr in pairs.items()}
    n = len(machine.bpm)
    k0 = float(quad.to_physics(sp_quad))
    up = _hw(quad, k0 * (1.0 + dk))
    th0 = {p: float(c.to_physics(sp_cors[p])) for p, c in cors.items()}
    key = first.bpm
    try:
        quad.limits.check(quad.name, up, quad.units)
    except Exception as err:  # noqa: BLE001 - a LimitError: this BPM cannot be measured
        raise BBASkip(f"{first.bpm}: {err}") from None
    out: dict[str, PointSet] = {}
    step = 0
    where = f"BBA of {first.bpm} ({first.quad})"
    dth_now = {"x": 0.0, "y": 0.0}

    def event(x_all: np.ndarray, qstep: float) -> MsgGenerator[None]:
        nonlocal step
        record.update(measurement=index, step=step, quad=quad_number, quad_step=qstep,
                      corrector_x=dth_now["x"], corrector_y=dth_now["y"], x=x_all[:n], y=x_all[n:])
        step += 1
        yield from emit(record)

    def set_cor(p: str, dth: float) -> MsgGenerator[None]:
        c = cors[p]
        v = _hw(c, th0[p] + dth)
        try:
            c.limits.check(c.name, v, c.units)
        except Exception as err:  # noqa: BLE001 - a LimitError
            raise BBASkip(f"{first.bpm} {p}: {c.name} would need {dth * 1e6:+.1f} urad: {err}") from None
        yield from move(c, v)
        counter.add(key)
        dth_now[p] = dth
        moved.add(p)

    moved: set[str] = set()
    is_up = False
    try:
        x0 = yield from _read(machine, n_avg, settle, f"{where}: reference orbit")
        yield from event(x0, 0.0)
        yield from move(quad, up)
        counter.add(key)
        is_up = True
        xp = yield from _read(machine, n_avg, settle, f"{where}: {first.quad} stepped by {dk:+.2%}")
        yield from event(xp, dk)
        q = model.quads[first.quad_index]
        dkl = k0 * dk * q.length
        centre: dict[str, float] = {}
        for p, pr in pairs.items():  # the model's estimate of the distance to the centre
            rows = slice(0, n) if p == "x" else slice(n, 2 * n)
            kick = kick_estimate(model, pr.quad_index, p, (xp - x0)[rows])
            u = (-kick if p == "x" else kick) / dkl if dkl else 0.0
            half = amplitude / abs(pr.r_quad)
            centre[p] = float(np.clip(-u / pr.r_quad, -3 * half, 3 * half)) if np.isfinite(u) else 0.0
        for k, p in enumerate(measure):
            pr = pairs[p]
            rows = slice(0, n) if p == "x" else slice(n, 2 * n)
            col = pr.bpm_index + (0 if p == "x" else n)
            for other in pairs:
                if other != p and other not in measure[:k] and abs(dth_now[other] - centre[other]) > 0:
                    yield from set_cor(other, centre[other])  # the other plane near its centre
            half = amplitude / abs(pr.r_quad)
            pts = out[p] = PointSet()
            thetas = []
            for dth in centre[p] + half * np.linspace(-1.0, 1.0, 2 * int(n_steps) + 1):
                yield from set_cor(p, float(dth))
                thetas.append(float(dth))
                xa = yield from _read(machine, n_avg, settle, f"{where}: {pr.corrector} at {dth * 1e6:+.1f} urad")
                yield from event(xa, dk if is_up else 0.0)
                yield from move(quad, sp_quad if is_up else up)
                counter.add(key)
                is_up = not is_up
                xb = yield from _read(machine, n_avg, settle, f"{where}: {pr.corrector} at {dth * 1e6:+.1f} urad, "
                                                              f"{pr.quad} {'stepped' if is_up else 'back'}")
                yield from event(xb, dk if is_up else 0.0)
                x_up, x_nom = (xb, xa) if is_up else (xa, xb)
                pts.add(x_up[col], pr.angle_term * dth, (x_up - x_nom)[rows])
            if k + 1 < len(measure) and fit is not None:  # this plane's beam to the crossing it measured
                crossing = fit(pts, np.array(thetas))
                if np.isfinite(crossing):
                    centre[p] = float(crossing)
                yield from set_cor(p, centre[p])
    finally:  # this BPM's magnets back (also when it is skipped or the plan stops)
        args: list[Any] = []
        for p in sorted(moved):
            args += [cors[p], sp_cors[p]]
        if is_up:
            args += [quad, sp_quad]
        if args:
            yield from move(*args)
            counter.add(key, len(args) // 2)
    return out


def block_sweep(machine, model: BbaModel, block: Block, *, index: int, quad_numbers: Sequence[int],
                sp_quads: Sequence[float], sp_cors: Sequence[float], levels: int, n_avg: int, settle: float,
                terms: dict[tuple[str, str], float], pairs_of: dict[int, list[BbaPair]], record: Record,
                counter: MoveCounter) -> MsgGenerator[dict[tuple[str, str], PointSet]]:
    """One block of the parallel method: for each level ``l = 1 .. levels`` the block's two correctors go to
    ``-theta l / levels`` (x and y at once), the quadrupoles are stepped one after the other (an orbit read after
    each), the correctors go to ``+theta l / levels`` and the quadrupoles are put back one after the other in the
    reverse order (an orbit read after each). Each quadrupole's orbit change is measured alone (the difference of
    two consecutive reads), at two mirrored orbits, with the same other quadrupoles stepped: one move per
    quadrupole and orbit.

    ``terms[(bpm, plane)]`` is the model's angle term of the block's corrector for that BPM;
    the other quadrupoles already stepped add their kicks' angle terms (their kicks estimated from their own orbit
    changes).

    Returns the bow-tie points per ``(bpm, plane)``.
    """
    n = len(machine.bpm)
    cors = [machine.device(c) for c in block.correctors]
    quads = [machine.device(model.quads[q].name) for q in block.quads]
    th0 = [float(c.to_physics(sp)) for c, sp in zip(cors, sp_cors)]
    ups = [_hw(qd, float(qd.to_physics(sp)) * (1.0 + s * d)) for qd, sp, s, d in
           zip(quads, sp_quads, block.signs, block.dk)]
    for qd, v in zip(quads, ups):
        qd.limits.check(qd.name, v, qd.units)
    for lev in range(1, levels + 1):
        for c, t0, th in zip(cors, th0, block.theta):
            for sgn in (-1, 1):
                c.limits.check(c.name, _hw(c, t0 + sgn * th * lev / levels), c.units)
    key = ("block", index)
    out: dict[tuple[str, str], PointSet] = {}
    step = 0
    where = f"BBA block {index} ({len(quads)} quadrupoles, {block.correctors[0]}, {block.correctors[1]})"
    state = {"cor": False, "up": set()}

    def event(x_all: np.ndarray, j: int, qstep: float, dth: tuple[float, float]) -> MsgGenerator[None]:
        nonlocal step
        record.update(measurement=index, step=step, quad=-1 if j < 0 else quad_numbers[j], quad_step=qstep,
                      corrector_x=dth[0], corrector_y=dth[1], x=x_all[:n], y=x_all[n:])
        step += 1
        yield from emit(record)

    def points(xs: list[np.ndarray], side: float, lev: int) -> None:
        """Bow-tie points of every quadrupole from the reads xs[0] (before any step) .. xs[G] (all stepped)."""
        dth = {p: side * block.theta[k] * lev / levels for k, p in enumerate(PLANES)}
        for p in PLANES:
            rows = slice(0, n) if p == "x" else slice(n, 2 * n)
            kicks: list[float] = []
            for j, q in enumerate(block.quads):
                d = (xs[j + 1] - xs[j])[rows]
                for pair in pairs_of.get(q, []):
                    if pair.plane != p:
                        continue
                    corr = terms[(pair.bpm, p)] * dth[p]
                    for k in range(j):  # the quadrupoles stepped before this one: their kicks move the angle
                        qk = block.quads[k]
                        rb = model.bpm_response_to_quads([pair.bpm_index], [qk], p)[0, 0]
                        rq = model.quad_response_to_quads([q], [qk], p)[0, 0]
                        corr += (rb - pair.m11 * rq) * kicks[k]
                    out.setdefault((pair.bpm, p), PointSet()).add(xs[j + 1][pair.bpm_index + (0 if p == "x" else n)],
                                                                 corr, d)
                kicks.append(kick_estimate(model, q, p, d))

    try:
        for lev in range(1, levels + 1):
            dm = tuple(-th * lev / levels for th in block.theta)
            args: list[Any] = []
            for c, t0, d in zip(cors, th0, dm):
                args += [c, _hw(c, t0 + d)]
            yield from move(*args)
            counter.add(key, len(cors))
            state["cor"] = True
            xs = [(yield from _read(machine, n_avg, settle, f"{where}: orbit {lev}-"))]
            yield from event(xs[0], -1, 0.0, dm)
            for j, (qd, v) in enumerate(zip(quads, ups)):
                yield from move(qd, v)
                counter.add(key)
                state["up"].add(j)
                xs.append((yield from _read(machine, n_avg, settle, f"{where}: orbit {lev}-, {qd.name} stepped")))
                yield from event(xs[-1], j, block.signs[j] * block.dk[j], dm)
            points(xs, -1.0, lev)
            dp = tuple(th * lev / levels for th in block.theta)
            args = []
            for c, t0, d in zip(cors, th0, dp):
                args += [c, _hw(c, t0 + d)]
            yield from move(*args)
            counter.add(key, len(cors))
            back = [(yield from _read(machine, n_avg, settle, f"{where}: orbit {lev}+"))]
            yield from event(back[0], -1, 0.0, dp)
            for j in reversed(range(len(quads))):
                yield from move(quads[j], sp_quads[j])
                counter.add(key)
                state["up"].discard(j)
                back.append((yield from _read(machine, n_avg, settle, f"{where}: orbit {lev}+, {quads[j].name} back")))
                yield from event(back[-1], j, 0.0, dp)
            points(back[::-1], 1.0, lev)
    finally:
        args = []
        if state["cor"]:
            for c, sp in zip(cors, sp_cors):
                args += [c, sp]
        for j in sorted(state["up"]):
            args += [quads[j], sp_quads[j]]
        if args:
            yield from move(*args)
            counter.add(key, len(args) // 2)
    return out
