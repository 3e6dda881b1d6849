"""Orbit response matrices: measured (from a run) or from the model lattice, in physics and hardware units.

Layout everywhere: rows are the BPM readings ``[x_0 .. x_{n-1}, y_0 .. y_{n-1}]`` (2n rows: both planes, so the
coupling blocks are part of the matrix); columns are correctors (horizontal then vertical by default). The RF
column, when present, is kept apart in :attr:`OrbitResponse.rf` [m/Hz].

The model follows the twin's convention for a 4D ring: the closed orbit at *fixed path length* (fixed RF
frequency), i.e. pyAT's ``find_orbit4(ring, dct=...)``. A kick then also moves the beam energy to keep the path
length, which adds ``-eta_j eta_w / (alpha_c C)`` to the betatron response (Franchi & Liuzzo, arXiv:1711.06589).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ..profile import Profile
from ..profile.loader import assumed_harmonic_number
from ._common import FloatArray, as_result, corrector_table, resolve_profile, run_results, run_start

__all__ = [
    "OrbitResponse",
    "model_orm",
    "response_from_orbits",
    "momentum_compaction",
    "rf_frequency_of",
]


def momentum_compaction(lattice) -> float:
    """Linear momentum compaction factor of a pyAT lattice, computed on a 4D copy (radiation/cavities off)."""
    import at

    ring = lattice.disable_6d(copy=True) if getattr(lattice, "is_6d", False) else lattice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(at.get_mcf(ring))


def rf_frequency_of(lattice, profile: Profile | None = None) -> float:
    """Design RF frequency [Hz] of a lattice: its cavities', else harmonic number x revolution frequency, the
    harmonic number from the profile's ``rf.harmonic_number``, else the lattice's, else the harmonic nearest
    500 MHz (as the twin: :attr:`Profile.rf_nominal_frequency`)."""
    try:
        return float(lattice.get_rf_frequency())
    except Exception:  # noqa: BLE001 - no cavity
        h = profile.rf_harmonic_number[0] if profile is not None and profile.kind == "ring" else None
        h = h or getattr(lattice, "harmonic_number", None) or assumed_harmonic_number(lattice.revolution_frequency)
        return float(h * lattice.revolution_frequency)


def response_from_orbits(x_plus: npt.ArrayLike, y_plus: npt.ArrayLike, x_minus: npt.ArrayLike,
                         y_minus: npt.ArrayLike, step: float) -> FloatArray:
    """One ORM column ``[dx; dy] / step`` (2n,) from the orbits [m] at the two settings of a variable.

    ``step`` is the difference of the two settings (A, rad or Hz): the column is in m per that unit.
    """
    if step == 0:
        raise ValueError("the two settings of the variable are equal: no response can be computed")
    p = np.concatenate([np.asarray(x_plus, float), np.asarray(y_plus, float)])
    m = np.concatenate([np.asarray(x_minus, float), np.asarray(y_minus, float)])
    return (p - m) / float(step)


def _hw_from_steps(matrix: np.ndarray, delta: Any, delta_physics: Any) -> FloatArray | None:
    """The response [m/A] from the response [m/rad] and the half steps per corrector [A] and [rad] (the kick a step
    gives per A), or None when the steps are not known (or not one finite non-zero pair per column)."""
    if delta is None or delta_physics is None:
        return None
    m = np.asarray(matrix, dtype=float)
    try:
        d_hw = np.broadcast_to(np.asarray(delta, dtype=float), (m.shape[1],))
        d_ph = np.broadcast_to(np.asarray(delta_physics, dtype=float), (m.shape[1],))
    except ValueError:
        return None
    if not (np.all(np.isfinite(d_hw)) and np.all(np.isfinite(d_ph)) and np.all(d_hw != 0)):
        return None
    return m * (d_ph / d_hw)


@dataclass
class OrbitResponse:
    """An orbit response matrix (measured or model) in physics and hardware units.

    Attributes:
        matrix: (2n, m) response [m/rad]: rows ``x`` at the n BPMs then ``y``; columns the correctors.
        matrix_hw: (2n, m) response [m/A] (hardware units of the correctors).
        bpm_names: the n BPM names (rows, per plane).
        corrector_names: the m corrector device names (columns).
        planes: kick plane of each corrector, ``"x"`` or ``"y"``.
        rf: (2n,) response to the RF frequency [m/Hz], or ``None``.
        delta: (m,) half step used per corrector [A] (measured), or ``None``.
        delta_physics: (m,) half step per corrector [rad], or ``None``.
        df: half RF step used [Hz], or ``None``.
        kind: ``"measured"`` or ``"model"``.
        uid: the run it was read from, if any.
        bpm_refpts, corrector_refpts: lattice indices (when known).
        metadata: anything else (profile, seed, ...).
        good: (m,) False for a column flagged as dead (a stuck or dead corrector: no response above the noise
            floor), or ``None`` (not checked).
    """

    matrix: FloatArray
    matrix_hw: FloatArray
    bpm_names: list[str]
    corrector_names: list[str]
    planes: list[str]
    rf: FloatArray | None = None
    delta: FloatArray | None = None
    delta_physics: FloatArray | None = None
    df: float | None = None
    kind: str = "measured"
    uid: str | None = None
    bpm_refpts: np.ndarray | None = None
    corrector_refpts: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    good: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=float)
        if self.good is not None:
            self.good = np.asarray(self.good, dtype=bool).reshape(-1)
        self.matrix_hw = np.asarray(self.matrix_hw, dtype=float)
        self.bpm_names = [str(b) for b in self.bpm_names]
        self.corrector_names = [str(c) for c in self.corrector_names]
        self.planes = [str(p) for p in self.planes]
        n2, m = self.matrix.shape
        if n2 != 2 * len(self.bpm_names):
            raise ValueError(f"OrbitResponse: matrix has {n2} rows, expected 2 x {len(self.bpm_names)} BPMs")
        if m != len(self.corrector_names) or m != len(self.planes):
            raise ValueError(f"OrbitResponse: matrix has {m} columns but {len(self.corrector_names)} corrector "
                             f"names and {len(self.planes)} planes")
        if self.matrix_hw.shape != self.matrix.shape:
            raise ValueError(f"OrbitResponse: matrix_hw shape {self.matrix_hw.shape} != matrix {self.matrix.shape}")
        if self.rf is not None:
            self.rf = np.asarray(self.rf, dtype=float).reshape(-1)
            if self.rf.shape != (n2,):
                raise ValueError(f"OrbitResponse: rf column has shape {self.rf.shape}, expected ({n2},)")

    # ------------------------------------------------------------------------------------------------
    @property
    def nbpm(self) -> int:
        return len(self.bpm_names)

    @property
    def ncor(self) -> int:
        return len(self.corrector_names)

    def __repr__(self) -> str:
        nx = sum(p == "x" for p in self.planes)
        return (f"OrbitResponse({self.kind}, {self.nbpm} BPMs x 2 planes, {nx} h + {self.ncor - nx} v correctors"
                f"{', rf' if self.rf is not None else ''}{', uid=' + self.uid[:8] if self.uid else ''})")

    def to_physics(self) -> FloatArray:
        """The (2n, m) matrix in physics units [m/rad]."""
        return self.matrix.copy()

    def to_hw(self) -> FloatArray:
        """The (2n, m) matrix in hardware units [m/A]."""
        return self.matrix_hw.copy()

    def calibration(self) -> FloatArray:
        """Per corrector: rad per A implied by the two matrices (m,)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            num = np.linalg.norm(self.matrix_hw, axis=0)
            den = np.linalg.norm(self.matrix, axis=0)
            return np.where(den > 0, num / den, np.nan)

    def bpm_index(self, bpm: str | int) -> int:
        """Index of a BPM by name or int."""
        if isinstance(bpm, (int, np.integer)):
            if not 0 <= int(bpm) < self.nbpm:
                raise IndexError(f"BPM index {bpm} out of range 0..{self.nbpm - 1}")
            return int(bpm)
        try:
            return self.bpm_names.index(str(bpm))
        except ValueError:
            raise KeyError(f"unknown BPM {bpm!r}; names look like {self.bpm_names[0]!r}") from None

    def corrector_index(self, cor: str | int) -> int:
        """Index (column) of a corrector by device name or int."""
        if isinstance(cor, (int, np.integer)):
            if not 0 <= int(cor) < self.ncor:
                raise IndexError(f"corrector index {cor} out of range 0..{self.ncor - 1}")
            return int(cor)
        try:
            return self.corrector_names.index(str(cor))
        except ValueError:
            raise KeyError(f"corrector {cor!r} is not in this response matrix "
                           f"({self.corrector_names[0]} ... {self.corrector_names[-1]})") from None

    def column(self, cor: str | int, hw: bool = False) -> FloatArray:
        """Response (2n,) to one corrector [m/rad], or [m/A] if ``hw``."""
        j = self.corrector_index(cor)
        return (self.matrix_hw if hw else self.matrix)[:, j].copy()

    def block(self, rows: str, cols: str, hw: bool = False) -> FloatArray:
        """A plane block, e.g. ``block("x", "x")`` (horizontal response to horizontal correctors), ``("y", "x")``
        (coupling). [m/rad], or [m/A] if ``hw``."""
        r = slice(0, self.nbpm) if rows == "x" else slice(self.nbpm, 2 * self.nbpm)
        c = [j for j, p in enumerate(self.planes) if p == cols]
        return (self.matrix_hw if hw else self.matrix)[r][:, c]

    def submatrix(self, bpms: Sequence[str | int] | None = None, correctors: Sequence[str | int] | None = None,
                  planes: Sequence[str] | str | None = None) -> OrbitResponse:
        """A new OrbitResponse restricted to some BPMs (names/indices, rows of both planes kept) and correctors
        (names/indices, and/or the kick ``planes`` ``"x"``/``"y"``)."""
        bi = list(range(self.nbpm)) if bpms is None else [self.bpm_index(b) for b in bpms]
        ci = list(range(self.ncor)) if correctors is None else [self.corrector_index(c) for c in correctors]
        if planes is not None:
            pl = {planes} if isinstance(planes, str) else set(planes)
            ci = [j for j in ci if self.planes[j] in pl]
        rows = np.concatenate([np.asarray(bi, dtype=int), self.nbpm + np.asarray(bi, dtype=int)])

        def sel(a):
            return None if a is None else np.asarray(a)[ci]

        return OrbitResponse(
            good=None if self.good is None else self.good[ci],
            matrix=self.matrix[np.ix_(rows, ci)], matrix_hw=self.matrix_hw[np.ix_(rows, ci)],
            bpm_names=[self.bpm_names[i] for i in bi], corrector_names=[self.corrector_names[j] for j in ci],
            planes=[self.planes[j] for j in ci], rf=None if self.rf is None else self.rf[rows],
            delta=sel(self.delta), delta_physics=sel(self.delta_physics), df=self.df, kind=self.kind, uid=self.uid,
            bpm_refpts=None if self.bpm_refpts is None else np.asarray(self.bpm_refpts)[bi],
            corrector_refpts=sel(self.corrector_refpts), metadata=dict(self.metadata))

    def compare(self, other: Any, hw: bool = False) -> float:
        """Relative rms difference ``||self - other|| / ||other||`` over the common correctors and BPMs.

        ``other``: an OrbitResponse, a Tiled run of an orbit_response tool, or what ``RE(plan)`` returned."""
        other = as_result(OrbitResponse, other)
        common = [c for c in self.corrector_names if c in set(other.corrector_names)]
        a = self.submatrix(correctors=common)
        b = other.submatrix(bpms=[other.bpm_index(n) for n in a.bpm_names], correctors=common)
        ma, mb = (a.matrix_hw, b.matrix_hw) if hw else (a.matrix, b.matrix)
        return float(np.linalg.norm(ma - mb) / np.linalg.norm(mb))

    # ------------------------------------------------------------------------------------------------
    # storage
    def to_results(self) -> dict[str, np.ndarray]:
        """The arrays a plan stores in its ``results`` stream: the matrices (and RF column, step).

        Per-corrector lists (names, planes, steps) go to the start document (:meth:`start_metadata`): short
        arrays cannot be stored in Tiled's SQL event tables, and they are parameters of the measurement.

        ``orm_hw`` [m/A] is stored only when it is not ``orm`` [m/rad] scaled per column by the steps of the start
        document (``delta_physics_rad / delta_hw``, what :meth:`from_results` does): a measured ORM stores one
        matrix (runs recorded before stored both; both read the same).
        """
        out: dict[str, np.ndarray] = {"orm": self.matrix}
        hw = _hw_from_steps(self.matrix, self.delta, self.delta_physics)
        if hw is None or not np.allclose(hw, self.matrix_hw, rtol=1e-12, atol=0.0, equal_nan=True):
            out["orm_hw"] = self.matrix_hw
        if self.good is not None:
            out["column_ok"] = self.good.astype(np.int64)
        if self.rf is not None:
            out["orm_rf"] = self.rf
        if self.df is not None:
            out["df"] = np.asarray(float(self.df))
        return out

    def start_metadata(self) -> dict[str, Any]:
        """What :meth:`from_results` needs from the start document: names, planes, steps, lattice indices."""
        md: dict[str, Any] = {"bpm_names": list(self.bpm_names), "corrector_names": list(self.corrector_names),
                              "corrector_planes": list(self.planes), "orm_kind": self.kind}
        if self.delta is not None:
            md["delta_hw"] = np.broadcast_to(np.asarray(self.delta, dtype=float), (self.ncor,)).tolist()
        if self.delta_physics is not None:
            md["delta_physics_rad"] = np.broadcast_to(np.asarray(self.delta_physics, dtype=float),
                                                      (self.ncor,)).tolist()
        if self.bpm_refpts is not None:
            md["bpm_refpts"] = np.asarray(self.bpm_refpts).astype(int).tolist()
        if self.corrector_refpts is not None:
            md["corrector_refpts"] = np.asarray(self.corrector_refpts).astype(int).tolist()
        return md

    @classmethod
    def from_results(cls, results: dict[str, Any], start: dict[str, Any] | None = None) -> OrbitResponse:
        """Rebuild from stored results (see :meth:`to_results`) and the run's start document."""
        start = start or {}
        if "orm" not in results:
            raise KeyError(f"no 'orm' in the results {sorted(results)}: is this an orbit_response run?")
        m = np.asarray(results["orm"], dtype=float)
        nbpm = m.shape[0] // 2
        bpm_names = list(start.get("bpm_names") or [f"BPM_{i + 1:03d}" for i in range(nbpm)])
        cor_names = list(start.get("corrector_names") or [f"C{j}" for j in range(m.shape[1])])
        planes = list(start.get("corrector_planes") or ["x"] * m.shape[1])
        df = results.get("df")
        delta = results.get("delta", start.get("delta_hw"))
        delta_ph = results.get("delta_physics", start.get("delta_physics_rad"))
        if "orm_hw" in results:  # (stored when it is not orm scaled by the steps; every run recorded before)
            mhw = np.asarray(results["orm_hw"], dtype=float)
        else:
            hw = _hw_from_steps(m, delta, delta_ph)
            mhw = m if hw is None else hw
        return cls(
            matrix=m, matrix_hw=mhw, bpm_names=bpm_names, corrector_names=cor_names, planes=planes,
            rf=results.get("orm_rf"), delta=None if delta is None else np.asarray(delta, dtype=float),
            delta_physics=None if delta_ph is None else np.asarray(delta_ph, dtype=float),
            df=None if df is None else float(np.asarray(df).reshape(-1)[0]),
            kind=str(start.get("orm_kind", "measured")), uid=start.get("uid"),
            bpm_refpts=None if start.get("bpm_refpts") is None else np.asarray(start["bpm_refpts"]),
            corrector_refpts=None if start.get("corrector_refpts") is None else np.asarray(
                start["corrector_refpts"]),
            good=None if results.get("column_ok") is None else np.asarray(results["column_ok"]).astype(bool),
            metadata={k: start[k] for k in ("profile", "seed", "mode", "facility", "accelerator", "time")
                      if k in start})

    @classmethod
    def from_run(cls, run: Any) -> OrbitResponse:
        """Read the ORM a ``measure_orm`` (or ``model_orm`` plan) run stored: only the catalogue is needed.

        Args:
            run: a Tiled ``BlueskyRun`` (``catalog[uid]``).
        """
        start = run_start(run)
        tool = start.get("tool")
        if tool not in (None, "orbit_response"):
            raise ValueError(f"run {start.get('uid', '?')[:8]} is a {tool!r} run, not an orbit_response run")
        return cls.from_results(run_results(run), start)

    # ------------------------------------------------------------------------------------------------
    def flag_dead_columns(self, fraction: float = 0.05) -> list[str]:
        """Flag (``good = False``) the columns whose rms response is below ``fraction`` of the median of their
        plane's columns (a stuck or dead corrector: the orbit did not move); returns their corrector names."""
        rms_col = np.sqrt(np.nanmean(self.matrix_hw ** 2, axis=0))
        good = np.ones(self.ncor, dtype=bool) if self.good is None else self.good.copy()
        for p in set(self.planes):
            cols = np.array([j for j, q in enumerate(self.planes) if q == p])
            ref = float(np.nanmedian(rms_col[cols])) if cols.size else 0.0
            good[cols] &= np.isfinite(rms_col[cols]) & (rms_col[cols] > fraction * ref)
        self.good = good
        return [self.corrector_names[j] for j in np.nonzero(~good)[0]]

    def plot_data(self, hw: bool = False) -> tuple[FloatArray, str]:
        """The matrix as the figure shows it and its unit: [mm/mrad] (= m/rad), or [mm/A] with ``hw``."""
        return (self.matrix_hw * 1e3, "mm/A") if hw else (self.matrix.copy(), "mm/mrad")

    def plot(self, path: str | Path, hw: bool = False, title: str | None = None) -> Path:
        """Save a PNG picture of the matrix (symmetric colour scale, mm/mrad = m/rad, or mm/A) and return its
        path. Thread-safe: matplotlib's object API on an Agg canvas, no pyplot state."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        m, unit = self.plot_data(hw)
        fig = Figure(figsize=(7, 6), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        v = float(np.nanmax(np.abs(m))) or 1.0
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.axhline(self.nbpm - 0.5, color="k", lw=0.5)
        nx = sum(p == "x" for p in self.planes)
        if 0 < nx < self.ncor:
            ax.axvline(nx - 0.5, color="k", lw=0.5)
        ax.set_xlabel("corrector (horizontal | vertical)")
        ax.set_ylabel("BPM reading (x | y)")
        ax.set_title(title or f"{self.kind} orbit response {self.matrix.shape[0]}x{self.ncor}")
        fig.colorbar(im, ax=ax, label=unit, fraction=0.05, pad=0.02)
        # fixed margins (tight_layout draws the whole figure once more to measure it) and fast PNG compression: the
        # figure is drawn while the run is written, and holds Python's lock while it draws
        fig.subplots_adjust(left=0.1, right=0.9, bottom=0.08, top=0.94)
        fig.savefig(path, pil_kwargs={"compress_level": 1})
        return path


# ----------------------------------------------------------------------------------------------------
# model
def _kick_field(profile: Profile, family: str) -> tuple[str, int | None]:
    return profile.families[family].spec.field_parts


def _set_field(elem, attr: str, index: int | None, value: float) -> None:
    if attr == "KickAngle" and not hasattr(elem, "KickAngle"):
        elem.KickAngle = np.zeros(2)
    if index is None:
        setattr(elem, attr, value)
    else:
        arr = np.array(getattr(elem, attr), dtype=float)
        if len(arr) <= index:
            arr = np.pad(arr, (0, index + 1 - len(arr)))
        arr[index] = value
        setattr(elem, attr, arr)


def _get_field(elem, attr: str, index: int | None) -> float:
    if attr == "KickAngle" and not hasattr(elem, "KickAngle"):
        return 0.0
    v = getattr(elem, attr)
    return float(v if index is None else (v[index] if len(v) > index else 0.0))


def model_orm(source: Any, correctors: Sequence[str] | str | None = None, *, rf: bool = False,
              lattice=None, method: str = "analytic", delta: float = 1e-5,
              setpoints: dict[str, npt.ArrayLike] | None = None) -> OrbitResponse:
    """The model orbit response at every BPM of the profile, both planes, in m/rad and m/A.

    Args:
        source: a Profile, a profile name, a Twin or a Machine (its profile is used).
        correctors: device names / family names (default: every in-service corrector, h then v).
        rf: also compute the RF column [m/Hz].
        lattice: the pyAT lattice to use (default: the profile's design lattice, 4D).
        method: ``"analytic"`` (pyAT ``OrbitResponseMatrix.build_analytical`` + the fixed-path-length dispersion
            term; ~0.3 s per plane on EBS) or ``"tracking"`` (finite differences of ``find_orbit4(dct=0)``).
        delta: kick [rad] for ``method="tracking"``.
        setpoints: hardware setpoints per corrector family at which to evaluate the calibration slope (rad/A);
            default: the design setpoints.

    Returns:
        :class:`OrbitResponse` with ``kind="model"``.
    """
    profile = resolve_profile(source)
    key = None
    if lattice is None and setpoints is None:
        key = (str(profile.path), profile.sha256, None if correctors is None else tuple(
            [correctors] if isinstance(correctors, str) else correctors), bool(rf), method, float(delta))
        hit = _MODEL_CACHE.get(key)
        if hit is not None:
            return _copy_response(hit)
    resp = _model_orm(profile, correctors, rf=rf, lattice=lattice, method=method, delta=delta, setpoints=setpoints)
    if key is not None:
        _MODEL_CACHE[key] = _copy_response(resp)
        while len(_MODEL_CACHE) > 16:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return resp


_MODEL_CACHE: dict[tuple, OrbitResponse] = {}


def _slopes(profile: Profile, ring, table, refs: np.ndarray, setpoints) -> np.ndarray:
    """d(physics)/d(hw) of each corrector at the (design, or given) setpoints: the m/rad -> m/A factors."""
    slope = np.empty(len(table))
    e = profile.energy
    for j, (_, fam, i, _) in enumerate(table):
        spec = profile.families[fam].spec
        if setpoints is not None and fam in setpoints:
            hw0 = float(np.asarray(setpoints[fam], dtype=float).reshape(-1)[i])
        else:
            hw0 = float(spec.calibration.physics2hw(_get_field(ring[int(refs[j])], *spec.field_parts), e, e))
        slope[j] = float(spec.calibration.slope(hw0, e, e))
    return slope


def _line_orm(profile: Profile, ring, table, refs: np.ndarray, bpms: np.ndarray, *, rf: bool,
              setpoints) -> OrbitResponse:
    """A transfer line's "orbit" response: the one-pass trajectory at the BPMs to each corrector (pyAT's analytical
    trajectory response from the line's entrance optics; zero upstream of a corrector). A line has no RF column
    (``rf`` is ignored: the RF frequency does not steer a line; ``correct_orbit(fit_rf=True)`` then says so)."""
    from .trajectory import model_trajectory_response

    del rf
    names = [r[0] for r in table]
    traj = model_trajectory_response(profile, names, turns=1, lattice=ring)
    col = {c: j for j, c in enumerate(traj.corrector_names)}
    resp = np.asarray(traj.matrix, dtype=float)[:, [col[c] for c in names]]
    slope = _slopes(profile, ring, table, refs, setpoints)
    return OrbitResponse(
        matrix=resp, matrix_hw=resp * slope, bpm_names=profile.bpm_names, corrector_names=names,
        planes=[r[3] for r in table], rf=None, delta=None, delta_physics=None, kind="model",
        bpm_refpts=bpms.astype(np.int64), corrector_refpts=refs.astype(np.int64),
        metadata={"profile": profile.name, "method": "trajectory", "kind": profile.kind})


def _copy_response(r: OrbitResponse) -> OrbitResponse:
    import copy

    return copy.deepcopy(r)


def _model_orm(profile: Profile, correctors, *, rf: bool, lattice, method: str, delta: float,
               setpoints) -> OrbitResponse:
    import at

    ring = profile.load_lattice() if lattice is None else lattice.deepcopy()
    if getattr(ring, "is_6d", False):
        ring = ring.disable_6d(copy=True)
    table = corrector_table(profile, correctors)
    if not table:
        raise ValueError("no corrector selected (all out of service?)")
    bpms = np.asarray(profile.bpm_refpts, dtype=np.uint32)
    nb = len(bpms)
    m = len(table)
    resp = np.zeros((2 * nb, m))
    refs = np.array([int(profile.families[f].refpts[i]) for (_, f, i, _) in table], dtype=np.uint32)
    if profile.kind != "ring":
        return _line_orm(profile, ring, table, refs, bpms, rf=rf, setpoints=setpoints)
    mcf = momentum_compaction(ring)
    circ = ring.circumference
    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ed = at.get_optics(ring, refpts=at.All)
    eta = ed.dispersion  # (nelem+1, 4)
    kick_ok = all(_kick_field(profile, f)[0] == "KickAngle" for (_, f, _, _) in table)
    if method == "analytic" and not kick_ok:
        method = "tracking"  # the analytic formula knows only kick angles
    if method == "analytic":
        for pl, code in (("x", 0), ("y", 1)):
            cols = [j for j, row in enumerate(table) if row[3] == pl]
            if not cols:
                continue
            cols = [cols[k] for k in np.argsort(refs[cols], kind="stable")]  # pyAT wants ascending refpts
            with single_thread_blas(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                orm = at.OrbitResponseMatrix(ring, pl, bpms, refs[cols])
                r = orm.build_analytical()
            rows = slice(0, nb) if pl == "x" else slice(nb, 2 * nb)
            resp[rows, cols] = r
            # fixed path length: the energy moves to cancel the kick's path lengthening eta_w * theta
            etaw = eta[refs[cols], 2 * code]
            resp[:nb, cols] -= np.outer(eta[bpms, 0], etaw) / (mcf * circ)
            resp[nb:, cols] -= np.outer(eta[bpms, 2], etaw) / (mcf * circ)
    elif method == "tracking":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j, (_, fam, _, _) in enumerate(table):
                attr, index = _kick_field(profile, fam)
                el = ring[int(refs[j])]
                v0 = _get_field(el, attr, index)
                orbits = []
                for s in (+1, -1):
                    _set_field(el, attr, index, v0 + s * delta)
                    _, o = at.find_orbit4(ring, refpts=bpms, dct=0.0)
                    orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
                _set_field(el, attr, index, v0)
                resp[:, j] = (orbits[0] - orbits[1]) / (2 * delta)
    else:
        raise ValueError(f"method must be 'analytic' or 'tracking', got {method!r}")
    slope = _slopes(profile, ring, table, refs, setpoints)
    rf_col = None
    if rf:
        f0 = rf_frequency_of(ring, profile)
        rf_col = -np.concatenate([eta[bpms, 0], eta[bpms, 2]]) / (mcf * f0)
    return OrbitResponse(
        matrix=resp, matrix_hw=resp * slope, bpm_names=profile.bpm_names, corrector_names=[r[0] for r in table],
        planes=[r[3] for r in table], rf=rf_col, delta=None, delta_physics=None, kind="model",
        bpm_refpts=bpms.astype(np.int64), corrector_refpts=refs.astype(np.int64),
        metadata={"profile": profile.name, "method": method, "mcf": mcf, "circumference": circ})
