"""Closed local orbit bumps (MML's ``setorbitbump``): choose correctors, solve, refine from measurements.

A bump moves the orbit at one BPM (position, optionally angle) and leaves it unchanged outside the span of its
correctors. Physics to keep in mind on a ring at fixed RF frequency: a horizontal bump through dispersive
locations changes the path length by ``sum(eta_w * theta_w)``, the beam energy follows and the *whole* orbit moves
by ``eta * dp``. Three correctors cannot close that (three conditions: amplitude, position and angle after the
bump); a fourth corrector or the RF frequency as an extra variable can. :func:`needs_rf` says when.

The solve is a constrained least squares: ``minimise ||R_out k - b_out||`` subject to ``C k = d`` (the amplitude
row and, for angle bumps, the angle row), with a tiny Tikhonov term picking the smallest kicks among exact
solutions.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..profile import Profile
from ._common import FloatArray, resolve_profile
from .orm import OrbitResponse

__all__ = ["BumpGeometry", "bump_geometry", "choose_bump_correctors", "constrained_lstsq", "solve_bump",
           "angle_response", "angle_rows_hw", "needs_rf", "BumpSolution", "aux_correctors", "free_segment",
           "angle_from_orbit"]


def constrained_lstsq(r_out: npt.ArrayLike, b_out: npt.ArrayLike, c: npt.ArrayLike, d: npt.ArrayLike,
                      ridge: float = 1e-9) -> FloatArray:
    """``argmin ||r_out k - b_out||^2 + ridge^2 ||k||^2 * scale`` subject to ``c k = d`` (KKT system).

    ``ridge`` is relative to the norm of ``r_out`` (it only selects the smallest solution among exact ones).
    """
    r = np.asarray(r_out, dtype=float)
    b = np.asarray(b_out, dtype=float)
    cm = np.atleast_2d(np.asarray(c, dtype=float))
    dv = np.atleast_1d(np.asarray(d, dtype=float))
    n = r.shape[1]
    scale = max(float(np.linalg.norm(r)) ** 2, 1e-300)
    h = r.T @ r + (ridge ** 2) * scale * np.eye(n)
    kkt = np.block([[h, cm.T], [cm, np.zeros((cm.shape[0], cm.shape[0]))]])
    rhs = np.concatenate([r.T @ b, dv])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:n]


@dataclass
class BumpGeometry:
    """Where a bump is: s positions and which BPMs lie inside the span of its correctors."""

    s_bpm: FloatArray  # (n,) s of every BPM [m]
    s_cor: dict[str, float]  # corrector name -> s [m]
    circumference: float

    def upstream(self, s_point: float, name: str) -> float:
        """Distance [m] from corrector ``name`` downstream to ``s_point`` (wrapping around the ring)."""
        return (s_point - self.s_cor[name]) % self.circumference

    def downstream(self, s_point: float, name: str) -> float:
        return (self.s_cor[name] - s_point) % self.circumference

    def inside(self, s_point: float, correctors: Sequence[str]) -> np.ndarray:
        """(n,) mask of the BPMs inside the span of ``correctors`` around ``s_point``."""
        half = self.circumference / 2
        up = [self.upstream(s_point, c) for c in correctors if self.upstream(s_point, c) <= half]
        dn = [self.downstream(s_point, c) for c in correctors if self.upstream(s_point, c) > half]
        a = max(up) if up else 0.0
        b = max(dn) if dn else 0.0
        start = s_point - a
        return ((self.s_bpm - start) % self.circumference) <= a + b


def bump_geometry(profile: Profile, orm: OrbitResponse | None = None, lattice=None) -> BumpGeometry:
    """s positions of the profile's BPMs and correctors (from the design lattice)."""
    ring = profile.load_lattice() if lattice is None else lattice
    s = ring.get_s_pos(range(len(ring) + 1))
    s_cor: dict[str, float] = {}
    for fam in profile.families_of_type("hcor", "vcor").values():
        for i, name in enumerate(fam.device_names):
            s_cor[name] = float(s[int(fam.refpts[i])])
    return BumpGeometry(np.asarray(s[profile.bpm_refpts], dtype=float), s_cor, float(ring.circumference))


def angle_response(source: Any, bpm: int, correctors: Sequence[str], *, lattice=None,
                   delta: float = 1e-5) -> tuple[FloatArray, FloatArray]:
    """Model (position, angle) response at BPM ``bpm`` to each corrector [m/rad, rad/rad] (4D, fixed path).

    Finite differences of pyAT ``find_orbit4(dct=0)`` on the design lattice: exact for the model.
    """
    import at

    from .orm import _get_field, _set_field

    prof = resolve_profile(source)
    ring = prof.load_lattice() if lattice is None else lattice.deepcopy()
    ref = int(prof.bpm_refpts[bpm])
    pos = np.zeros(len(correctors))
    ang = np.zeros(len(correctors))
    fams = prof.families_of_type("hcor", "vcor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = {d: (f, i) for f, fam in fams.items() for i, d in enumerate(fam.device_names)}
        for j, name in enumerate(correctors):
            fam, i = where[name]
            spec = fams[fam].spec
            attr, index = spec.field_parts
            el = ring[int(fams[fam].refpts[i])]
            v0 = _get_field(el, attr, index)
            plane = 0 if spec.type == "hcor" else 2
            out = []
            for sgn in (+1, -1):
                _set_field(el, attr, index, v0 + sgn * delta)
                _, o = at.find_orbit4(ring, refpts=[ref], dct=0.0)
                out.append(o[0])
            _set_field(el, attr, index, v0)
            pos[j] = (out[0][plane] - out[1][plane]) / (2 * delta)
            ang[j] = (out[0][plane + 1] - out[1][plane + 1]) / (2 * delta)
    return pos, ang


def angle_rows_hw(source: Any, orm: OrbitResponse, bpm: int, correctors: Sequence[str], *,
                  lattice=None) -> dict[str, float]:
    """Model angle change at BPM ``bpm`` per A of each corrector [rad/A] (nominal calibration of the ORM)."""
    _, ang = angle_response(source, bpm, correctors, lattice=lattice)
    cal = orm.calibration()
    return {c: float(a * cal[orm.corrector_index(c)]) for c, a in zip(correctors, ang)}


def free_segment(geometry: BumpGeometry, bpm: int, correctors: Sequence[str]) -> np.ndarray:
    """Indices of the BPMs between the bump correctors nearest to BPM ``bpm`` (upstream and downstream): there
    the orbit change is a free betatron motion, so their readings give the angle at the BPM."""
    circ = geometry.circumference
    s0 = float(geometry.s_bpm[bpm])
    up = min((geometry.upstream(s0, c) for c in correctors if geometry.upstream(s0, c) <= circ / 2), default=0.0)
    dn = min((geometry.downstream(s0, c) for c in correctors if geometry.upstream(s0, c) > circ / 2),
             default=0.0)
    rel = (geometry.s_bpm - s0 + up) % circ
    return np.nonzero(rel <= up + dn)[0]


def angle_from_orbit(source: Any, bpm: int, plane: str, change: FloatArray, segment: Sequence[int], *,
                     lattice=None) -> float | None:
    """Angle change [rad] at BPM ``bpm`` fitted to the orbit change [m] (2n, readings) at the BPMs of a free
    segment (see :func:`free_segment`) with the model's transfer matrices; ``None`` with fewer than 2 BPMs or a
    segment across the lattice origin."""
    import at

    seg = [int(j) for j in segment]
    if len(seg) < 2 or bpm not in seg:
        return None
    prof = resolve_profile(source)
    refs = np.asarray(prof.bpm_refpts)[seg]
    if np.any(np.diff(refs.astype(np.int64)) <= 0):  # wraps around the origin: keep it simple, no estimate
        return None
    ring = prof.load_lattice() if lattice is None else lattice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ms = at.find_m44(ring, 0.0, refpts=refs)
    k = 0 if plane == "x" else 2
    i0 = seg.index(bpm)
    inv0 = np.linalg.inv(ms[i0])
    n = len(prof.bpm_refpts)
    rows, vals = [], []
    for i, j in enumerate(seg):
        t = ms[i] @ inv0
        rows.append([t[k, k], t[k, k + 1]])
        vals.append(change[j] if plane == "x" else change[n + j])
    sol = np.linalg.lstsq(np.asarray(rows), np.asarray(vals), rcond=None)[0]
    return float(sol[1])


def needs_rf(plane: str, n_correctors: int, angle: bool, orm: OrbitResponse | None = None) -> bool:
    """True when the bump cannot close at fixed RF frequency with its correctors alone (see module doc).

    Horizontal bumps with 3 correctors (position) or 4 (position + angle) through dispersive locations;
    vertical bumps never (no vertical dispersion in the model).
    """
    if plane != "x":
        return False
    dof = n_correctors - (2 if angle else 1)
    return dof < 3


@dataclass
class BumpSolution:
    """A solved bump: corrector steps and what the model/ORM predicts.

    Attributes:
        correctors: device names of the bump's correctors.
        step_hw: (k,) corrector changes [A].
        step_physics: (k,) kick changes [rad] (nominal calibration).
        rf_step: RF frequency change [Hz] (0 unless the RF closes the bump).
        bpm: index of the bump's BPM; plane ``"x"``/``"y"``.
        amplitude: requested reading change at the BPM [m]; angle: requested angle [rad] or None.
        inside: (n,) mask of BPMs inside the span.
        predicted: (2n,) predicted reading change [m].
        leakage_rms: predicted rms change outside the span [m].
    """

    correctors: list[str]
    step_hw: FloatArray
    step_physics: FloatArray
    rf_step: float
    bpm: int
    plane: str
    amplitude: float
    angle: float | None
    inside: np.ndarray
    predicted: FloatArray
    leakage_rms: float
    notes: list[str] = field(default_factory=list)


def _system(orm: OrbitResponse, bpm: int, plane: str, correctors: Sequence[str], inside: np.ndarray,
            use_rf: bool, angle_row: FloatArray | None, n_aux: int = 0):
    n = orm.nbpm
    cols = [orm.corrector_index(c) for c in correctors]
    r = orm.matrix_hw[:, cols]
    if use_rf:
        if orm.rf is None:
            raise ValueError("this bump needs the RF frequency as a variable but the ORM has no RF column")
        r = np.column_stack([r, orm.rf])
    out = np.concatenate([~inside, ~inside])
    row = bpm if plane == "x" else n + bpm
    c_rows = [r[row]]
    if angle_row is not None:
        a = np.concatenate([np.asarray(angle_row, dtype=float), np.zeros(n_aux)])
        c_rows.append(np.append(a, 0.0) if use_rf else a)
    return r, out, np.array(c_rows)


def solve_bump(orm: OrbitResponse, bpm: int, plane: str, amplitude: float, correctors: Sequence[str],
               inside: np.ndarray, *, angle: float | None = None, angle_row_hw: FloatArray | None = None,
               use_rf: bool = False, residual: FloatArray | None = None,
               current_angle: float = 0.0, aux: Sequence[str] = ()) -> BumpSolution:
    """Corrector steps [A] (and RF step [Hz]) that make the bump, or refine it from a measured residual.

    Args:
        orm: response (hardware units used; must contain ``correctors`` and, if ``use_rf``, the RF column).
        bpm: BPM index; plane: ``"x"`` or ``"y"``.
        amplitude: wanted reading change at the BPM [m] (total, relative to the orbit before the bump).
        correctors: the bump's correctors.
        inside: (n,) mask of BPMs inside the span (free); outside must not move.
        angle: wanted angle change at the BPM [rad] (needs ``angle_row_hw``: rad per A of each corrector).
        use_rf: RF frequency as an extra variable.
        residual: (2n,) measured change so far [m] (readings minus the reference): the solution then corrects
            what is still missing (``amplitude - residual[bpm]`` and ``-residual`` outside).
        current_angle: angle change already made [rad] (model), for refinement.
        aux: correctors of the other plane (at the bump's locations) that may cancel what x-y coupling leaks
            into the other plane; they stay at 0 unless a measured residual needs them.

    The returned ``correctors``/``step_hw`` list the bump's correctors then ``aux``.
    """
    allc = list(correctors) + list(aux)
    r, out, cmat = _system(orm, bpm, plane, allc, inside,
                           use_rf, None if angle is None else np.asarray(angle_row_hw, dtype=float), len(aux))
    n = orm.nbpm
    row = bpm if plane == "x" else n + bpm
    res = np.zeros(2 * n) if residual is None else np.where(np.isfinite(residual), residual, 0.0)
    valid = out & (np.isfinite(residual) if residual is not None else True)
    d = [amplitude - res[row]]
    if angle is not None:
        d.append(angle - current_angle)
    # RF column is in m/Hz: scale it like a corrector so the ridge term treats variables alike
    scale = np.ones(r.shape[1])
    if use_rf:
        cn = np.linalg.norm(r[:, :-1], axis=0).mean()
        scale[-1] = cn / max(np.linalg.norm(r[:, -1]), 1e-300)
    rs = r * scale
    k = constrained_lstsq(rs[valid], -res[valid], cmat * scale, d) * scale
    rf_step = float(k[-1]) if use_rf else 0.0
    khw = k[:-1] if use_rf else k
    cal = orm.calibration()[[orm.corrector_index(c) for c in allc]]  # rad/A
    pred = r @ k
    leak = pred[out] + res[out]
    return BumpSolution(correctors=allc, step_hw=khw, step_physics=khw * cal, rf_step=rf_step,
                        bpm=bpm, plane=plane, amplitude=amplitude, angle=angle, inside=inside, predicted=pred,
                        leakage_rms=float(np.sqrt(np.mean(leak ** 2))) if leak.size else 0.0)


def aux_correctors(orm: OrbitResponse, correctors: Sequence[str], plane: str, geometry: BumpGeometry,
                   exclude: Sequence[str] = ()) -> list[str]:
    """For each bump corrector, the other plane's corrector nearest in s (same magnet when it has both
    windings): the variables that close the leakage x-y coupling puts into the other plane."""
    other = "y" if plane == "x" else "x"
    excl = set(exclude)
    pool = [c for c, p in zip(orm.corrector_names, orm.planes) if p == other and c not in excl
            and c in geometry.s_cor]
    if not pool:
        return []
    circ = geometry.circumference
    out: list[str] = []
    for c in correctors:
        s0 = geometry.s_cor[c]
        best = min(pool, key=lambda q: min((geometry.s_cor[q] - s0) % circ, (s0 - geometry.s_cor[q]) % circ))
        if best not in out:
            out.append(best)
    return out


def choose_bump_correctors(orm: OrbitResponse, profile: Profile, bpm: int, plane: str, n_correctors: int = 3,
                           *, angle: bool | float | None = False, use_rf: bool | None = None,
                           exclude: Sequence[str] = (), geometry: BumpGeometry | None = None,
                           candidates: int = 3, max_candidates: int = 6, amplitude: float = 1e-3,
                           headroom: dict[str, tuple[float, float]] | None = None,
                           angle_rows: dict[str, float] | None = None,
                           lattice=None) -> tuple[list[str], np.ndarray]:
    """The nearest usable correctors around BPM ``bpm`` for a bump in ``plane``.

    Considers the ``candidates`` nearest correctors of the plane upstream and downstream (in service, in the
    ORM, not excluded); for 3 correctors 1+2 or 2+1 around the point, for 4 correctors 2+2. Among those, picks
    the set with the smallest largest kick for the requested bump (the nearest correctors can be almost
    degenerate in phase and need huge kicks). If no set fits the correctors' ``headroom`` (name -> (room down,
    room up) [A]), more candidates are tried, up to ``max_candidates`` per side.

    Args:
        angle: ``False``/``None`` for a position bump, else the requested angle [rad] (``True`` = 0 rad).

    Returns:
        the names and the inside-span mask.

    Raises:
        LimitError: no set of the nearest correctors can make this bump within the limits (the message gives
            the largest amplitude that fits).
    """
    from ..profile import LimitError

    if n_correctors not in (3, 4):
        raise ValueError(f"n_correctors must be 3 or 4, got {n_correctors}")
    want_angle = angle is not None and angle is not False
    ang_val = 0.0 if (angle is True or not want_angle) else float(angle)
    geo = geometry or bump_geometry(profile)
    s0 = float(geo.s_bpm[bpm])
    excl = set(exclude)
    pool = [c for c, p in zip(orm.corrector_names, orm.planes) if p == plane and c not in excl and c in geo.s_cor]
    if len(pool) < n_correctors:
        raise ValueError(f"only {len(pool)} usable {plane} correctors in the ORM; a bump needs {n_correctors}")
    half = geo.circumference / 2
    up_all = sorted((c for c in pool if geo.upstream(s0, c) <= half), key=lambda c: geo.upstream(s0, c))
    dn_all = sorted((c for c in pool if geo.upstream(s0, c) > half), key=lambda c: geo.downstream(s0, c))
    splits = [(2, 2)] if n_correctors == 4 else [(1, 2), (2, 1)]
    rf = needs_rf(plane, n_correctors, want_angle) if use_rf is None else use_rf
    rows = dict(angle_rows or {})
    tried: set[tuple[str, ...]] = set()
    best_any = None
    for k in range(candidates, max(candidates, max_candidates) + 1):
        up, dn = up_all[:k], dn_all[:k]
        if want_angle:
            missing = [c for c in up + dn if c not in rows]
            if missing:
                rows.update(angle_rows_hw(profile, orm, bpm, missing, lattice=lattice))
        best = None
        for nu, nd in splits:
            for cu, cd in itertools.product(itertools.combinations(up, nu), itertools.combinations(dn, nd)):
                cors = list(cu) + list(cd)
                if tuple(cors) in tried:
                    continue
                tried.add(tuple(cors))
                inside = geo.inside(s0, cors)
                arow = np.array([rows[c] for c in cors]) if want_angle else None
                try:
                    sol = solve_bump(orm, bpm, plane, amplitude, cors, inside,
                                     angle=ang_val if want_angle else None, angle_row_hw=arow,
                                     use_rf=rf and orm.rf is not None)
                except np.linalg.LinAlgError:
                    continue
                if not np.all(np.isfinite(sol.step_hw)):
                    continue
                # the closure in the model must be (nearly) exact, else the set is degenerate
                big = float(np.max(np.abs(sol.step_hw)))
                score = big * (1.0 + 1e3 * sol.leakage_rms / max(abs(amplitude), 1e-9))
                # fraction of the request that fits in the correctors' headroom
                fit = 1.0
                if headroom is not None:
                    for c, v in zip(cors, sol.step_hw):
                        lo, hi = headroom.get(c, (-np.inf, np.inf))
                        if v > hi:
                            fit = min(fit, hi / v if v else 1.0)
                        elif v < lo:
                            fit = min(fit, lo / v if v else 1.0)
                cand = (score, cors, inside, fit)
                if fit >= 1.0 and (best is None or score < best[0]):
                    best = cand
                if best_any is None or fit > best_any[3] or (fit == best_any[3] and score < best_any[0]):
                    best_any = cand
        if best is not None:
            return best[1], best[2]
    names = list(profile.bpm_names)
    where = f"{names[bpm]} (BPM index {bpm})" if 0 <= bpm < len(names) else f"BPM index {bpm}"
    if best_any is None:
        raise ValueError(f"no usable corrector set around {where} in plane {plane}")
    raise LimitError(
        f"a {plane} bump of {amplitude * 1e3:g} mm at {where} does not fit in the corrector limits with "
        f"the {max_candidates} nearest correctors on each side; the best set {best_any[1]} allows about "
        f"{abs(amplitude) * best_any[3] * 1e3:.3g} mm. Nothing was changed.")
