"""Error model of the twin (pySC-like): magnets, BPMs, correctors, RF.

All errors are drawn once per seed from truncated Gaussians with the rms values of the profile's ``errors``
section. The twin knows them (the truth); devices only see what the hardware would show.

Every random number comes from :func:`named_stream`: a ``numpy.random.Generator`` keyed by the seed and a stable
name (``errors/bpm/offset``, ``errors/magnets/<selector>/dx``, ``noise``...). Nothing depends on ``hash()``, on
set order or on the order in which other quantities were drawn, so a seeded twin is bit-identical in every process
(whatever ``PYTHONHASHSEED``) and adding an error group does not change the draws of the others.

This module also sizes errors to a machine (:func:`closed_orbit_scale`: the largest alignment scale that keeps a
closed orbit, by a quick search over seeds) and explains a seed without a closed orbit
(:func:`diagnose_closed_orbit`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

import numpy as np

from ..profile import Profile
from ..profile.loader import design_tilt_angle

__all__ = [
    "ErrorModel",
    "OrbitCheck",
    "ScaleSearch",
    "apply_alignment",
    "check_closed_orbit",
    "injection_error",
    "line_entrance",
    "line_trajectory",
    "stream",
    "closed_orbit_scale",
    "diagnose_closed_orbit",
    "element_normals",
    "named_stream",
    "truncated_normal",
]


def named_stream(seed: int, *names: str) -> np.random.Generator:
    """The random stream of ``seed`` and the stable name ``names`` (joined by ``/``).

    The name is turned into entropy words with SHA-256 (never ``hash()``, which Python salts per process), so the
    same seed and name give the same numbers in every process and every Python, and different names give
    independent streams.
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    digest = hashlib.sha256("/".join(names).encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def _words(names: tuple[str, ...]) -> list[int]:
    digest = hashlib.sha256("/".join(names).encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def element_normals(seed: int, refpts, *names: str, cut: float = 2.5) -> np.ndarray:
    """One truncated standard normal per lattice element, each from its own stream ``(seed, names, element)``.

    An element keeps its draw whatever else the profile selects: editing one error group, adding one, or
    reordering them changes no other element's error."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    base = [seed, *_words(names)]
    out = np.empty(len(refpts))
    for k, r in enumerate(np.asarray(refpts).tolist()):
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*base, int(r)])))
        v = g.standard_normal()
        while abs(v) > cut:
            v = g.standard_normal()
        out[k] = v
    return out


def truncated_normal(rng: np.random.Generator, sigma, size, cut: float = 2.5) -> np.ndarray:
    """Gaussian samples of rms ``sigma`` (before truncation) redrawn beyond ``cut`` sigma."""
    out = rng.standard_normal(size)
    bad = np.abs(out) > cut
    while np.any(bad):
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > cut
    return out * sigma


def stream(seed: int | None, name: str) -> np.random.Generator:
    """A generator keyed by the seed and a stable name (``crc32``: the same in every process)."""
    return np.random.default_rng(None if seed is None else [int(seed), zlib.crc32(name.encode())])


def injection_error(profile: Any, seed: int | None) -> np.ndarray:
    """(6,) static error of the injected beam of ``seed`` [m, rad, m, rad, 1, m] (zeros for ``None``): what the
    twin's :class:`Beam` draws (profile ``errors.injection``, truncated normal), for checks made without a twin."""
    if seed is None:
        return np.zeros(6)
    spec = profile.spec.errors
    inj = spec.injection
    rms = np.array([inj.x, inj.px, inj.y, inj.py, inj.energy, 0.0])
    return truncated_normal(stream(seed, "injection"), rms, 6, spec.truncation)


@dataclass
class ErrorModel:
    """The errors of one machine: everything keyed by lattice index or BPM/corrector position.

    Attributes:
        dx, dy: magnet offsets [m] by lattice index.
        roll: magnet rolls [rad] by lattice index.
        field: relative main-field errors by lattice index.
        bpm_offset: (nbpm, 2) BPM offsets [m] relative to the magnetic axis (what BBA finds).
        bpm_gain: (nbpm, 2) relative gain errors (reading = (1 + gain) * position).
        bpm_roll: (nbpm,) BPM rolls [rad].
        bpm_noise, tbt_noise: rms reading noise [m] (closed orbit, turn by turn).
        corrector_calibration: family -> relative kick errors per corrector.
        rf_frequency: offset of the true RF frequency from its setpoint [Hz].
        tune_noise: rms noise of the tune monitor.
        seed: the seed drawn (``None``: ideal or explicit errors).
        scale: the multiplier applied to the alignment errors (dx, dy, roll).
    """

    dx: dict[int, float] = _field(default_factory=dict)
    dy: dict[int, float] = _field(default_factory=dict)
    roll: dict[int, float] = _field(default_factory=dict)
    field: dict[int, float] = _field(default_factory=dict)
    bpm_offset: np.ndarray | None = None
    bpm_gain: np.ndarray | None = None
    bpm_roll: np.ndarray | None = None
    bpm_noise: float = 0.0
    tbt_noise: float = 0.0
    corrector_calibration: dict[str, np.ndarray] = _field(default_factory=dict)
    rf_frequency: float = 0.0
    tune_noise: float = 0.0
    seed: int | None = None
    scale: float = 1.0

    @classmethod
    def ideal(cls, profile: Profile) -> ErrorModel:
        n = len(profile.bpm_refpts)
        return cls(bpm_offset=np.zeros((n, 2)), bpm_gain=np.zeros((n, 2)), bpm_roll=np.zeros(n))

    @classmethod
    def generate(cls, profile: Profile, seed: int, scale: float | None = None) -> ErrorModel:
        """Draw the profile's default error set for ``seed``; ``scale`` overrides the alignment scale.

        Each quantity has its own named stream (:func:`named_stream`): per magnet ``errors/magnets/element/<dx|dy|
        roll|field>/<lattice index>`` (:func:`element_normals`), ``errors/bpm/<offset|gain|roll>``,
        ``errors/corrector_calibration/<family>``, ``errors/rf_frequency``."""
        spec = profile.spec.errors
        cut = spec.truncation
        s = spec.scale if scale is None else float(scale)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"error_scale must be a finite number >= 0, got {scale!r}")
        em = cls.ideal(profile)
        em.seed, em.scale = int(seed), s
        for k, mspec in enumerate(spec.magnets):
            refs = profile.select(mspec.select, f"errors.magnets.{k}.select", empty_ok=True)
            if not len(refs):  # a class absent from this lattice is not an error here
                continue
            key = "element"  # per element: its draws depend neither on the group's selector nor on the order
            draws = {q: element_normals(seed, refs, "errors", "magnets", key, q, cut=cut)
                     for q, sig in (("dx", mspec.dx), ("dy", mspec.dy), ("roll", mspec.roll), ("field", mspec.field))
                     if sig}
            for q, sigma, out in (("dx", mspec.dx * s, em.dx), ("dy", mspec.dy * s, em.dy),
                                  ("roll", mspec.roll * s, em.roll), ("field", mspec.field, em.field)):
                if sigma:
                    for i, r in enumerate(refs.tolist()):
                        out[r] = float(draws[q][i] * sigma)
        nb = len(profile.bpm_refpts)
        b = spec.bpm
        em.bpm_offset = truncated_normal(named_stream(seed, "errors", "bpm", "offset"), b.offset, (nb, 2), cut)
        em.bpm_gain = truncated_normal(named_stream(seed, "errors", "bpm", "gain"), b.gain, (nb, 2), cut)
        em.bpm_roll = truncated_normal(named_stream(seed, "errors", "bpm", "roll"), b.roll, nb, cut)
        em.bpm_noise = b.noise
        em.tbt_noise = b.tbt_noise
        for name, fam in profile.families_of_type("hcor", "vcor").items():
            em.corrector_calibration[name] = truncated_normal(
                named_stream(seed, "errors", "corrector_calibration", name), spec.corrector_calibration, len(fam), cut)
        em.rf_frequency = float(truncated_normal(named_stream(seed, "errors", "rf_frequency"), spec.rf_frequency,
                                                 1, cut)[0])
        em.tune_noise = spec.tune_noise
        return em

    def scaled(self, factor: float) -> ErrorModel:
        """A copy with the alignment errors (dx, dy, roll) multiplied by ``factor`` (``scale`` follows)."""
        out = ErrorModel(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.dx = {r: v * factor for r, v in self.dx.items()}
        out.dy = {r: v * factor for r, v in self.dy.items()}
        out.roll = {r: v * factor for r, v in self.roll.items()}
        out.scale = self.scale * factor
        return out

    def bpm_transform(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the BPMs show for a true beam position (x, y) [m] at each BPM (no noise)."""
        ox, oy = self.bpm_offset[:, 0], self.bpm_offset[:, 1]
        c, s = np.cos(self.bpm_roll), np.sin(self.bpm_roll)
        u, v = x - ox, y - oy
        xm = (1.0 + self.bpm_gain[:, 0]) * (c * u + s * v)
        ym = (1.0 + self.bpm_gain[:, 1]) * (-s * u + c * v)
        return xm, ym

    def bpm_linear(self) -> np.ndarray:
        """The (2n, 2n) matrix mapping true position changes [x; y] to BPM reading changes [x; y]."""
        n = len(self.bpm_roll)
        c, s = np.cos(self.bpm_roll), np.sin(self.bpm_roll)
        gx, gy = 1.0 + self.bpm_gain[:, 0], 1.0 + self.bpm_gain[:, 1]
        m = np.zeros((2 * n, 2 * n))
        i = np.arange(n)
        m[i, i] = gx * c
        m[i, n + i] = gx * s
        m[n + i, i] = -gy * s
        m[n + i, n + i] = gy * c
        return m


# ----------------------------------------------------------------------------------------------------------
# closed orbit with errors: the check, the search of the error scale, the diagnosis
@dataclass
class OrbitCheck:
    """Whether the beam has a closed orbit (a trajectory through a line) with an error set, and its size."""

    found: bool
    rms_x: float = float("nan")  # [m] true orbit at the BPMs
    rms_y: float = float("nan")
    reason: str = ""
    x: np.ndarray | None = _field(default=None, repr=False)  # [m] the true orbit at each BPM (when found)
    y: np.ndarray | None = _field(default=None, repr=False)


def design_roll(e) -> float:
    """The design tilt [rad] an element carries in the lattice file (a 45-degree skew quadrupole...), which a roll
    error adds to, never replaces; 0 for an element without one."""
    theta = design_tilt_angle(getattr(e, "R1", None))
    return 0.0 if theta is None else float(theta)


def apply_alignment(ring, em: ErrorModel) -> None:
    """Write ``em``'s offsets and rolls into ``ring`` (pyAT ``shift_elem``, ``tilt_elem``), as the twin does. A design
    tilt of the file is kept and a roll adds to it (read first: pyAT's ``shift_elem`` resets the rotation)."""
    import at

    shifted = set(em.dx) | set(em.dy)
    tilts = {r: design_roll(ring[r]) for r in sorted(shifted | set(em.roll))}
    tilted = em.roll.keys() | {r for r, t in tilts.items() if t}
    for r in sorted(shifted | tilted):  # one transformation per element (pyAT builds T1, T2, R1, R2 once)
        kw = {"dx": em.dx.get(r, 0.0), "dy": em.dy.get(r, 0.0)} if r in shifted else {}
        if r in tilted:
            kw["tilt"] = tilts[r] + em.roll.get(r, 0.0)
        at.transform_elem(ring[r], **kw)


def _apply_errors(ring, em: ErrorModel) -> None:
    """Write ``em``'s alignment and main-field errors into ``ring`` as the twin does (at design setpoints)."""
    apply_alignment(ring, em)
    for r in sorted(em.field):
        e = ring[r]
        main = {"Quadrupole": 1, "Sextupole": 2, "Octupole": 3}.get(type(e).__name__)
        if main is not None:
            pb = np.asarray(e.PolynomB, dtype=float).copy()
            pb[main] *= 1.0 + em.field[r]
            e.PolynomB = pb
        elif type(e).__name__ in ("Dipole", "Bend") and e.Length > 0:
            pb = np.asarray(e.PolynomB, dtype=float).copy()
            pb[0] += em.field[r] * e.BendingAngle / e.Length
            e.PolynomB = pb


class _Alignment:
    """The alignment of an error set on a lattice copy, rescaled in place fast (for the scale search).

    Writes the entrance/exit translations ``T1 = -(dx, 0, dy, 0, 0, 0)``, ``T2 = -T1`` and the rotations ``R1``/``R2``
    by the roll, scaled by ``s``, in place (pyAT's converted lattice stays valid with ``keep_lattice``). This is
    pyAT's ``shift_elem``/``tilt_elem`` but for the translation and rotation a roll or a shift adds on a bend; where
    that part exceeds ``TOL`` at scale 1 (m or rad; a strong bend: 45 um and 45 urad on a 20-degree transfer-line
    dipole, which moved a line's trajectory by millimetres; on ALS's 10-degree bends the simple form put a seed's
    limit at 0.49 where pyAT's matrices give 0.64), the element's arrays are pyAT's own ``transform_elem`` at each
    scale, copied in place. ``TOL`` = 1e-6: the profiles generated for the six test lattices are the same as with
    1e-9 (every bend exact), in 10.4 s instead of 13.2 s."""

    TOL = 1e-6

    def __init__(self, ring, em: ErrorModel, tilts: dict[int, float] | None = None):
        """``tilts``: the design tilts of the elements [rad] (default: read from ``ring``, which must not carry a
        roll error yet)."""
        import at

        self.items = []
        self.exact = []
        for r in sorted(set(em.dx) | set(em.dy) | set(em.roll)):
            e = ring[r]
            t = np.zeros(6)
            t[0], t[2] = em.dx.get(r, 0.0), em.dy.get(r, 0.0)
            roll = em.roll.get(r, 0.0)
            tilt = design_roll(e) if tilts is None else tilts.get(r, 0.0)
            e.T1 = -t
            e.T2 = t.copy()
            if roll:
                e.R1 = np.eye(6)
                e.R2 = np.eye(6)
            item = (e, -t, t.copy(), roll, tilt)
            if getattr(e, "BendingAngle", 0.0):
                ref = e.deepcopy()
                at.transform_elem(ref, dx=t[0], dy=t[2], tilt=tilt + roll)
                self._fast(item, 1.0)
                if any(np.max(np.abs(np.asarray(getattr(ref, k)) - getattr(e, k, np.eye(6)))) > self.TOL
                       for k in ("T1", "T2", "R1", "R2")):
                    for k in ("R1", "R2"):
                        if getattr(e, k, None) is None:
                            setattr(e, k, np.eye(6))
                    self.exact.append((e, ref, t[0], t[2], roll, tilt))
                    continue
            self.items.append(item)
        self.scale(1.0)

    @staticmethod
    def _fast(item, s: float) -> None:
        e, t1, t2, roll, tilt = item
        np.multiply(t1, s, out=e.T1)
        np.multiply(t2, s, out=e.T2)
        if not roll:
            return
        c, sn = math.cos(tilt + s * roll), math.sin(tilt + s * roll)
        for m, sg in ((e.R1, 1.0), (e.R2, -1.0)):
            m[0, 0] = m[1, 1] = m[2, 2] = m[3, 3] = c
            m[0, 2] = m[1, 3] = sg * sn
            m[2, 0] = m[3, 1] = -sg * sn

    def scale(self, s: float) -> None:
        import at

        for item in self.items:
            self._fast(item, s)
        for e, ref, dx, dy, roll, tilt in self.exact:  # (ref: a scratch copy, transformed from scratch each time)
            at.transform_elem(ref, dx=s * dx, dy=s * dy, tilt=tilt + s * roll)
            for k in ("T1", "T2", "R1", "R2"):
                np.copyto(getattr(e, k), getattr(ref, k))


_IDX5 = np.array([0, 1, 2, 3, 5])


def _orbit4(ring, bpms: np.ndarray, keep: bool, tol: float = 1e-11, max_iter: int = 30):
    """4D closed orbit at fixed path length (pyAT's ``find_orbit4(dct=0)`` Newton) with the fast engine calls.

    Returns ``(z, positions (nbpm, 6), one-turn 4x4 map)`` or a reason string."""
    from . import _engine

    step = 3e-8
    delta = np.zeros((6, 6), order="F")
    for i in range(5):
        delta[i, i] = step
    id5 = np.zeros((5, 5))
    id5[np.arange(4), np.arange(4)] = 1.0
    z = np.zeros(6)
    end = [len(ring)]
    for _ in range(max_iter):
        out = _engine.track(ring, z.reshape(6, 1) + delta, end, keep)[:, :, 0, 0]
        keep = True
        if not np.all(np.isfinite(out)):
            return "no closed orbit (tracking lost the particle)"
        a = (out[_IDX5, :5] - out[_IDX5, 5:]) / step - id5
        b = out[_IDX5, 5] - np.append(z[:4], 0.0)
        try:
            dz = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            return "no closed orbit (singular one-turn map)"
        z[:5] -= dz
        if not np.all(np.isfinite(z)) or np.max(np.abs(z[:4])) > 1.0:
            return "no closed orbit (the Newton search diverged)"
        if np.linalg.norm(dz) < tol:
            break
    else:
        return "no closed orbit (the Newton search did not converge)"
    refs = np.append(np.asarray(bpms, dtype=np.uint32), len(ring))
    pos = _engine.track(ring, z.reshape(6, 1).copy(), refs, True)[:, 0, :-1, 0].T
    return z, pos, a[:4, :4] + np.eye(4)


def _probe(profile: Profile, ring, keep: bool = False, entrance: np.ndarray | None = None) -> OrbitCheck:
    """Closed orbit (ring) or trajectory (line) of ``ring`` at the BPMs, with the twin's loss criteria.

    ``keep``: reuse the engine's converted lattice (only arrays changed in place since it was converted).
    ``entrance``: a line's (6,) injection error added to its design entrance (the beam the twin's orbit mode
    tracks: :func:`injection_error` of the seed)."""
    from . import _engine

    beam = profile.spec.beam
    bpms = profile.bpm_refpts
    with _engine.ENGINE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if profile.kind == "ring":
                res = _orbit4(ring, bpms, keep)
                if isinstance(res, str):
                    return OrbitCheck(False, reason=res)
                z, pos, m44 = res
                rho = float(np.max(np.abs(np.linalg.eigvals(m44))))
                if rho > 1.0 + 1e-3:
                    return OrbitCheck(False, reason=f"unstable optics (one-turn eigenvalue modulus {rho:.4g})")
            else:
                z = line_entrance(profile)
                if entrance is not None:
                    z = z + np.asarray(entrance, dtype=float)
                pos, lost = line_trajectory(ring, z, bpms, beam, keep)
                if lost is not None:
                    return OrbitCheck(False, reason=lost)
        except Exception as err:  # noqa: BLE001 - pyAT raises AtError, LinAlgError...
            return OrbitCheck(False, reason=f"no closed orbit: {err}")
    x, y = pos[:, 0], pos[:, 2]
    if not np.all(np.isfinite(pos[:, :4])):
        return OrbitCheck(False, reason="particle lost in tracking")
    mx, my = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    if mx > beam.aperture_x or my > beam.aperture_y:
        return OrbitCheck(False, reason=f"orbit beyond the aperture (max |x| {mx * 1e3:.2f} mm, |y| {my * 1e3:.2f} mm)")
    return OrbitCheck(True, float(np.sqrt(np.mean(x * x))), float(np.sqrt(np.mean(y * y))), x=x.copy(), y=y.copy())


def line_entrance(profile: Profile) -> np.ndarray:
    """(6,) design entrance orbit of a line: the profile's ``twiss_in.closed_orbit``, else on axis."""
    z = np.zeros(6)
    co = (profile.spec.twiss_in or {}).get("closed_orbit")
    if co is not None:
        co = np.atleast_1d(np.asarray(co, dtype=float))
        z[:len(co)] = co
    return z


def line_trajectory(ring, z: np.ndarray, bpms: np.ndarray, beam: Any,
                    keep: bool = False) -> tuple[np.ndarray | None, str | None]:
    """One pass of a line from ``z`` (6,): ``(positions at the BPMs (nbpm, 6), None)``, or ``(None, where it is
    lost)``. Lost in tracking (not finite) or beyond the aperture of ``beam`` (the profile's ``beam``:
    ``aperture_x``, ``aperture_y``) at any element, as a trajectory shot is: the twin's orbit mode and the profile's
    checks use this one criterion. ``keep``: reuse the engine's converted lattice."""
    from . import _engine

    out = _engine.track(ring, np.asfortranarray(np.asarray(z, dtype=float).reshape(6, 1)),
                        np.arange(len(ring) + 1, dtype=np.uint32), keep)[:, 0, :, 0]
    with np.errstate(invalid="ignore"):
        bad = (~np.all(np.isfinite(out[:4]), axis=0) | (np.abs(out[0]) > beam.aperture_x)
               | (np.abs(out[2]) > beam.aperture_y))
    if not np.any(bad):
        return out[:, bpms].T, None
    k = int(np.argmax(bad))
    el = min(k, len(ring) - 1)
    where = f"at element {el} ({ring[el].FamName})"
    if not np.all(np.isfinite(out[:4, k])):
        return None, f"particle lost in tracking {where}"
    return None, f"trajectory beyond the aperture {where} (x {out[0, k] * 1e3:.2f} mm, y {out[2, k] * 1e3:.2f} mm)"


def check_closed_orbit(profile: Profile, seed: int | None = 1, scale: float | None = None,
                       errors: ErrorModel | None = None) -> OrbitCheck:
    """Closed orbit (or line trajectory) of the profile's lattice with the errors of ``seed`` at ``scale``.

    The same errors and loss criteria as ``Twin(profile, seed, error_scale=scale)`` at its design setpoints
    (closed orbit found, stable, inside the BPM aperture), without building a twin."""
    ring = profile.load_lattice()
    if errors is None and seed is not None:
        errors = ErrorModel.generate(profile, seed, scale)
    if errors is not None:
        _apply_errors(ring, errors)
    return _probe(profile, ring, entrance=_entrance(profile, seed))


def _entrance(profile: Profile, seed: int | None) -> np.ndarray | None:
    """A line's injection error of ``seed`` (its trajectory starts from the injected beam); None for a ring."""
    return None if profile.kind == "ring" else injection_error(profile, seed)


@dataclass
class ScaleSearch:
    """Result of :func:`closed_orbit_scale`.

    Attributes:
        scale: the recommended ``errors.scale`` (``fraction`` x the smallest limit, capped at ``cap``).
        limits: per seed, the largest scale found with a closed orbit (``cap_search`` if never lost).
        seeds: the seeds searched.
        fraction, cap: as given.
        check: the closed orbit of the first seed not excluded at ``scale``.
        excluded: seeds left out of the smallest limit: no closed orbit with their field errors alone (alignment
            at ``SCALE_SEARCH_FLOOR`` of the search range), a minority of the seeds (see :func:`recommended_scale`).
    """

    scale: float
    limits: dict[int, float]
    seeds: list[int]
    fraction: float
    cap: float
    check: OrbitCheck
    kind: str = "ring"
    excluded: list[int] = _field(default_factory=list)

    def describe(self) -> str:
        lim = min(v for s, v in self.limits.items() if s not in self.excluded)
        what = "closed orbit" if self.kind == "ring" else "trajectory through the line"
        how = (f"the cap {self.cap:g}: the tolerances as written keep a {what} up to {lim:.3g}x"
               if self.scale >= self.cap else f"{self.fraction:g} x {lim:.3g}")
        after = ("above it a real machine needs first-turn threading before orbit tools" if self.kind == "ring" else
                 "above it the line needs steering from its entrance, BPM by BPM")
        kept = [s for s in self.seeds if s not in self.excluded]
        which = (f"every one of seeds {self.seeds[0]}-{self.seeds[-1]}" if not self.excluded else
                 f"every other seed of {self.seeds[0]}-{self.seeds[-1]} ({', '.join(map(str, kept))})")
        text = (f"alignment errors scaled by {self.scale:.3g} ({how}; {lim:.3g} is the largest scale that kept a "
                f"{what} for {which}, per seed: "
                f"{', '.join(f'{v:.3g}' for v in self.limits.values())}); {after}")
        if self.excluded:
            seeds = ", ".join(map(str, self.excluded))
            text += (f"; seed(s) {seeds} have no {what} with their field errors alone (alignment scaled to "
                     f"~0: the search has no lower end for them) and are left out of the smallest limit: a twin of "
                     f"such a seed may start without a {what}, as a real machine after a shutdown may, and then "
                     "needs "
                     + ("first-turn threading (thread_first_turns)" if self.kind == "ring" else
                        "steering from its entrance (correct_trajectory)"))
        return text


#: The smallest alignment scale :func:`closed_orbit_scale` tries, as a fraction of its ``search_max``.
SCALE_SEARCH_FLOOR = 1.0 / 1024


def recommended_scale(limits: dict[int, float], fraction: float = 0.5, cap: float = 1.0) -> tuple[float, list[int]]:
    """The ``errors.scale`` of per-seed limits (the largest alignment scale keeping a closed orbit, 0 for none):
    ``(fraction x the smallest limit capped at cap, excluded seeds)``.

    Seeds with no closed orbit at the smallest scale (limit 0: the field errors alone lose it) are left out of the
    smallest limit when they are fewer than half of the seeds and another seed has a positive limit: one unlucky
    draw of the field errors does not set the alignment errors of every twin to zero. Otherwise (as many dead
    seeds as live ones) the scale is 0 and nothing is excluded. The scale is rounded to 2 significant digits."""
    if not limits:
        raise ValueError("no seed searched: give at least one seed")
    dead = sorted(s for s, v in limits.items() if v <= 0)
    live = [v for v in limits.values() if v > 0]
    excluded = dead if live and 2 * len(dead) < len(limits) else []
    lim = min(live) if excluded else min(limits.values())
    scale = min(cap, fraction * lim)
    return (float(f"{scale:.2g}") if scale > 0 else 0.0), excluded


def closed_orbit_scale(profile: Profile, seeds: Sequence[int] = (1, 2, 3, 4, 5), *, fraction: float = 0.5,
                       cap: float = 1.0, search_max: float = 2.0, steps: int = 7) -> ScaleSearch:
    """Size the alignment errors to the machine: the largest scale keeping a closed orbit, by bisection per seed.

    For every seed, the errors are drawn once (field errors as they are, alignment at scale 1) and the alignment
    is rescaled in place while bisecting (in log scale, ``steps`` closed-orbit solves) between 0 and
    ``search_max``. The recommended scale is ``fraction`` x the smallest per-seed limit, capped at ``cap``
    (``1``: the profile's tolerances as written); a minority of seeds with no closed orbit at any scale are left
    out of that minimum (:func:`recommended_scale`; ``ScaleSearch.excluded``).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    from . import _engine

    ring = profile.load_lattice()  # one copy for every seed: the errors are rewritten, the fields restored
    tilts = {i: t for i, e in enumerate(ring) if (t := design_roll(e))}  # before any roll is written
    design: dict[int, np.ndarray] = {}
    limits: dict[int, float] = {}
    for seed in seeds:
        unit = ErrorModel.generate(profile, seed, scale=1.0)
        for r in unit.field:
            design.setdefault(r, np.array(getattr(ring[r], "PolynomB", np.zeros(1)), dtype=float))
        for r, pb in design.items():
            ring[r].PolynomB = pb.copy()
        _apply_errors(ring, ErrorModel(field=unit.field))  # field errors; the alignment is rescaled below
        align = _Alignment(ring, unit, tilts)
        state = {"converted": False}
        entrance = _entrance(profile, seed)

        def ok(s: float, align=align, state=state, entrance=entrance) -> bool:
            with _engine.ENGINE_LOCK:  # the converted lattice is global: nobody else tracks meanwhile
                keep = state["converted"] and _engine.generation() == state.get("gen")
                align.scale(s)
                found = _probe(profile, ring, keep=keep, entrance=entrance).found
                state["converted"], state["gen"] = True, _engine.generation()
                return found

        if ok(search_max):
            limits[int(seed)] = search_max
            continue
        if not ok(search_max * SCALE_SEARCH_FLOOR):
            limits[int(seed)] = 0.0
            continue
        lo, hi = math.log(search_max * SCALE_SEARCH_FLOOR), math.log(search_max)
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            if ok(math.exp(mid)):
                lo = mid
            else:
                hi = mid
        limits[int(seed)] = math.exp(lo)
    scale, excluded = recommended_scale(limits, fraction, cap)
    first = next(int(s) for s in seeds if int(s) not in excluded)
    return ScaleSearch(scale, limits, [int(s) for s in seeds], fraction, cap,
                       check_closed_orbit(profile, first, scale), profile.kind, excluded)


def diagnose_closed_orbit(twin: Any) -> str | None:
    """Why ``twin`` has no closed orbit (or no line trajectory) and what to do; ``None`` when the beam is there.

    The text names the seed and the error scale and says what to do: lower ``error_scale`` (``connect(profile,
    seed=..., error_scale=...)`` or the profile's ``errors.scale``), or thread the first turns; after setpoint
    changes, restore them. A beam-loss anomaly is not diagnosed (``None`` is not returned then: its own reason is).
    """
    obs = twin.observables()
    if not obs.lost:
        return None
    return explain_loss(twin, obs.reason)


def explain_loss(twin: Any, reason: str) -> str:
    """The loss ``reason`` of ``twin`` completed with its cause and the remedy (see :func:`diagnose_closed_orbit`)."""
    if twin.anomalies.beam_lost or "what to do:" in reason.lower():
        return reason
    prof = twin.profile
    at_design = all(np.array_equal(st.setpoint, st.design_hw) for st in twin._families.values())
    at_design = at_design and twin.rf_frequency_setpoint == twin.rf_nominal_frequency
    em = twin.errors
    where = "closed orbit" if twin.is_ring else "trajectory through the line"
    if not at_design:
        return (f"{reason}. What to do: this follows setpoint changes (the seeded machine had its {where} at its "
                "design setpoints or did not; see twin.reset()): restore the setpoints (restore_config, "
                "twin.reset()) or undo the last step")
    if twin.seed is None or em.seed is None:
        return (f"{reason}. What to do: there is no {where} on the design lattice of {prof.name!r} itself: check the "
                "lattice file, the families' fields and calibrations and the BPM aperture (profile key beam)")
    s = em.scale
    hint = f"{s / 3:.2g}" if s > 0 else "0"
    first = ("thread the first turns (thread_first_turns) and correct the trajectory before the ring tools"
             if twin.is_ring else "steer the line from its entrance, BPM by BPM (correct_trajectory)")
    return (f"{reason}. What to do: seed {twin.seed} of {prof.name!r} has no {where} with its errors at error_scale "
            f"{s:g} (profile errors.scale {prof.spec.errors.scale:g}): lower error_scale, e.g. "
            f"connect({prof.name!r}, seed={twin.seed}, error_scale={hint}) or errors.scale in the profile; or {first}")
