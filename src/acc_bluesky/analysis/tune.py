"""Tunes: the model lattice at the machine's setpoints, tune response matrices (measured or model), tune correction.

Conventions:

- tunes are *fractional* (``qx, qy`` in [0, 1)), as a tune monitor reports them;
- a family response is a (2, n) matrix: rows the two planes (x, y), columns the magnet families. A family step
  moves every in-service magnet of the family by the same amount; the response is given per ampere
  (``matrix_hw``) and per unit of the family's physics strength (``matrix``: per m^-2 for quadrupoles, per m^-3
  for sextupoles), the two related by the calibration slope at the operating point;
- the model is the profile's design lattice with the machine's family setpoints applied through the nominal
  calibration (MML's "model" mode): no errors, no correctors.

Pure numpy/pyAT: usable from a notebook or a Dask worker without a RunEngine.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ..profile import Profile
from ._common import FloatArray, resolve_profile, run_results, run_start, tool_run_start

__all__ = [
    "nearest_resonance",
    "resonance_distance",
    "resonance_gaps",
    "MODEL_FAMILY_TYPES",
    "FamilyResponse",
    "TuneResponse",
    "MeasuredTunes",
    "TuneCorrection",
    "model_lattice",
    "family_strengths",
    "set_family_strengths",
    "lattice_tunes",
    "model_tune_response",
    "select_families",
    "family_step",
    "tune_difference",
]

#: Family types whose setpoints shape the linear optics and go into the model lattice (correctors do not).
MODEL_FAMILY_TYPES = ("quadrupole", "sextupole", "octupole", "skew", "dipole", "magnet")

_ALIASES = {"K": ("PolynomB", 1), "H": ("PolynomB", 2)}


# ----------------------------------------------------------------------------------------------------
# model lattice
def _field(profile: Profile, name: str) -> tuple[str, int | None]:
    try:
        fam = profile.families[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; valid families: {sorted(profile.families)}") from None
    attr, index = fam.spec.field_parts
    return _ALIASES.get(attr, (attr, index))


def family_strengths(ring, profile: Profile | Any, name: str) -> FloatArray:
    """Physics strength of every magnet of family ``name`` in ``ring`` (the profile's field, e.g. K [m^-2])."""
    profile = resolve_profile(profile)
    attr, index = _field(profile, name)
    out = []
    for r in profile.families[name].refpts.tolist():
        v = getattr(ring[r], attr, 0.0)
        if index is not None:
            v = v[index] if v is not None and len(v) > index else 0.0
        out.append(float(v))
    return np.asarray(out)


def set_family_strengths(ring, profile: Profile | Any, name: str, values: npt.ArrayLike) -> None:
    """Write physics strengths (scalar or one per magnet) to family ``name`` in ``ring``, in place."""
    profile = resolve_profile(profile)
    attr, index = _field(profile, name)
    refs = profile.families[name].refpts.tolist()
    vals = np.broadcast_to(np.asarray(values, dtype=float), (len(refs),))
    for r, v in zip(refs, vals.tolist()):
        e = ring[r]
        if index is None:
            setattr(e, attr, v)
            continue
        arr = getattr(e, attr, None)
        if arr is None or len(arr) <= index:
            new = np.zeros(index + 1)
            if arr is not None:
                new[:len(arr)] = arr
            arr = new
            if attr in ("PolynomA", "PolynomB"):
                other = "PolynomA" if attr == "PolynomB" else "PolynomB"
                o = getattr(e, other, None)
                if o is None or len(o) <= index:
                    pad = np.zeros(index + 1)
                    if o is not None:
                        pad[:len(o)] = o
                    setattr(e, other, pad)
                e.MaxOrder = max(int(getattr(e, "MaxOrder", 0)), index)
        else:
            arr = np.array(arr, dtype=float)
        arr[index] = v
        setattr(e, attr, arr)


def model_lattice(source: Any, setpoints: Mapping[str, npt.ArrayLike] | None = None, *, lattice=None):
    """The model: the design lattice (4D) with family setpoints [hardware units] applied.

    Args:
        source: a Profile, profile name, Twin or Machine.
        setpoints: ``{family: hardware setpoint(s)}`` (A, scalar or one per magnet); families whose type is not
            in :data:`MODEL_FAMILY_TYPES` (correctors) are ignored. ``None``: the design lattice as is.
        lattice: start from this pyAT lattice (copied) instead of the profile's design lattice.

    Returns:
        a new pyAT ``Lattice``.
    """
    profile = resolve_profile(source)
    ring = profile.load_lattice() if lattice is None else lattice.deepcopy()
    if getattr(ring, "is_6d", False):
        ring = ring.disable_6d(copy=True)
    e = profile.energy
    for name, hw in (setpoints or {}).items():
        fam = profile.families.get(name)
        if fam is None:
            raise KeyError(f"unknown family {name!r} in setpoints; valid families: {sorted(profile.families)}")
        if fam.spec.type not in MODEL_FAMILY_TYPES:
            continue
        phys = fam.spec.calibration.hw2physics(np.asarray(hw, dtype=float), e, e)
        set_family_strengths(ring, profile, name, phys)
    return ring


def lattice_tunes(ring) -> FloatArray:
    """Fractional tunes (qx, qy) of a pyAT ring, per lattice period (pyAT ``get_optics``: the one-turn matrix of the
    lattice as given at dp=0, coupling included), as the twin's tune monitor reads them.

    A lattice of one cell with ``periodicity`` P > 1 is simulated as that cell closed on itself: its tunes are
    the cell's (pyAT's ``get_tune`` would give the fractional part of P times them, a different number).
    """
    import at

    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, ringdata, _ = at.get_optics(ring)
        except at.AtError:  # linearly unstable: no tunes (NaN, as get_tune gives)
            return np.full(2, np.nan)
    return np.asarray(ringdata.tune[:2], dtype=float) % 1.0


def tune_difference(target: npt.ArrayLike, measured: npt.ArrayLike) -> FloatArray:
    """``target - measured`` for fractional tunes (no wrapping: a correction never crosses an integer)."""
    return np.asarray(target, dtype=float) - np.asarray(measured, dtype=float)


# ----------------------------------------------------------------------------------------------------
# family responses
@dataclass
class FamilyResponse:
    """Response of a pair of observables (x, y) to magnet families (measured or model).

    Attributes:
        families: the n family names (columns).
        matrix_hw: (2, n) response per A of a family step (every in-service magnet of the family stepped).
        matrix: (2, n) response per physics unit of the family strength (m^-2 quadrupoles, m^-3 sextupoles).
        reference: (2,) the observables at the reference (unstepped) setting.
        delta: (n,) half step [A] per family used to measure/compute it (``None`` if unknown).
        kind: ``"measured"`` or ``"model"``.
        uid: the run it was read from, if any.
        physics_units: physics unit of each family strength.
        metadata: anything else (profile, seed, ...).
    """

    families: list[str]
    matrix_hw: FloatArray
    matrix: FloatArray
    reference: FloatArray = field(default_factory=lambda: np.full(2, np.nan))
    delta: FloatArray | None = None
    kind: str = "measured"
    uid: str | None = None
    physics_units: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    observable: ClassVar[str] = "observable"  # "tune" / "chromaticity"
    tool: ClassVar[str] = ""  # the tool whose runs hold it

    def __post_init__(self) -> None:
        self.families = [str(f) for f in self.families]
        self.matrix_hw = np.asarray(self.matrix_hw, dtype=float).reshape(2, -1)
        self.matrix = np.asarray(self.matrix, dtype=float).reshape(2, -1)
        self.reference = np.asarray(self.reference, dtype=float).reshape(2)
        n = len(self.families)
        if self.matrix_hw.shape != (2, n) or self.matrix.shape != (2, n):
            raise ValueError(f"{type(self).__name__}: matrices must be (2, {n}) for families {self.families}, "
                             f"got {self.matrix_hw.shape} and {self.matrix.shape}")
        if self.delta is not None:
            self.delta = np.asarray(self.delta, dtype=float).reshape(n)
        if not self.physics_units:
            self.physics_units = [""] * n

    def __repr__(self) -> str:
        rows = "; ".join(f"{f}: ({a:+.4g}, {b:+.4g})/A" for f, a, b in
                         zip(self.families, self.matrix_hw[0], self.matrix_hw[1]))
        return f"{type(self).__name__}({self.kind}{', uid=' + self.uid[:8] if self.uid else ''}: {rows})"

    # ------------------------------------------------------------------------------------------------
    def index(self, family: str) -> int:
        try:
            return self.families.index(str(family))
        except ValueError:
            raise KeyError(f"family {family!r} is not in this {self.observable} response "
                           f"(families: {self.families})") from None

    def select(self, families: Sequence[str]) -> FamilyResponse:
        """A new response restricted to ``families`` (in that order)."""
        idx = [self.index(f) for f in families]
        return type(self)(
            families=[self.families[i] for i in idx], matrix_hw=self.matrix_hw[:, idx], matrix=self.matrix[:, idx],
            reference=self.reference.copy(), delta=None if self.delta is None else self.delta[idx],
            kind=self.kind, uid=self.uid, physics_units=[self.physics_units[i] for i in idx],
            metadata=dict(self.metadata))

    def best_pair(self, allowed: Sequence[str] | None = None) -> tuple[str, str]:
        """The two families that control both planes best (see :func:`select_families`)."""
        return select_families(self.matrix_hw, self.families, allowed=allowed)

    def step(self, change: npt.ArrayLike, families: Sequence[str] | None = None, *,
             units: str = "hw") -> FloatArray:
        """Family steps that produce ``change`` (2,) of the observables (least-norm if more than 2 families).

        Args:
            change: wanted change of the (x, y) observables.
            families: the families to use (default: all in the response).
            units: ``"hw"`` -> steps in A, ``"physics"`` -> in physics units.
        """
        if units not in ("hw", "physics"):
            raise ValueError(f"units must be 'hw' (A) or 'physics', got {units!r}")
        sub = self if families is None else self.select(families)
        mat = sub.matrix_hw if units == "hw" else sub.matrix
        return family_step(mat, change)

    # ------------------------------------------------------------------------------------------------
    def to_results(self) -> dict[str, np.ndarray]:
        """Arrays for ``store_result`` (names in ``families`` order; store the names in the start metadata)."""
        out = {
            f"d{self._short}_dI": self.matrix_hw,
            f"d{self._short}_dK": self.matrix,
            f"{self._short}_reference": self.reference,
        }
        if self.delta is not None:
            out["delta"] = self.delta
        return out

    @property
    def _short(self) -> str:
        return "Q" if self.observable == "tune" else "xi"

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> FamilyResponse:
        """Rebuild from the stored results (and the start document, which names the families)."""
        start = dict(start or {})
        s = "Q" if cls.observable == "tune" else "xi"
        try:
            mhw = np.asarray(results[f"d{s}_dI"], dtype=float)
            mph = np.asarray(results[f"d{s}_dK"], dtype=float)
        except KeyError as err:
            raise KeyError(f"no {cls.observable} response in these results (expected d{s}_dI, d{s}_dK; got "
                           f"{sorted(results)}): is it a {cls.tool!r} run?") from err
        fams = start.get("families")
        if not fams:
            raise KeyError(f"the start document does not name the families of this {cls.observable} response")
        return cls(families=list(fams), matrix_hw=mhw, matrix=mph,
                   reference=np.asarray(results.get(f"{s}_reference", np.full(2, np.nan)), dtype=float),
                   delta=results.get("delta"), kind=str(start.get("response_kind", "measured")),
                   uid=start.get("uid"), physics_units=list(start.get("physics_units", [])),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "facility") if k in start})

    @classmethod
    def from_run(cls, run: Any) -> FamilyResponse:
        """Read a response back from a run of the catalogue (a Tiled ``BlueskyRun``)."""
        start = run_start(run)
        tool = start.get("tool")
        if tool is not None and cls.tool and tool != cls.tool:
            raise ValueError(f"run {start.get('uid', '?')} is a {tool!r} run, not a {cls.tool!r} run")
        return cls.from_results(run_results(run), start)


class TuneResponse(FamilyResponse):
    """Tune response matrix dQ/dI [1/A] and dQ/dK [1/m^-2] (2 x n quadrupole families)."""

    observable: ClassVar[str] = "tune"
    tool: ClassVar[str] = "tune_response"


# ----------------------------------------------------------------------------------------------------
def family_step(matrix: npt.ArrayLike, change: npt.ArrayLike, rcond: float = 1e-10) -> FloatArray:
    """Least-squares, least-norm steps ``s`` with ``matrix @ s = change`` (SVD pseudo-inverse)."""
    m = np.asarray(matrix, dtype=float)
    c = np.asarray(change, dtype=float).reshape(-1)
    if not np.all(np.isfinite(m)) or not np.all(np.isfinite(c)):
        raise ValueError("response or requested change contains NaN: measure the response again")
    return np.linalg.pinv(m, rcond=rcond) @ c


def select_families(matrix_hw: npt.ArrayLike, families: Sequence[str],
                    allowed: Sequence[str] | None = None) -> tuple[str, str]:
    """The pair of families that controls the two observables best.

    Every pair's 2x2 response (per A) is judged by its SVD: the pair with the largest smallest singular value
    needs the least current for the worst-case change, which favours families that are both strong and act in
    independent directions. Pairs whose columns are nearly parallel (condition number > 20) are only used if no
    other pair exists.

    Returns:
        the two family names, in ``families`` order.
    """
    m = np.asarray(matrix_hw, dtype=float)
    names = [str(f) for f in families]
    cand = [i for i, f in enumerate(names) if allowed is None or f in allowed]
    if len(cand) < 2:
        raise ValueError(f"need at least two families to control two planes, got {[names[i] for i in cand]}")
    best = None
    for i, j in itertools.combinations(cand, 2):
        if not np.all(np.isfinite(m[:, [i, j]])):  # a family whose response could not be measured
            continue
        s = np.linalg.svd(m[:, [i, j]], compute_uv=False)
        if not np.all(np.isfinite(s)):
            continue
        cond = s[0] / s[1] if s[1] > 0 else np.inf
        key = (cond <= 20.0, s[1])
        if best is None or key > best[0]:
            best = (key, (names[i], names[j]))
    if best is None:
        raise ValueError("no pair of families with a finite response")
    return best[1]


def _default_model_delta(strengths: np.ndarray) -> float:
    k = float(np.mean(np.abs(strengths))) if strengths.size else 0.0
    return 1e-3 * k if k > 0 else 1e-4


def _model_family_response(source: Any, families: Sequence[str] | None, types: tuple[str, ...],
                           observe, setpoints: Mapping[str, npt.ArrayLike] | None, lattice, delta,
                           cls: type[FamilyResponse]) -> FamilyResponse:
    profile = resolve_profile(source)
    if families is None:
        families = [n for n, f in profile.families.items() if f.spec.type in types]
        if not families:
            raise ValueError(f"profile {profile.name!r} has no family of type {types}")
    families = [str(f) for f in families]
    for f in families:
        _field(profile, f)
    ring = model_lattice(profile, setpoints, lattice=lattice)
    ref = observe(ring)
    e = profile.energy
    n = len(families)
    mph = np.zeros((2, n))
    mhw = np.zeros((2, n))
    steps = np.zeros(n)
    for j, name in enumerate(families):
        fam = profile.families[name]
        k0 = family_strengths(ring, profile, name)
        good = fam.good
        dk = _default_model_delta(k0[good]) if delta is None else float(np.broadcast_to(delta, (n,))[j])
        try:
            set_family_strengths(ring, profile, name, k0 + dk * good)
            plus = observe(ring)
            set_family_strengths(ring, profile, name, k0 - dk * good)
            minus = observe(ring)
        finally:
            set_family_strengths(ring, profile, name, k0)
        mph[:, j] = (plus - minus) / (2 * dk)
        hw0 = None if setpoints is None or name not in setpoints else np.asarray(setpoints[name], dtype=float)
        if hw0 is None:
            hw0 = fam.spec.calibration.physics2hw(k0, e, e)
        slope = np.atleast_1d(fam.spec.calibration.slope(np.mean(np.atleast_1d(hw0)[good]), e, e))[0]
        mhw[:, j] = mph[:, j] * slope
        steps[j] = dk / slope
    units = [profile.families[f].spec.physics_units or profile.families[f].spec.calibration.physics_units
             for f in families]
    return cls(families=families, matrix_hw=mhw, matrix=mph, reference=ref, delta=steps, kind="model",
               physics_units=units, metadata={"profile": profile.name})


def model_tune_response(source: Any, families: Sequence[str] | None = None, *,
                        setpoints: Mapping[str, npt.ArrayLike] | None = None, lattice=None,
                        delta: float | npt.ArrayLike | None = None) -> TuneResponse:
    """The model tune response (pure pyAT): each family's strength changed by +-delta, tunes recomputed.

    Args:
        source: a Profile, profile name, Twin or Machine.
        families: family names (default: every quadrupole family of the profile).
        setpoints: hardware setpoints ``{family: A}`` at which to evaluate the model (default: design).
        lattice: start from this lattice instead of the design one.
        delta: half step in physics units (m^-2) per family (default: 1e-3 of the family's mean |K|).

    Returns:
        :class:`TuneResponse` with ``kind="model"`` (dQ/dK [1/m^-2], dQ/dI [1/A] through the calibration slope).
    """
    return _model_family_response(source, families, ("quadrupole",), lattice_tunes, setpoints, lattice, delta,
                                  TuneResponse)


@dataclass
class MeasuredTunes:
    """Tunes read by the tune monitor (``measure_tune``).

    Attributes:
        q: (2,) mean fractional tunes (qx, qy).
        q_std: (2,) standard deviation of the readings.
        samples: (n_avg, 2) the readings.
        uid: the run it was read from, if any.
    """

    q: FloatArray
    q_std: FloatArray
    samples: FloatArray
    uid: str | None = None

    def __repr__(self) -> str:
        return (f"MeasuredTunes(qx={self.q[0]:.5f} +- {self.q_std[0]:.1e}, qy={self.q[1]:.5f} +- {self.q_std[1]:.1e}, "
                f"n_avg={len(self.samples)}{', uid=' + self.uid[:8] if self.uid else ''})")

    def to_results(self) -> dict[str, Any]:
        return {"qx": float(self.q[0]), "qy": float(self.q[1]), "qx_std": float(self.q_std[0]),
                "qy_std": float(self.q_std[1]), "samples": self.samples}

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> MeasuredTunes:
        try:
            q = np.array([float(results["qx"]), float(results["qy"])])
        except KeyError as err:
            raise KeyError(f"no tunes in these results (got {sorted(results)}): is it a 'tune' run?") from err
        s = np.array([float(results.get("qx_std", np.nan)), float(results.get("qy_std", np.nan))])
        smp = np.asarray(results.get("samples", q.reshape(1, 2)), dtype=float).reshape(-1, 2)
        return cls(q=q, q_std=s, samples=smp, uid=(start or {}).get("uid"))

    @classmethod
    def from_run(cls, run: Any) -> MeasuredTunes:
        """Read the tunes of a ``tune`` run back from the catalogue."""
        start = tool_run_start(run, "tune", "'tune' run")
        return cls.from_results(run_results(run), start)


@dataclass
class _Correction:
    """What a correction run did (``tune_correction`` / ``chromaticity_correction``), read back from its run."""

    families: list[str]
    history: FloatArray  # (k, 2) measured values before each correction and after the last
    std_history: FloatArray  # (k, 2)
    steps_hw: FloatArray  # (iterations, families) [A]
    delta_hw: FloatArray  # (families,) total [A]
    delta_physics: FloatArray  # (families,) total in physics units
    target: FloatArray  # (2,)
    converged: bool
    response_hw: FloatArray  # (2, families) [1/A]
    uid: str | None = None
    response_uid: str | None = None
    figure: str | None = None

    tool: ClassVar[str] = ""
    _prefix: ClassVar[str] = ""

    @property
    def before(self) -> FloatArray:
        return self.history[0]

    @property
    def after(self) -> FloatArray:
        return self.history[-1]

    @property
    def iterations(self) -> int:
        return len(self.steps_hw)

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None):
        start = dict(start or {})
        p = cls._prefix
        try:
            fams = list(start["families"])
            n = len(fams)
            hist = np.asarray(results[f"{p}_history"], dtype=float).reshape(-1, 2)
        except KeyError as err:
            raise KeyError(f"no {cls.tool} results here (missing {err}; got {sorted(results)})") from err
        figs = start.get("figures") or {}
        return cls(families=fams, history=hist,
                   std_history=np.asarray(results.get(f"{p}_std_history", np.full(hist.shape, np.nan)),
                                          dtype=float).reshape(-1, 2),
                   steps_hw=np.asarray(results["steps_hw"], dtype=float).reshape(-1, n),
                   delta_hw=np.asarray(results["delta_hw"], dtype=float).reshape(n),
                   delta_physics=np.asarray(results["delta_physics"], dtype=float).reshape(n),
                   target=np.asarray(results["target"], dtype=float).reshape(2),
                   converged=bool(int(np.asarray(results["converged"]))),
                   response_hw=np.asarray(results["response_hw"], dtype=float).reshape(2, n),
                   uid=start.get("uid"), response_uid=start.get("response_uid"),
                   figure=next(iter(figs.values()), None) if isinstance(figs, Mapping) else None)

    @classmethod
    def from_run(cls, run: Any):
        """Read a correction back from its run in the catalogue."""
        start = tool_run_start(run, cls.tool, f"{cls.tool!r} run")
        return cls.from_results(run_results(run), start)


class TuneCorrection(_Correction):
    """A ``tune_correction`` run: ``history`` are the measured tunes (qx, qy) before each correction and after
    the last; ``steps_hw`` the family steps [A] per iteration; ``delta_physics`` in m^-2."""

    tool: ClassVar[str] = "tune_correction"
    _prefix: ClassVar[str] = "q"

    def __repr__(self) -> str:
        return (f"TuneCorrection({', '.join(self.families)}: ({self.before[0]:.5f}, {self.before[1]:.5f}) -> "
                f"({self.after[0]:.5f}, {self.after[1]:.5f}), target ({self.target[0]:.5f}, {self.target[1]:.5f}), "
                f"{self.iterations} iteration(s), {'converged' if self.converged else 'NOT converged'})")


def resonance_distance(qx: float, qy: float, line: tuple[int, int, int]) -> float:
    """Distance [tune units] of the working point (qx, qy) to the resonance line ``m qx + n qy = p``:
    ``|m qx + n qy - p| / sqrt(m^2 + n^2)``."""
    m, n, p = line
    return abs(m * qx + n * qy - p) / float(np.hypot(m, n))


def resonance_gaps(qx: float, qy: float, order: int = 3) -> list[tuple[float, tuple[int, int, int]]]:
    """For every resonance ``(m, n)`` of order ``|m| + |n| <= order``, the distance [tune units] of (qx, qy) to its
    nearest line ``m qx + n qy = p`` and that line ``(m, n, p)``, in a fixed order (m, then n)."""
    out = []
    for m in range(0, order + 1):
        for n in range(-order, order + 1):
            if not 1 <= abs(m) + abs(n) <= order or (m == 0 and n < 0):
                continue
            line = (m, n, int(round(m * qx + n * qy)))
            out.append((resonance_distance(qx, qy, line), line))
    return out


def nearest_resonance(qx: float, qy: float, order: int = 3) -> tuple[float, tuple[int, int, int]]:
    """Distance [tune units] of the working point (qx, qy) to the nearest resonance line ``m qx + n qy = p`` of
    order ``|m| + |n| <= order``, and that line ``(m, n, p)`` (:func:`resonance_gaps`)."""
    return min(resonance_gaps(qx, qy, order), key=lambda g: g[0], default=(float("inf"), (0, 0, 0)))
