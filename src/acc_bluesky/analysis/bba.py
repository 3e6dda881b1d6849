"""Beam-based alignment (BBA): the reading of each BPM when the beam passes through the magnetic centre of its
quadrupole (MML's ``quadcenter``), one BPM at a time or all of them over shared orbits. Pure numpy/pyAT.

**The measurement.** A quadrupole stepped by ``dK`` kicks the beam by ``-dK L (x_q - c)``: the closed orbit does
not change when the beam passes through the centre ``c``. Over several orbits (correctors moved) the orbit change of
the step is measured at every BPM; all BPMs see the same kick, so the changes form a rank-1 matrix (direction x
signal) whose signal, fitted against the reading of the BPM next to the quadrupole, crosses zero at the offset: the
*bow-tie*, without any model (:func:`bowtie_fit`).

**What the offset is.** The BPM is not at the quadrupole (up to 1.7 m on EBS): between them the beam moves by its
angle, and a scan that changes the angle at the quadrupole finds a reading that depends on the scan. Here the
offset is the BPM reading when the beam passes through the centre **with the angle it had at the quadrupole on the
orbit the measurement started from** (the operating orbit): the golden-orbit target of the BPM, the same for any
corrector and for both methods. The part of each BPM change made by the angle change at the quadrupole (the
model's ``R_bc - m11 R_qc`` per corrector, ``m11`` the transfer from the quadrupole centre to the BPM) is taken
out of the abscissa before the fit. The corrector is chosen so this correction is small (the largest response at
the quadrupole among those whose orbit wave has an extremum there); its model error (a few per cent) is the
systematic part of the uncertainty (``model_error`` x the correction at the crossing). The "geometric" offset
(the reading of a beam at the magnet's centre, the BPM offset and the magnet offset alone) differs from it by the
beam angle times the distance: about 11 um rms on the corrected EBS orbit; BBA cannot measure it without the
absolute beam angle.

**Quadcenter** (one BPM at a time): a probe step estimates from the model how far the beam is from the centre in
both planes; the other plane's corrector puts the beam near its centre (a beam off-centre in the other plane
leaks its kick through the coupling into this plane's orbit change); this plane's corrector is scanned around the
estimated crossing with the quadrupole toggling at each point.

**Parallel** (this package's design): every quadrupole still makes its orbit change alone, but the orbits are
shared. The quadrupoles are put in blocks, each with one x and one y corrector (three per plane, spread by 60
degrees in phase, so every quadrupole has one whose wave has an extremum near it). Per block the two correctors go
to ``-theta``, the quadrupoles are stepped one after the other (an orbit read after each), the correctors go to
``+theta`` and the quadrupoles go back one after the other: the difference of two consecutive reads is one
quadrupole's orbit change, at two mirrored orbits, with the same other quadrupoles stepped (their kicks' angle
change at the quadrupole corrected like the corrector's). One magnet move per quadrupole and orbit for both planes
of its BPMs: about 2 moves per BPM instead of 26 for quadcenter on EBS.

Simultaneous steps of many quadrupoles, separated by their model responses (after X. Huang, arXiv:2203.14869),
were tried first and rejected: the separation depends on the model's responses, whose 4-5 % errors on a corrected,
errored EBS leak the other quadrupoles' kicks into each one's (2-5 um errors); it saves no move either (each
quadrupole still moves up and down at each orbit). Sharing the orbits is what saves the moves.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ..profile import Profile
from ._common import FloatArray, resolve_profile, rms, run_results, tool_run_start

__all__ = [
    "BBAResult",
    "BbaModel",
    "BbaPair",
    "Block",
    "BowtieFit",
    "bba_model",
    "bba_pairs",
    "bowtie_fit",
    "fit_bba",
    "individually_powered",
    "kick_estimate",
    "parallel_blocks",
    "quadrupole_step",
    "shared_correctors",
    "true_offset",
    "true_orbit_at_quads",
]

PLANES = ("x", "y")


# ======================================================================================================
# the model: linear optics of the design lattice at the BPMs, the quadrupole centres and the correctors
@dataclass
class _Optics:
    """Uncoupled linear optics at some points, per plane (index 0 = x, 1 = y): arrays (n, 2)."""

    s: FloatArray
    beta: FloatArray
    alpha: FloatArray
    mu: FloatArray
    eta: FloatArray  # (n, 2): eta_x, eta_y
    etap: FloatArray


@dataclass
class _Quad:
    name: str
    family: str
    index: int
    refpt: int
    length: float
    k: float  # design gradient [m^-2]
    in_service: bool


class BbaModel:
    """The design lattice's linear optics where BBA needs it (4D, uncoupled, fixed path length as the twin).

    Built once per profile (:func:`bba_model` caches it): the lattice is split with markers at the centre of every
    quadrupole of a quadrupole family, of every corrector and at every BPM, and ``at.get_optics`` evaluated there.

    Attributes:
        quads: every quadrupole device of the profile's quadrupole families (name, family, index, refpt, length,
            design gradient, in service).
        tunes: (2,) full tunes; ``mcf`` momentum compaction; ``circumference`` [m].
    """

    def __init__(self, profile: Profile, lattice: Any = None):
        import at

        self.profile = profile
        ring = profile.load_lattice() if lattice is None else lattice.deepcopy()
        if getattr(ring, "is_6d", False):
            ring = ring.disable_6d(copy=True)
        spos = np.asarray(ring.get_s_pos(range(len(ring) + 1)), dtype=float)
        self.circumference = float(spos[-1])  # the lattice as tracked (one period of a periodic lattice)
        self.quads: list[_Quad] = []
        for fname, fam in profile.families.items():
            if fam.spec.type != "quadrupole":
                continue
            for i, r in enumerate(np.asarray(fam.refpts).tolist()):
                e = ring[int(r)]
                k = float(np.asarray(getattr(e, "PolynomB", [0.0, 0.0]))[1]) if len(getattr(e, "PolynomB", [])) > 1 \
                    else 0.0
                self.quads.append(_Quad(fam.device_names[i], fname, i, int(r), float(e.Length), k, i not in fam.bad))
        self.correctors: dict[str, tuple[str, int, int, str, bool]] = {}
        for fname, fam in profile.families_of_type("hcor", "vcor").items():
            plane = "x" if fam.spec.type == "hcor" else "y"
            for i, r in enumerate(np.asarray(fam.refpts).tolist()):
                self.correctors[fam.device_names[i]] = (fname, i, int(r), plane, i not in fam.bad)
        self.bpm_names = list(profile.bpm_names)
        bpm_refs = np.asarray(profile.bpm_refpts, dtype=int)
        # break points: BPMs (zero length: at their s), quadrupole and corrector centres
        pts = [("b", k, float(spos[r])) for k, r in enumerate(bpm_refs.tolist())]
        pts += [("q", k, float(spos[q.refpt] + q.length / 2)) for k, q in enumerate(self.quads)]
        cor_names = list(self.correctors)
        for k, c in enumerate(cor_names):
            r = self.correctors[c][2]
            pts.append(("c", k, float(spos[r] + ring[r].Length / 2)))
        order = sorted(range(len(pts)), key=lambda j: (pts[j][2], j))
        markers = [at.Marker(f"BBA_{j:05d}") for j in order]
        with single_thread_blas(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split = ring.sbreak(np.array([min(pts[j][2], self.circumference) for j in order]), markers)
            where = {e.FamName: i for i, e in enumerate(split) if e.FamName.startswith("BBA_")}
            refs = np.array([where[f"BBA_{j:05d}"] for j in range(len(pts))], dtype=np.int64)
            asc = np.argsort(refs, kind="stable")
            _, _, elem = at.get_optics(split, refpts=np.append(refs[asc], len(split)).astype(np.uint32))
        self.tunes = np.asarray(elem.mu[-1, :2], dtype=float) / (2 * np.pi)  # full tunes: phase over the ring
        back = np.empty_like(asc)
        back[asc] = np.arange(len(asc))
        elem = elem[:-1][back]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mcf = float(at.get_mcf(ring))
        opt = _Optics(s=np.array([p[2] for p in pts]), beta=np.asarray(elem.beta, float),
                      alpha=np.asarray(elem.alpha, float), mu=np.asarray(elem.mu[:, :2], float),
                      eta=np.asarray(elem.dispersion[:, [0, 2]], float),
                      etap=np.asarray(elem.dispersion[:, [1, 3]], float))
        kinds = np.array([p[0] for p in pts])

        def take(kind: str) -> _Optics:
            sel = np.nonzero(kinds == kind)[0]
            return _Optics(*(getattr(opt, f)[sel] for f in ("s", "beta", "alpha", "mu", "eta", "etap")))

        self.bpm = take("b")
        self.quad = take("q")
        self.cor = take("c")
        self._cor_index = {c: k for k, c in enumerate(cor_names)}
        self._quad_index = {q.name: k for k, q in enumerate(self.quads)}

    # -- lookups ----------------------------------------------------------------------------------------
    def quad_index(self, name: str) -> int:
        try:
            return self._quad_index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a quadrupole of a quadrupole family of profile "
                           f"{self.profile.name!r}; quadrupoles: {self.quads[0].name} ... "
                           f"{self.quads[-1].name}") from None

    def corrector_index(self, name: str) -> int:
        try:
            return self._cor_index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a corrector of profile {self.profile.name!r}") from None

    def bpm_index(self, name: str | int) -> int:
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < len(self.bpm_names):
                raise KeyError(f"BPM index {name} out of range 0..{len(self.bpm_names) - 1}")
            return int(name)
        try:
            return self.bpm_names.index(str(name))
        except ValueError:
            raise KeyError(f"no BPM named {name!r} in profile {self.profile.name!r}; BPMs: "
                           f"{self.bpm_names[0]} ... {self.bpm_names[-1]}") from None

    def corrector_plane(self, name: str) -> str:
        return self.correctors[name][3]

    def distance(self, bpm: int, quad: int) -> float:
        """Distance [m] along the ring between BPM ``bpm`` and the centre of quadrupole ``quad`` (shortest way)."""
        d = abs(self.bpm.s[bpm] - self.quad.s[quad]) % self.circumference
        return float(min(d, self.circumference - d))

    # -- responses --------------------------------------------------------------------------------------
    def _response(self, obs: _Optics, io: npt.ArrayLike, kick: _Optics, ik: npt.ArrayLike, plane: str,
                  angle: bool = False) -> FloatArray:
        """Closed-orbit response (fixed path length) at observation points ``io`` to kicks at ``ik``:
        position [m/rad] or, with ``angle``, angle [rad/rad]. Shape (len(io), len(ik))."""
        p = PLANES.index(plane)
        io = np.atleast_1d(np.asarray(io, dtype=int))
        ik = np.atleast_1d(np.asarray(ik, dtype=int))
        nu = self.tunes[p]
        bo, bk = obs.beta[io, p][:, None], kick.beta[ik, p][None, :]
        dmu = obs.mu[io, p][:, None] - kick.mu[ik, p][None, :]
        ph = np.abs(dmu) - np.pi * nu
        den = 2.0 * np.sin(np.pi * nu)
        disp = obs.eta[io, p][:, None] * kick.eta[ik, p][None, :] / (self.mcf * self.circumference)
        if not angle:
            return np.sqrt(bo * bk) * np.cos(ph) / den - disp
        ao = obs.alpha[io, p][:, None]
        dispp = obs.etap[io, p][:, None] * kick.eta[ik, p][None, :] / (self.mcf * self.circumference)
        return np.sqrt(bk / bo) * (-ao * np.cos(ph) - np.sign(dmu) * np.sin(ph)) / den - dispp

    def quad_response(self, quads: Sequence[int], correctors: Sequence[str], plane: str,
                      angle: bool = False) -> FloatArray:
        """Position [m/rad] (or angle [rad/rad]) at quadrupole centres to correctors (len(quads), len(cors))."""
        ik = [self.corrector_index(c) for c in correctors]
        return self._response(self.quad, quads, self.cor, ik, plane, angle)

    def bpm_response(self, bpms: Sequence[int], correctors: Sequence[str], plane: str) -> FloatArray:
        """Position at BPMs [m/rad] to correctors (len(bpms), len(cors))."""
        ik = [self.corrector_index(c) for c in correctors]
        return self._response(self.bpm, bpms, self.cor, ik, plane)

    def bpm_response_to_quads(self, bpms: Sequence[int], quads: Sequence[int], plane: str) -> FloatArray:
        """Position at BPMs [m/rad] to kicks at quadrupole centres (len(bpms), len(quads))."""
        return self._response(self.bpm, bpms, self.quad, quads, plane)

    def quad_response_to_quads(self, obs: Sequence[int], quads: Sequence[int], plane: str) -> FloatArray:
        """Position at quadrupole centres [m/rad] to kicks at quadrupole centres."""
        return self._response(self.quad, obs, self.quad, quads, plane)

    def transfer(self, quad: int, bpm: int, plane: str) -> tuple[float, float]:
        """``(m11, m12)`` of the transfer from the quadrupole centre to the BPM (either direction) in ``plane``:
        a position change ``dx`` and angle change ``dx'`` at the centre move the BPM by ``m11 dx + m12 dx'``."""
        p = PLANES.index(plane)
        bq, aq, mq = self.quad.beta[quad, p], self.quad.alpha[quad, p], self.quad.mu[quad, p]
        bb, mb = self.bpm.beta[bpm, p], self.bpm.mu[bpm, p]
        d = mb - mq
        return (float(np.sqrt(bb / bq) * (np.cos(d) + aq * np.sin(d))), float(np.sqrt(bb * bq) * np.sin(d)))

    def transfer_matrix(self, a: tuple[str, int], b: tuple[str, int], plane: str,
                        forward: bool = False) -> FloatArray:
        """2x2 transfer matrix in ``plane`` from point ``a`` to point ``b``, each point ``("q", quad index)`` (a
        quadrupole centre) or ``("b", bpm index)``: backwards if ``b`` is upstream, unless ``forward`` (then
        through the end of the lattice: a turn's phase added)."""
        p = PLANES.index(plane)
        oa = self.quad if a[0] == "q" else self.bpm
        ob = self.quad if b[0] == "q" else self.bpm
        b1, a1, m1 = oa.beta[a[1], p], oa.alpha[a[1], p], oa.mu[a[1], p]
        b2, a2, m2 = ob.beta[b[1], p], ob.alpha[b[1], p], ob.mu[b[1], p]
        d = m2 - m1
        if forward and d < 0:
            d += 2 * np.pi * self.tunes[p]
        c, s = np.cos(d), np.sin(d)
        r = np.sqrt(b2 / b1)
        return np.array([[r * (c + a1 * s), np.sqrt(b1 * b2) * s],
                         [((a1 - a2) * c - (1 + a1 * a2) * s) / np.sqrt(b1 * b2), (c - a2 * s) / r]])

    def tune_shift(self, quad: int, dk: float) -> FloatArray:
        """Model tune shifts (dqx, dqy) of a change ``dk`` [m^-2] of quadrupole ``quad`` (thin, first order)."""
        q = self.quads[quad]
        b = self.quad.beta[quad]
        return np.array([b[0], -b[1]]) * dk * q.length / (4 * np.pi)


_MODELS: dict[tuple[str, str], BbaModel] = {}


def bba_model(source: Any) -> BbaModel:
    """The :class:`BbaModel` of a profile (or anything with ``.profile``), built once per profile file."""
    prof = resolve_profile(source)
    key = (str(prof.path), prof.sha256)
    hit = _MODELS.get(key)
    if hit is None:
        hit = _MODELS[key] = BbaModel(prof)
        while len(_MODELS) > 8:
            _MODELS.pop(next(iter(_MODELS)))
    return hit


# ======================================================================================================
# pairs: BPM -> quadrupole, corrector
@dataclass
class BbaPair:
    """One BBA measurement: a BPM in one plane, its quadrupole and (serial method) its corrector.

    Attributes:
        bpm, bpm_index: the BPM (name, position in the profile's BPM list).
        plane: ``"x"`` or ``"y"``.
        quad, quad_index: the quadrupole device and its index in :attr:`BbaModel.quads`.
        corrector: the corrector device scanned (serial), ``""`` when not chosen yet (parallel: the wave).
        distance: BPM to quadrupole centre [m].
        m11, m12: model transfer quadrupole centre -> BPM in ``plane``.
        r_quad, r_bpm: model response [m/rad] of the corrector at the quadrupole centre and at the BPM.
        angle_term: ``r_bpm - m11 r_quad`` [m/rad]: the part of the BPM's motion the corrector makes by changing
            the beam angle at the quadrupole (taken out of the bow-tie abscissa).
    """

    bpm: str
    bpm_index: int
    plane: str
    quad: str
    quad_index: int
    corrector: str = ""
    distance: float = float("nan")
    m11: float = 1.0
    m12: float = 0.0
    r_quad: float = float("nan")
    r_bpm: float = float("nan")
    angle_term: float = float("nan")


def individually_powered(profile: Profile, family: str) -> bool:
    """Whether each magnet of quadrupole family ``family`` has its own power supply.

    The profile schema has no notion of a shared supply: every family is a vector of per-magnet setpoints, so each
    quadrupole device is individually powered. A profile key marking a family as one supply (``power_supply:
    family``, if the schema gains one) makes this False, and its quadrupoles are never chosen."""
    spec = profile.families[family].spec
    return str(getattr(spec, "power_supply", "individual") or "individual") != "family"


def _as_list(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def bba_pairs(source: Any, bpms: Sequence[str | int] | None = None, planes: Sequence[str] = PLANES,
              quads: Sequence[str] | Mapping[str, str] | None = None,
              correctors: Sequence[str] | Mapping[str, Any] | None = None, max_distance: float = 2.0,
              exclude_bpms: Sequence[int] = (), choose_corrector: bool = True, min_tune_shift: float = 1e-3,
              max_fraction: float = 0.05) -> tuple[list[BbaPair], list[tuple[str, str, str]]]:
    """The BBA pairs of the BPMs: for each BPM its nearest individually powered quadrupole that can be stepped
    enough and, per plane, its corrector (chosen from the model unless given).

    Args:
        source: a profile, a profile name, a machine or a twin.
        bpms: BPM names or indices (default: every BPM in service).
        planes: planes to measure.
        quads: ``None`` (nearest quadrupole), one quadrupole device name per BPM (same order as ``bpms``), or a
            mapping ``{bpm: quad}`` (the others: nearest).
        correctors: ``None`` (chosen), a pool of corrector names to choose from, or a mapping ``{bpm: name or
            [names]}`` (a name is used for its own plane).
        max_distance: a BPM whose nearest usable quadrupole centre is farther than this [m] is skipped.
        exclude_bpms: BPM indices never used (out of service).
        choose_corrector: pick the corrector (serial method); False leaves it empty.
        min_tune_shift: a quadrupole whose largest relative step (``max_fraction`` of its design gradient) shifts
            both tunes by less than this in the model is too weak to be chosen as the nearest (trim quadrupoles
            of zero or near-zero design gradient, e.g. SLS 2.0's 528 ``MQCO``: a relative step of nothing moves
            nothing); one given in ``quads`` with a zero design gradient is skipped with the reason.
        max_fraction: the largest relative quadrupole step (as :func:`quadrupole_step`).

    The corrector of a pair: among the correctors of the plane whose response at the quadrupole centre is at least
    half the largest, the one that changes the beam angle there least (smallest ``|r_bpm - m11 r_quad| /
    |r_quad|``): it moves the beam at the quadrupole, and the BPM follows as if the beam were moved parallel.

    Returns:
        ``(pairs, skipped)``; ``skipped`` lists ``(bpm, plane, reason)`` of the BPMs that cannot be measured.
    """
    model = bba_model(source)
    prof = model.profile
    for p in planes:
        if p not in PLANES:
            raise ValueError(f"planes must be among {PLANES}, got {p!r}")
    excluded = set(int(i) for i in exclude_bpms) | set(prof.bpm_bad)
    if bpms is None:
        idx = [i for i in range(len(model.bpm_names)) if i not in excluded]
    else:
        if isinstance(bpms, (str, int, np.integer)):
            bpms = [bpms]
        idx = [model.bpm_index(b) for b in bpms]
    skipped: list[tuple[str, str, str]] = []
    # quadrupoles usable: in service and individually powered
    strong = np.array([_step_tune_shift(model, k, max_fraction) >= min_tune_shift for k in range(len(model.quads))])
    powered = np.array([q.in_service and individually_powered(prof, q.family) for q in model.quads])
    usable = powered & strong
    given_q: dict[int, str] = {}
    if isinstance(quads, Mapping):
        given_q = {model.bpm_index(b): str(q) for b, q in quads.items()}
    elif quads is not None:
        ql = _as_list(quads)
        if bpms is None or len(ql) != len(idx):
            raise ValueError(f"quads: give one quadrupole per BPM of bpms (got {len(ql)} for "
                             f"{'every BPM' if bpms is None else len(idx)}), or a mapping {{bpm: quad}}")
        given_q = dict(zip(idx, ql))
    pool: list[str] | None = None
    given_c: dict[int, list[str]] = {}
    if isinstance(correctors, Mapping):
        given_c = {model.bpm_index(b): _as_list(c) or [] for b, c in correctors.items()}
    elif correctors is not None:
        pool = _as_list(correctors)
        for c in pool:
            model.corrector_index(c)
    pairs: list[BbaPair] = []
    for b in idx:
        name = model.bpm_names[b]
        if b in excluded and bpms is not None:
            skipped.extend((name, p, "the BPM is out of service (profile bpm.status.bad)") for p in planes)
            continue
        if b in given_q:
            q = model.quad_index(given_q[b])
            quad = model.quads[q]
            if not quad.in_service:
                skipped.extend((name, p, f"quadrupole {quad.name} is out of service") for p in planes)
                continue
            if not individually_powered(prof, quad.family):
                skipped.extend((name, p, f"quadrupole {quad.name} is on a power supply shared by family "
                                         f"{quad.family}: moving it moves the whole family") for p in planes)
                continue
            if quad.k == 0:
                skipped.extend((name, p, f"quadrupole {quad.name} has no design gradient: its relative step "
                                         "(dk) would not move it") for p in planes)
                continue
        else:
            if not np.any(usable):
                skipped.extend((name, p, "the profile has no individually powered quadrupole in service whose "
                                         f"{max_fraction:.0%} step shifts a tune by {min_tune_shift:g} or more")
                               for p in planes)
                continue
            d = np.array([model.distance(b, k) if usable[k] else np.inf for k in range(len(model.quads))])
            q = int(np.argmin(d))
        dist = model.distance(b, q)
        if dist > max_distance:
            weak = [k for k in range(len(model.quads)) if powered[k] and not strong[k]
                    and model.distance(b, k) <= max_distance]
            why = ""
            if weak:
                w = min(weak, key=lambda k: model.distance(b, k))
                why = (f"; {model.quads[w].name} ({model.distance(b, w):.2f} m) has a design gradient of "
                       f"{model.quads[w].k:.3g} m^-2: a {max_fraction:.0%} step shifts the tunes by less than "
                       f"{min_tune_shift:g}")
            skipped.extend((name, p, f"no quadrupole within {max_distance:g} m that can be stepped (the nearest, "
                                     f"{model.quads[q].name}, is {dist:.2f} m away{why})") for p in planes)
            continue
        for p in planes:
            m11, m12 = model.transfer(q, b, p)
            pair = BbaPair(name, b, p, model.quads[q].name, q, distance=dist, m11=m11, m12=m12)
            if choose_corrector:
                cands = [c for c, (_, _, _, pl, ok) in model.correctors.items() if pl == p and ok]
                if b in given_c:
                    mine = [c for c in given_c[b] if model.corrector_plane(c) == p]
                    if not mine:
                        skipped.append((name, p, f"no {p} corrector among those given for it ({given_c[b]})"))
                        continue
                    cands = mine[:1]
                elif pool is not None:
                    cands = [c for c in pool if model.corrector_plane(c) == p]
                if not cands:
                    skipped.append((name, p, f"no {p} corrector in service" + (" in the pool given" if pool else "")))
                    continue
                rq = model.quad_response([q], cands, p)[0]
                rb = model.bpm_response([b], cands, p)[0]
                j = _best_corrector(model, q, cands, p, rq)
                if j is None or not np.abs(rq[j]) > 0:
                    skipped.append((name, p, f"no {p} corrector has a response at {model.quads[q].name}"))
                    continue
                pair.corrector, pair.r_quad, pair.r_bpm = cands[j], float(rq[j]), float(rb[j])
                pair.angle_term = float(rb[j] - m11 * rq[j])
            pairs.append(pair)
    return pairs, skipped


def _step_tune_shift(model: BbaModel, q: int, max_fraction: float) -> float:
    """The larger model tune shift of quadrupole ``q`` stepped by ``max_fraction`` of its design gradient."""
    quad = model.quads[q]
    if quad.k == 0:
        return 0.0
    if quad.length == 0:  # a thin quadrupole: no model of its step here, kept as before
        return float("inf")
    return float(np.max(np.abs(model.tune_shift(q, max_fraction * quad.k))))


def _best_corrector(model: BbaModel, q: int, cands: Sequence[str], plane: str, rq: np.ndarray,
                    min_cos: float = 0.9) -> int | None:
    """The corrector for quadrupole ``q``: the largest response at the quadrupole among the correctors whose
    orbit wave has an extremum near it (``|cos(|mu_q - mu_c| - pi nu)| >= min_cos``): there the beam moves at the
    quadrupole with little change of its angle, and the model's angle change is least sensitive to phase errors."""
    p = PLANES.index(plane)
    ik = np.array([model.corrector_index(c) for c in cands])
    dmu = np.abs(model.quad.mu[q, p] - model.cor.mu[ik, p])
    cosphi = np.abs(np.cos(dmu - np.pi * model.tunes[p]))
    resp = np.abs(rq)
    if not np.any(resp > 0):
        return None
    for limit in (min_cos, 0.7, 0.0):
        ok = (cosphi >= limit) & (resp > 0)
        if np.any(ok):
            return int(np.argmax(np.where(ok, resp, -1.0)))
    return None


def quadrupole_step(source: Any, quad: int | str, dk: float | None = None, tune_shift: float = 2e-3,
                    max_fraction: float = 0.05) -> float:
    """Relative quadrupole step for BBA: ``dk`` if given, else the fraction of the strength that shifts the larger
    tune by ``tune_shift`` in the model, at most ``max_fraction``."""
    if dk is not None:
        return float(dk)
    model = bba_model(source)
    q = model.quad_index(quad) if isinstance(quad, str) else int(quad)
    k = model.quads[q].k
    if k == 0 or model.quads[q].length == 0:
        return float(max_fraction)
    dq = np.max(np.abs(model.tune_shift(q, k)))
    return float(min(max_fraction, tune_shift / dq)) if dq > 0 else float(max_fraction)


# ======================================================================================================
# the bow-tie fit
@dataclass
class BowtieFit:
    """The crossing of one bow-tie: the abscissa where the quadrupole's signal vanishes.

    Attributes:
        offset: the crossing [m] (NaN if the fit failed), ``uncertainty`` its standard error [m].
        z: (T,) abscissa of the points [m] (corrected BPM readings); ``a``: (T,) signal at each point [m] (the
            orbit change projected on its common direction, or the fitted kick times a scale).
        coef: polynomial coefficients of ``a(z)`` (highest first, ``numpy.polyfit`` order).
        chi2: chi-square of the fit per degree of freedom (1 = as noisy as the BPM noise says).
        rejected: (T,) True for points left out as outliers.
        sigma: the BPM noise used [m]; ``snr``: signal range over noise.
        direction: (r,) unit vector of the orbit change (serial), or None.
        message: why the fit failed, or "".
    """

    offset: float
    uncertainty: float
    z: FloatArray
    a: FloatArray
    coef: FloatArray
    chi2: float
    rejected: np.ndarray
    sigma: float
    snr: float
    direction: FloatArray | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.offset)) and not self.message


def _poly_root(coef: np.ndarray, near: float) -> float:
    if len(coef) == 2:
        return float(-coef[1] / coef[0]) if coef[0] != 0 else float("nan")
    roots = np.roots(coef)
    roots = roots[np.abs(roots.imag) < 1e-12 * max(1.0, np.max(np.abs(roots)))].real if roots.size else roots
    if roots.size == 0:
        return float("nan")
    return float(roots[np.argmin(np.abs(roots - near))])


def _weighted_polyfit(z, a, w, order):
    """Weighted polynomial fit: coefficients (highest first) and their covariance for weights ``w = 1/sigma``."""
    v = np.vander(z, order + 1)
    aw = v * w[:, None]
    coef, *_ = np.linalg.lstsq(aw, a * w, rcond=None)
    cov = np.linalg.pinv(aw.T @ aw)
    return coef, cov


def bowtie_fit(z: npt.ArrayLike, d: npt.ArrayLike, *, sigma: float | None = None, sigma_z: float | None = None,
               order: int = 1, reject: float = 4.0, min_points: int = 3) -> BowtieFit:
    """Fit the crossing of a bow-tie.

    Args:
        z: (T,) abscissa [m]: the BPM reading at each point (corrected for the beam angle at the quadrupole).
        d: (T, r) orbit change at r BPM readings [m] for each point (serial method), or (T,) a signal already
            projected (the kick of one quadrupole from the parallel separation, times any scale).
        sigma: noise [m] of one element of ``d`` (default: estimated from what the rank-1 bow-tie leaves; with a
            (T,) signal it must be given).
        sigma_z: noise [m] of ``z`` (default ``sigma / sqrt(2)``: a reading, not a difference).
        order: 1 (straight line) or 2 (a parabola: sextupole feed-down makes the lines bend a little); the root
            nearest the middle of the points is the crossing.
        reject: points farther than this many standard deviations from the fit are rejected and the fit repeated.
        min_points: fewest points kept for a fit.

    With (T, r) data the orbit changes are first reduced to one signal per point: all BPMs see the same kick, so
    the data are a rank-1 matrix ``direction x a(z)`` plus noise; its first singular vector is the direction and
    ``a = d @ direction`` the signal (noise ``sigma``, the direction being a unit vector).
    """
    z = np.asarray(z, dtype=float).reshape(-1)
    d = np.asarray(d, dtype=float)
    t = z.size
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    nan = float("nan")
    direction = None
    keep_rows = None
    if d.ndim == 2:
        if d.shape[0] != t:
            raise ValueError(f"d must have one row per point: z {z.shape}, d {d.shape}")
        keep_rows = np.all(np.isfinite(d), axis=0)
        dd = d[:, keep_rows]
        good = np.isfinite(z)
        if dd.shape[1] == 0 or good.sum() < min_points:
            return BowtieFit(nan, nan, z, np.full(t, nan), np.zeros(order + 1), nan, ~good, nan, nan,
                             message="no finite orbit changes")
        _, _, vt = np.linalg.svd(dd[good], full_matrices=False)
        direction = vt[0]
        a = dd @ direction
        if sigma is None:
            res = dd[good] - np.outer(a[good], direction)
            dof = max(1, res.size - (int(good.sum()) + dd.shape[1] - 1))
            sigma = float(np.sqrt(np.sum(res * res) / dof))
        full = np.full(d.shape[1], 0.0)
        full[keep_rows] = direction
        direction = full
    else:
        a = d.reshape(-1).copy()
        if a.size != t:
            raise ValueError(f"d must have one value per point: z {z.shape}, d {d.shape}")
        if sigma is None:
            raise ValueError("a projected signal needs its noise sigma")
    sigma = max(float(sigma), 1e-15)
    sz = sigma / np.sqrt(2.0) if sigma_z is None else max(float(sigma_z), 0.0)
    rejected = ~(np.isfinite(z) & np.isfinite(a))
    coef = np.zeros(order + 1)
    cov = np.full((order + 1, order + 1), np.nan)
    chi2 = nan
    for _ in range(3):
        ok = ~rejected
        if ok.sum() < max(min_points, order + 1):
            return BowtieFit(nan, nan, z, a, coef, chi2, rejected, sigma, nan, direction,
                             message=f"only {int(ok.sum())} usable points (need {max(min_points, order + 1)})")
        fit_order = order if ok.sum() >= order + 2 else 1
        # straight line first, then effective-variance weights (the abscissa is noisy too)
        w = np.full(int(ok.sum()), 1.0 / sigma)
        for _ in range(2):
            coef, cov = _weighted_polyfit(z[ok], a[ok], w, fit_order)
            slope = np.polyval(np.polyder(coef), z[ok]) if fit_order > 0 else np.zeros(int(ok.sum()))
            w = 1.0 / np.sqrt(sigma ** 2 + (slope * sz) ** 2)
        res = (a[ok] - np.polyval(coef, z[ok])) * w
        dof = int(ok.sum()) - (fit_order + 1)
        chi2 = float(np.sum(res ** 2) / dof) if dof > 0 else nan
        bad = np.zeros(t, dtype=bool)
        if dof > 1 and chi2 > 4.0:  # an outlier? the point whose removal explains the excess scatter
            idx = np.nonzero(ok)[0]
            best, best_chi2 = -1, chi2
            for j in range(idx.size):
                keep = np.delete(idx, j)
                c, _ = _weighted_polyfit(z[keep], a[keep], w[np.arange(idx.size) != j], fit_order)
                r_keep = (a[keep] - np.polyval(c, z[keep])) * w[np.arange(idx.size) != j]
                chi_j = float(np.sum(r_keep ** 2) / max(1, keep.size - (fit_order + 1)))
                dev = abs(a[idx[j]] - np.polyval(c, z[idx[j]])) * w[j]
                if chi_j < best_chi2 and dev > reject * max(1.0, np.sqrt(chi_j)):
                    best, best_chi2 = j, chi_j
            if best >= 0 and best_chi2 < chi2 / 4.0:
                bad[idx[best]] = True
        rejected |= bad
    ok = ~rejected
    centre = float(np.mean(z[ok]))
    root = _poly_root(coef, centre)
    if not np.isfinite(root):
        return BowtieFit(nan, nan, z, a, coef, chi2, rejected, sigma, nan, direction,
                         message="the fitted signal never crosses zero")
    # uncertainty: the root's gradient with respect to the coefficients (implicit function theorem)
    powers = root ** np.arange(len(coef) - 1, -1, -1)
    dpdz = np.polyval(np.polyder(coef), root)
    if dpdz == 0:
        return BowtieFit(nan, nan, z, a, coef, chi2, rejected, sigma, nan, direction,
                         message="zero slope at the crossing: the quadrupole does not see the orbit change")
    grad = -powers / dpdz
    var = float(grad @ cov @ grad)
    if np.isfinite(chi2) and chi2 > 1.0:
        var *= chi2  # more scatter than the noise: the model is not as good as the noise, say so
    span = float(np.ptp(np.polyval(coef, z[ok])))
    return BowtieFit(root, float(np.sqrt(max(var, 0.0))), z, a, coef, chi2, rejected, sigma, span / sigma,
                     direction)


# ======================================================================================================
# the truth a twin knows (tests and benchmarks)
def true_offset(twin: Any, bpms: Sequence[str | int], quads: Sequence[str], planes: Sequence[str]) -> FloatArray:
    """The offsets BBA should find, from the twin's truth: for each BPM, quadrupole and plane, the BPM's reading
    (noise-free: offset, gain and roll of the BPM applied) when the beam passes through the quadrupole's magnetic
    centre with the angle it has there on the twin's present orbit.

    The twin's errored lattice is split at the quadrupole's centre (pyAT puts the split point in the magnet's own
    frame: its offset and roll applied, so the magnetic centre is at 0 there); the present closed orbit is tracked
    to it, its position in ``plane`` set to the centre (angles and the other plane kept) and tracked on to the BPM;
    for a BPM upstream of the quadrupole the state at the BPM that arrives there is found by Newton's method.

    Args:
        twin: a :class:`~acc_bluesky.twin.Twin` (anything with ``ring``, ``observables()``, ``orbit()``,
            ``errors.bpm_transform`` and ``profile``).
        bpms, quads, planes: one entry each per measurement (BPM name or index, quadrupole device name, plane).

    Returns:
        (len(bpms),) readings [m].
    """
    import at

    model = bba_model(twin.profile)
    obs = twin.observables()
    if obs.lost:
        raise RuntimeError(f"the twin has no beam ({obs.reason}): no truth to compare with")
    qidx = [model.quad_index(q) for q in quads]
    bidx = [model.bpm_index(b) for b in bpms]
    uq = sorted(set(qidx), key=lambda q: model.quad.s[q])
    markers = [at.Marker(f"BBA_TRUTH_{q:05d}") for q in uq]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = twin.ring.sbreak(np.array([model.quad.s[q] for q in uq]), markers)
    elems = list(split)
    where = {e.FamName: i for i, e in enumerate(elems) if e.FamName.startswith("BBA_TRUTH_")}
    pos_m = {q: where[f"BBA_TRUTH_{q:05d}"] for q in uq}
    names = [twin.ring[int(r)].FamName for r in np.asarray(twin.profile.bpm_refpts)]
    mons, j = [], 0  # the BPMs in the split lattice, in order
    for i, e in enumerate(elems):
        if j < len(names) and e.FamName == names[j] and e.Length == 0:
            mons.append(i)
            j += 1
    z0 = np.asfortranarray(np.asarray(obs.orbit0, dtype=float).reshape(6, 1))
    refs = sorted(set(pos_m.values()) | {mons[b] for b in bidx})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = at.lattice_pass(split, z0.copy(), refpts=np.asarray(refs, dtype=np.uint32))
    state = {i: out[:, 0, k, 0].copy() for k, i in enumerate(refs)}
    x_true, y_true = twin.orbit()
    nel = len(elems)

    def track(v: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """From the entrance of element i0 to the entrance of element i1, around the ring if needed."""
        seg = elems[i0:i1] if i1 >= i0 else elems[i0:] + elems[:i1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = at.lattice_pass(seg, np.asfortranarray(v.reshape(6, 1).copy()),
                                refpts=np.array([len(seg)], dtype=np.uint32))
        return o[:, 0, 0, 0]

    result = np.full(len(bidx), np.nan)
    for k, (b, q, p) in enumerate(zip(bidx, qidx, planes)):
        im, ib = pos_m[q], mons[b]
        target = state[im].copy()
        target[0 if p == "x" else 2] = 0.0  # the magnetic centre, in the magnet's frame
        if (ib - im) % nel <= (im - ib) % nel:  # the BPM downstream
            vb = track(target, im, ib)
        else:
            vb = state[ib].copy()
            for _ in range(8):
                f = track(vb, ib, im)[:4] - target[:4]
                if np.max(np.abs(f)) < 1e-14:
                    break
                jac = np.empty((4, 4))
                for c in range(4):
                    v2 = vb.copy()
                    v2[c] += 1e-7
                    jac[:, c] = (track(v2, ib, im)[:4] - target[:4] - f) / 1e-7
                vb[:4] -= np.linalg.solve(jac, f)
        xs, ys = x_true.copy(), y_true.copy()
        xs[b], ys[b] = vb[0], vb[2]
        xm, ym = twin.errors.bpm_transform(xs, ys)
        result[k] = xm[b] if p == "x" else ym[b]
    return result


def true_orbit_at_quads(twin: Any, quads: Sequence[str]) -> FloatArray:
    """The twin's true closed orbit relative to the magnetic centre of each quadrupole, at its centre:
    (len(quads), 2) [m] (x, y in the magnet's frame). What a correction to the golden orbit should make small."""
    import at

    model = bba_model(twin.profile)
    obs = twin.observables()
    if obs.lost:
        return np.full((len(quads), 2), np.nan)
    qidx = [model.quad_index(q) for q in quads]
    uq = sorted(set(qidx), key=lambda q: model.quad.s[q])
    markers = [at.Marker(f"BBA_TRUTH_{q:05d}") for q in uq]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = twin.ring.sbreak(np.array([model.quad.s[q] for q in uq]), markers)
    where = {e.FamName: i for i, e in enumerate(split) if e.FamName.startswith("BBA_TRUTH_")}
    refs = np.array(sorted(where.values()), dtype=np.uint32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = at.lattice_pass(split, np.asfortranarray(np.asarray(obs.orbit0, float).reshape(6, 1)), refpts=refs)
    at_ref = {int(r): out[[0, 2], 0, k, 0] for k, r in enumerate(refs)}
    return np.array([at_ref[where[f"BBA_TRUTH_{q:05d}"]] for q in qidx])


# ======================================================================================================
# the parallel method: shared orbits, quadrupoles stepped one after the other in blocks
def _cos_phase(model: BbaModel, q: int, correctors: Sequence[str], plane: str) -> np.ndarray:
    p = PLANES.index(plane)
    ik = [model.corrector_index(c) for c in correctors]
    return np.abs(np.cos(np.abs(model.quad.mu[q, p] - model.cor.mu[ik, p]) - np.pi * model.tunes[p]))


def shared_correctors(source: Any, plane: str, n: int = 3, pool: Sequence[str] | None = None) -> list[str]:
    """``n`` correctors of ``plane`` whose closed-orbit waves are spread by ``pi / n`` in phase: every
    quadrupole is within ``pi / (2 n)`` of an extremum of one of them (``|cos| >= cos(pi / 2n)``: 0.87 for 3).

    Chosen among the strong ones (beta at the corrector in the upper 30 % of the plane's), from ``pool`` if
    given. The first is the strongest; each next the one nearest to the next phase."""
    model = bba_model(source)
    p = PLANES.index(plane)
    cands = [c for c, v in model.correctors.items() if v[3] == plane and v[4]]
    if pool is not None:
        pool_set = set(pool)
        cands = [c for c in cands if c in pool_set]
    if not cands:
        raise ValueError(f"no {plane} corrector in service" + (" in the pool given" if pool is not None else ""))
    ik = np.array([model.corrector_index(c) for c in cands])
    beta, mu = model.cor.beta[ik, p], model.cor.mu[ik, p]
    strong = beta >= np.percentile(beta, 70) if len(cands) > 3 else np.ones(len(cands), dtype=bool)
    first = int(np.argmax(np.where(strong, beta, -np.inf)))
    chosen = [first]
    for k in range(1, min(n, len(cands))):
        target = mu[first] + k * np.pi / n
        dist = np.abs(((mu - target + np.pi / 2) % np.pi) - np.pi / 2)
        dist[chosen] = np.inf
        chosen.append(int(np.argmin(np.where(strong, dist, dist + 10.0))))
    return [cands[j] for j in chosen]


@dataclass
class Block:
    """Quadrupoles measured together: stepped one after the other at one orbit, back one after the other at the
    mirrored orbit made by the same two correctors (``correctors``: x, y) at ``-theta`` and ``+theta`` [rad].

    Attributes:
        quads: indices in :attr:`BbaModel.quads`, in the order they are stepped.
        signs: +1 / -1 per quadrupole: the direction of its step (the tune shifts of the steps cancel).
        dk: relative step of each quadrupole.
        correctors: the x and y correctors of the orbits.
        theta: (2,) corrector changes [rad] (x, y) of the mirrored orbits.
    """

    quads: list[int]
    signs: list[int]
    dk: list[float]
    correctors: tuple[str, str]
    theta: tuple[float, float]


def parallel_blocks(source: Any, quads: Sequence[int], shared: Mapping[str, Sequence[str]], dk: Sequence[float],
                    block_size: int = 8, amplitude: float = 90e-6) -> list[Block]:
    """Put the quadrupoles in blocks: those best served by the same x and y corrector (the largest response at the
    quadrupole among those whose wave has an extremum near it) together, at most ``block_size`` each, spread along
    the ring; signs of the steps chosen so the running tune shift stays small; corrector changes sized for an orbit
    change of ``amplitude`` [m] at the median quadrupole of the block."""
    model = bba_model(source)
    best: dict[int, tuple[int, int]] = {}
    for q in quads:
        key = []
        for p in PLANES:
            cors = list(shared[p])
            r = np.abs(model.quad_response([q], cors, p)[0])
            cp = _cos_phase(model, q, cors, p)
            ok = cp >= 0.8
            key.append(int(np.argmax(np.where(ok, r, -1.0))) if np.any(ok) else int(np.argmax(cp * r)))
        best[int(q)] = (key[0], key[1])
    dk_of = {int(q): float(d) for q, d in zip(quads, dk)}
    combos: dict[tuple[int, int], list[int]] = {}
    for q in sorted(best, key=lambda q: model.quad.s[q]):
        combos.setdefault(best[q], []).append(q)
    blocks = []
    for (kx, ky), qs in sorted(combos.items()):
        nb = int(np.ceil(len(qs) / max(1, int(block_size))))
        for b in range(nb):
            members = qs[b::nb]
            cx, cy = shared["x"][kx], shared["y"][ky]
            rx = np.abs(model.quad_response(members, [cx], "x")[:, 0])
            ry = np.abs(model.quad_response(members, [cy], "y")[:, 0])
            shifts = np.array([model.tune_shift(q, model.quads[q].k * dk_of[q]) for q in members])
            signs, total = [], np.zeros(2)
            for sh in shifts:
                sgn = 1 if np.linalg.norm(total + sh) <= np.linalg.norm(total - sh) else -1
                signs.append(sgn)
                total += sgn * sh
            blocks.append(Block(members, signs, [dk_of[q] for q in members], (cx, cy),
                                (float(amplitude / np.median(rx)), float(amplitude / np.median(ry)))))
    return blocks


def kick_estimate(source: Any, quad: int, plane: str, d: npt.ArrayLike, bpms: Sequence[int] | None = None) -> float:
    """The kick [rad] of one quadrupole from the orbit change ``d`` (nbpm,) it made in ``plane``, with the model's
    response (its scale is good to the model's few per cent: used only for small corrections)."""
    model = bba_model(source)
    d = np.asarray(d, dtype=float)
    idx = np.arange(d.size) if bpms is None else np.asarray(bpms, dtype=int)
    idx = idx[np.isfinite(d[idx])]
    r = model.bpm_response_to_quads(idx, [quad], plane)[:, 0]
    return float(r @ d[idx] / (r @ r))


def fit_bba(readings: npt.ArrayLike, corrections: npt.ArrayLike, diffs: npt.ArrayLike, *,
            model_error: float = 0.05, order: int = 1, min_points: int = 2) -> tuple[BowtieFit, float, float]:
    """The offset of one BPM in one plane from its bow-tie points.

    Args:
        readings: (P,) the BPM's reading at each point, quadrupole stepped [m].
        corrections: (P,) what the model says the beam angle changes at the quadrupole (correctors, other
            quadrupoles' kicks) moved the BPM at each point [m]; the abscissa is ``readings - corrections``.
        diffs: (P, nbpm) orbit change of the quadrupole step at each point [m].
        model_error: relative error assumed for ``corrections`` (the uncertainty's systematic part).

    Returns:
        ``(fit, correction at the crossing [m], uncertainty with the systematic part [m])``.
    """
    b = np.asarray(readings, dtype=float)
    c = np.asarray(corrections, dtype=float)
    z = b - c
    fit = bowtie_fit(z, diffs, order=order, min_points=min_points)
    if not fit.ok:
        return fit, float("nan"), float("nan")
    ok = ~fit.rejected & np.isfinite(c)
    if ok.sum() >= 2 and np.ptp(z[ok]) > 0:
        corr = float(np.polyval(np.polyfit(z[ok], c[ok], 1), fit.offset))
    else:
        corr = float(np.mean(c[ok])) if ok.any() else 0.0
    sys = model_error * abs(corr)
    return fit, corr, float(np.hypot(fit.uncertainty, sys))


# ======================================================================================================
# the result
@dataclass
class BBAResult:
    """The offsets of a BBA measurement.

    Attributes:
        bpm_names: the n BPMs measured (in at least one plane).
        offset: (n, 2) reading [m] of each BPM (x, y) when the beam passes through its quadrupole's magnetic
            centre (with the beam angle of the orbit the measurement started from); NaN for a plane not measured.
        uncertainty: (n, 2) standard uncertainty [m]: the fit's statistical part and the model part
            (``systematic``) together.
        quad_names, corrector_names: (n, 2) lists of device names per BPM and plane (``""``: not measured). For the
            parallel method the corrector is the one of the BPM's block in that plane.
        chi2: (n, 2) chi-square of the fit per degree of freedom (NaN with two points); ``snr``: signal range over
            noise; ``rejected``: (n, 2) points rejected as outliers; ``n_points``: (n, 2) points fitted.
        statistical, systematic: (n, 2) the two parts of the uncertainty [m].
        correction: (n, 2) the model's angle correction of the abscissa at the crossing [m].
        moves: total number of magnet setpoint changes of the measurement (restores included);
            ``moves_per_bpm``: (n,) their share per BPM.
        method: ``"quadcenter"`` or ``"parallel"``.
        s: (n,) position of the BPMs [m].
        bowtie_z, bowtie_a: (n, 2, P) the points of each bow-tie: abscissa [m] and signal [m] (NaN padded).
        messages: what went wrong where (BPMs skipped, fits that failed).
        uid: the run it was read from.
    """

    bpm_names: list[str]
    offset: FloatArray
    uncertainty: FloatArray
    quad_names: list[list[str]]
    corrector_names: list[list[str]]
    chi2: FloatArray
    snr: FloatArray
    rejected: np.ndarray
    n_points: np.ndarray
    statistical: FloatArray
    systematic: FloatArray
    correction: FloatArray
    moves: int
    moves_per_bpm: FloatArray
    method: str = "quadcenter"
    s: FloatArray | None = None
    bowtie_z: FloatArray | None = None
    bowtie_a: FloatArray | None = None
    messages: list[str] = field(default_factory=list)
    uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    UNITS = {"offset": "m", "uncertainty": "m", "chi2": "", "snr": "", "rejected": "", "n_points": "",
             "statistical": "m", "systematic": "m", "correction": "m", "moves": "", "moves_per_bpm": "",
             "s": "m", "bowtie_z": "m", "bowtie_a": "m", "layout": ""}
    DESCRIPTIONS = {
        "offset": "(n, 2) BPM reading x, y when the beam passes through the quadrupole's magnetic centre (NaN: "
                  "plane not measured)",
        "uncertainty": "(n, 2) standard uncertainty of the offsets (statistical and model parts)",
        "chi2": "(n, 2) chi-square of the bow-tie fit per degree of freedom",
        "snr": "(n, 2) signal range of the bow-tie over the BPM noise",
        "rejected": "(n, 2) bow-tie points rejected as outliers", "n_points": "(n, 2) bow-tie points fitted",
        "statistical": "(n, 2) statistical part of the uncertainty (the fit)",
        "systematic": "(n, 2) model part of the uncertainty (the beam-angle correction)",
        "correction": "(n, 2) model correction of the abscissa for the beam angle at the quadrupole, at the crossing",
        "moves": "magnet setpoint changes made by the measurement (restores included)",
        "moves_per_bpm": "(n,) share of the magnet setpoint changes per BPM",
        "s": "(n,) position of the BPMs along the ring",
        "bowtie_z": "(n, 2, P) bow-tie abscissa: the BPM reading minus the angle correction",
        "bowtie_a": "(n, 2, P) bow-tie signal: the orbit change of the quadrupole step, projected",
        "layout": "JSON: bpm_names, quad_names, corrector_names, method, messages"}

    def __post_init__(self) -> None:
        self.bpm_names = [str(b) for b in self.bpm_names]
        for k in ("offset", "uncertainty", "chi2", "snr", "statistical", "systematic", "correction"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=float).reshape(-1, 2))
        self.rejected = np.asarray(self.rejected, dtype=int).reshape(-1, 2)
        self.n_points = np.asarray(self.n_points, dtype=int).reshape(-1, 2)
        self.moves_per_bpm = np.asarray(self.moves_per_bpm, dtype=float).reshape(-1)
        self.moves = int(self.moves)

    def __repr__(self) -> str:
        n = len(self.bpm_names)
        meas = [int(np.isfinite(self.offset[:, k]).sum()) for k in range(2)]
        return (f"BBAResult({self.method}, {n} BPMs (x: {meas[0]}, y: {meas[1]}), offsets rms x "
                f"{rms(self.offset[:, 0]) * 1e6:.1f} um y {rms(self.offset[:, 1]) * 1e6:.1f} um, median uncertainty "
                f"{np.nanmedian(self.uncertainty) * 1e6 if np.isfinite(self.uncertainty).any() else float('nan'):.2f}"
                f" um, {self.moves} magnet moves)")

    def index(self, bpm: str | int) -> int:
        if isinstance(bpm, (int, np.integer)):
            return int(bpm)
        try:
            return self.bpm_names.index(str(bpm))
        except ValueError:
            raise KeyError(f"BPM {bpm!r} was not measured; measured: {self.bpm_names[:6]}"
                           f"{' ...' if len(self.bpm_names) > 6 else ''}") from None

    def golden_orbit(self, bpm_names: Sequence[str]) -> tuple[FloatArray, FloatArray, np.ndarray]:
        """The golden orbit over ``bpm_names`` (every BPM of the machine): ``(x, y, measured)`` with the offsets
        [m] where measured and 0 elsewhere; ``measured`` is (n, 2) bool."""
        pos = {b: k for k, b in enumerate(self.bpm_names)}
        n = len(bpm_names)
        gx, gy = np.zeros(n), np.zeros(n)
        meas = np.zeros((n, 2), dtype=bool)
        for i, b in enumerate(bpm_names):
            k = pos.get(str(b))
            if k is None:
                continue
            for p, g in ((0, gx), (1, gy)):
                if np.isfinite(self.offset[k, p]):
                    g[i] = self.offset[k, p]
                    meas[i, p] = True
        return gx, gy, meas

    # -- storage ---------------------------------------------------------------------------------------
    def to_results(self) -> dict[str, Any]:
        import json

        out: dict[str, Any] = {k: getattr(self, k) for k in ("offset", "uncertainty", "chi2", "snr", "rejected",
                                                            "n_points", "statistical", "systematic",
                                                            "correction", "moves_per_bpm")}
        out["moves"] = np.asarray(self.moves)
        if self.s is not None:
            out["s"] = np.asarray(self.s, dtype=float)
        if self.bowtie_z is not None:
            out["bowtie_z"] = np.asarray(self.bowtie_z, dtype=float)
            out["bowtie_a"] = np.asarray(self.bowtie_a, dtype=float)
        out["layout"] = json.dumps({"bpm_names": self.bpm_names, "quad_names": self.quad_names,
                                    "corrector_names": self.corrector_names, "method": self.method,
                                    "messages": self.messages})
        return out

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> BBAResult:
        import json

        start = dict(start or {})
        if "offset" not in results:
            raise KeyError(f"no 'offset' in the results {sorted(results)}: is this a BBA run (measure_bba)?")
        lay = results.get("layout")
        if lay is not None:
            lay = json.loads(str(np.asarray(lay).item() if np.ndim(lay) == 0 else lay))
        else:
            lay = {k: start.get(f"bba_{k}") for k in ("bpm_names", "quad_names", "corrector_names", "method")}
        off = np.asarray(results["offset"], dtype=float).reshape(-1, 2)
        n = off.shape[0]

        def arr(k, default=np.nan):
            v = results.get(k)
            return np.full((n, 2), default) if v is None else np.asarray(v)

        return cls(bpm_names=list(lay.get("bpm_names") or [f"BPM{i}" for i in range(n)]), offset=off,
                   uncertainty=arr("uncertainty"), quad_names=[list(q) for q in (lay.get("quad_names") or
                                                                                 [["", ""]] * n)],
                   corrector_names=[list(c) for c in (lay.get("corrector_names") or [["", ""]] * n)],
                   chi2=arr("chi2"), snr=arr("snr"), rejected=arr("rejected", 0), n_points=arr("n_points", 0),
                   statistical=arr("statistical"), systematic=arr("systematic"), correction=arr("correction"),
                   moves=int(np.asarray(results.get("moves", 0))),
                   moves_per_bpm=np.asarray(results.get("moves_per_bpm", np.zeros(n)), dtype=float),
                   method=str(lay.get("method") or start.get("method") or "quadcenter"),
                   s=None if results.get("s") is None else np.asarray(results["s"], dtype=float),
                   bowtie_z=None if results.get("bowtie_z") is None else np.asarray(results["bowtie_z"], float),
                   bowtie_a=None if results.get("bowtie_a") is None else np.asarray(results["bowtie_a"], float),
                   messages=list(lay.get("messages") or []), uid=start.get("uid"),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "time", "plan_name") if k in start})

    @classmethod
    def from_run(cls, run: Any) -> BBAResult:
        """Read what ``measure_bba`` stored in a run (a Tiled ``BlueskyRun``)."""
        start = tool_run_start(run, "bba", "BBA run (measure_bba)")
        return cls.from_results(run_results(run), start)

    # -- figures --------------------------------------------------------------------------------------
    def plot(self, path: str | Path, bpm: str | int | None = None) -> Path:
        """PNG: the bow-tie fit of one BPM in both planes (default: the one with the largest offset) and the
        offsets along the ring with their uncertainties."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(10, 7), dpi=110)
        axes = [fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2), fig.add_subplot(2, 1, 2)]
        if bpm is None:
            mag = np.nan_to_num(np.abs(self.offset), nan=-1.0).max(axis=1)
            k = int(np.argmax(mag)) if mag.size else 0
        else:
            k = self.index(bpm)
        for p, ax in enumerate(axes[:2]):
            plane = PLANES[p]
            ax.set_xlabel(f"{plane} reading minus angle correction [um]")
            ax.set_ylabel("orbit change of the quadrupole step [um]")
            ax.grid(alpha=0.3)
            if self.bowtie_z is None or not self.bpm_names or not np.isfinite(self.offset[k, p]):
                ax.set_title(f"{self.bpm_names[k] if self.bpm_names else '?'} {plane}: not measured")
                continue
            z, a = self.bowtie_z[k, p], self.bowtie_a[k, p]
            ok = np.isfinite(z) & np.isfinite(a)
            ax.plot(z[ok] * 1e6, a[ok] * 1e6, "o", ms=5, label="points")
            if ok.sum() >= 2:
                c = np.polyfit(z[ok], a[ok], 1)
                zz = np.linspace(min(z[ok].min(), self.offset[k, p]), max(z[ok].max(), self.offset[k, p]), 50)
                ax.plot(zz * 1e6, np.polyval(c, zz) * 1e6, "-", lw=1, label="fit")
            ax.axhline(0.0, color="k", lw=0.6)
            ax.axvline(self.offset[k, p] * 1e6, color="tab:red", lw=1,
                       label=f"offset {self.offset[k, p] * 1e6:.2f} +- {self.uncertainty[k, p] * 1e6:.2f} um")
            ax.set_title(f"{self.bpm_names[k]} {plane}: {self.quad_names[k][p]}"
                         + (f", {self.corrector_names[k][p]}" if self.corrector_names[k][p] else ""), fontsize=9)
            ax.legend(fontsize=7)
        ax = axes[2]
        pos = np.arange(len(self.bpm_names)) if self.s is None else np.asarray(self.s, dtype=float)
        for p, (lab, col) in enumerate((("x", "tab:blue"), ("y", "tab:orange"))):
            ok = np.isfinite(self.offset[:, p])
            ax.errorbar(pos[ok], self.offset[ok, p] * 1e6, yerr=np.nan_to_num(self.uncertainty[ok, p]) * 1e6,
                        fmt=".", ms=4, lw=0.8, color=col, label=f"{lab} (rms {rms(self.offset[:, p]) * 1e6:.1f} um)")
        ax.set_xlabel("BPM index" if self.s is None else "s [m]")
        ax.set_ylabel("BBA offset [um]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(f"BBA ({self.method}): {len(self.bpm_names)} BPMs, {self.moves} magnet moves", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        return path
