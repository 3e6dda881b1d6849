"""First turns: the trajectory response, SVD trajectory correction, and threading a ring with no closed orbit.

- :func:`model_trajectory_response`: the response of the first ``turns`` turns of an injected beam to the
  correctors (pyAT's ``TrajectoryResponseMatrix.build_analytical`` on the design lattice repeated ``turns`` times,
  each corrector a steerer in every copy: it kicks at every passage),
  plus the response to the four injection knobs (x, px, y, py at the injection point, from pyAT's ``find_m44``).
  Rows: ``[x turn 0 (BPM 0..n-1), x turn 1, ..., y turn 0, y turn 1, ...]``; columns: correctors (h then v).
- :func:`trajectory_step`: SVD trajectory correction (pyAT's solver via :class:`~.correction.SvdCorrector`) on the
  BPMs the beam reaches, with the correctors upstream of the last BPM reached (the window grows with the beam).
- :func:`thread_first_turns`: the threading logic of pySC's ``first_turn`` / ``stitch`` / ``balance`` (plus
  injection steering) as a **pure generator**: it yields a :class:`ThreadingRequest` (what to set), receives the
  next :class:`TrajectoryReading` (what the BPMs showed) and returns a :class:`ThreadingResult`. A Bluesky plan, a
  notebook loop or a test drives it the same way::

      gen = thread_first_turns(response, setpoints, low, high)
      request = next(gen)
      while True:
          apply(request)                       # correctors [A] and injection trims, absolute values
          try:
              request = gen.send(measure())    # a TrajectoryReading: (x, y) arrays (turns, n) [m], NaN where no beam
          except StopIteration as stop:
              result = stop.value
              break

  Once two turns are threaded and balanced, the closed orbit exists: ``correct_orbit`` takes over.
- Transfer lines: the same response (``turns=1``) and :func:`trajectory_step` steer a line's trajectory.

Units: positions [m]; corrector setpoints and steps in hardware units [A] (the columns of ``matrix_hw``);
injection knobs in m and rad.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ..profile import Profile
from ._common import FloatArray, corrector_table, resolve_profile, rms, run_results, run_start, tool_run_start
from .correction import SvdCorrector, limit_step

__all__ = [
    "INJECTION_KNOBS",
    "INJECTION_STEP_FLOOR",
    "ThreadingRequest",
    "ThreadingResult",
    "TrajectoryReading",
    "TrajectoryResponse",
    "TrajectoryStep",
    "model_trajectory_response",
    "reached",
    "response_steps",
    "trajectory_noise",
    "thread_first_turns",
    "trajectory_step",
]

#: the injection steering knobs (transfer-line end): x [m], px [rad], y [m], py [rad]
INJECTION_KNOBS = ("x", "px", "y", "py")


# ----------------------------------------------------------------------------------------------------
# the response
@dataclass
class TrajectoryResponse:
    """Trajectory response of the first ``turns`` turns to the correctors (and the injection knobs).

    Attributes:
        matrix: (2 T n, m) response [m/rad]; rows ``[x turn 0 .. x turn T-1, y turn 0 .. y turn T-1]`` (n BPMs
            each), columns the correctors.
        matrix_hw: (2 T n, m) response [m/A].
        injection: (2 T n, 4) response to the injection knobs x [m/m], px [m/rad], y [m/m], py [m/rad].
        bpm_names: the n BPM names.
        corrector_names: the m corrector device names (columns).
        planes: kick plane of each corrector, ``"x"`` or ``"y"``.
        turns: T.
        bpm_refpts, corrector_refpts: lattice indices (the order of the passages within a turn).
        kind: ``"model"`` or ``"measured"``.
        uid: the run it was read from, if any.
        metadata: anything else.
    """

    matrix: FloatArray
    matrix_hw: FloatArray
    injection: FloatArray
    bpm_names: list[str]
    corrector_names: list[str]
    planes: list[str]
    turns: int
    bpm_refpts: np.ndarray
    corrector_refpts: np.ndarray
    kind: str = "model"
    uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=float)
        self.matrix_hw = np.asarray(self.matrix_hw, dtype=float)
        self.injection = np.asarray(self.injection, dtype=float)
        self.bpm_names = [str(b) for b in self.bpm_names]
        self.corrector_names = [str(c) for c in self.corrector_names]
        self.planes = [str(p) for p in self.planes]
        self.turns = int(self.turns)
        self.bpm_refpts = np.asarray(self.bpm_refpts, dtype=np.int64)
        self.corrector_refpts = np.asarray(self.corrector_refpts, dtype=np.int64)
        rows = 2 * self.turns * len(self.bpm_names)
        if self.matrix.shape != (rows, len(self.corrector_names)):
            raise ValueError(f"TrajectoryResponse: matrix has shape {self.matrix.shape}, expected ({rows}, "
                             f"{len(self.corrector_names)}) for {self.turns} turn(s) x {len(self.bpm_names)} BPMs "
                             "x 2 planes and the correctors")
        if self.matrix_hw.shape != self.matrix.shape:
            raise ValueError(f"TrajectoryResponse: matrix_hw {self.matrix_hw.shape} != matrix {self.matrix.shape}")
        if self.injection.shape != (rows, 4):
            raise ValueError(f"TrajectoryResponse: injection block has shape {self.injection.shape}, expected "
                             f"({rows}, 4)")

    def __repr__(self) -> str:
        nx = sum(p == "x" for p in self.planes)
        return (f"TrajectoryResponse({self.kind}, {self.turns} turn(s) x {self.nbpm} BPMs x 2 planes, {nx} h + "
                f"{self.ncor - nx} v correctors{', uid=' + self.uid[:8] if self.uid else ''})")

    @property
    def nbpm(self) -> int:
        return len(self.bpm_names)

    @property
    def ncor(self) -> int:
        return len(self.corrector_names)

    def rows(self, turns: int) -> np.ndarray:
        """Row indices of the first ``turns`` turns (both planes)."""
        if not 1 <= turns <= self.turns:
            raise ValueError(f"this response has {self.turns} turn(s); asked for {turns}")
        n = self.nbpm
        x = np.arange(turns * n)
        return np.concatenate([x, self.turns * n + x])

    def truncated(self, turns: int) -> TrajectoryResponse:
        """The response of the first ``turns`` turns only."""
        r = self.rows(turns)
        return TrajectoryResponse(self.matrix[r], self.matrix_hw[r], self.injection[r], list(self.bpm_names),
                                  list(self.corrector_names), list(self.planes), turns, self.bpm_refpts,
                                  self.corrector_refpts, self.kind, self.uid, dict(self.metadata))

    def calibration(self) -> FloatArray:
        """(m,) A -> rad slope of each corrector (``matrix_hw = matrix * slope``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            num = np.linalg.norm(self.matrix_hw, axis=0)
            den = np.linalg.norm(self.matrix, axis=0)
            return np.where(den > 0, num / den, np.nan)

    def upstream(self, bpm: int, turn: int = 0) -> np.ndarray:
        """(m,) correctors that act on BPM ``bpm`` (index) in ``turn``: all of them after the first turn."""
        if turn > 0:
            return np.ones(self.ncor, dtype=bool)
        return self.corrector_refpts < self.bpm_refpts[bpm]

    # ------------------------------------------------------------------------------------------------
    def to_results(self) -> dict[str, np.ndarray]:
        """Arrays for the run's ``results`` stream (names go to :meth:`start_metadata`)."""
        return {"trm": self.matrix, "trm_hw": self.matrix_hw, "trm_injection": self.injection,
                "turns": np.asarray(self.turns)}

    @staticmethod
    def result_units() -> dict[str, str]:
        return {"trm": "m/rad", "trm_hw": "m/A", "trm_injection": "m/m | m/rad", "turns": ""}

    def start_metadata(self) -> dict[str, Any]:
        return {"bpm_names": list(self.bpm_names), "corrector_names": list(self.corrector_names),
                "corrector_planes": list(self.planes), "trm_kind": self.kind,
                "bpm_refpts": self.bpm_refpts.astype(int).tolist(),
                "corrector_refpts": self.corrector_refpts.astype(int).tolist()}

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> TrajectoryResponse:
        start = dict(start or {})
        if "trm" not in results:
            raise KeyError(f"no 'trm' in the results {sorted(results)}: is this a trajectory_response run?")
        m = np.asarray(results["trm"], dtype=float)
        turns = int(np.asarray(results.get("turns", 1)).reshape(-1)[0])
        n = m.shape[0] // (2 * turns)
        names = list(start.get("bpm_names") or [f"#{i}" for i in range(n)])
        cors = list(start.get("corrector_names") or [f"C{j}" for j in range(m.shape[1])])
        inj = results.get("trm_injection")
        return cls(matrix=m, matrix_hw=np.asarray(results.get("trm_hw", m), dtype=float),
                   injection=np.zeros((m.shape[0], 4)) if inj is None else np.asarray(inj, dtype=float),
                   bpm_names=names, corrector_names=cors,
                   planes=list(start.get("corrector_planes") or ["x"] * m.shape[1]), turns=turns,
                   bpm_refpts=np.asarray(start.get("bpm_refpts") or np.arange(n)),
                   corrector_refpts=np.asarray(start.get("corrector_refpts") or np.zeros(m.shape[1], dtype=int)),
                   kind=str(start.get("trm_kind", "measured")), uid=start.get("uid"),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "facility") if k in start})

    @classmethod
    def from_run(cls, run: Any) -> TrajectoryResponse:
        """Read the response a ``measure_trajectory_response`` run stored."""
        start = tool_run_start(run, "trajectory_response", "'trajectory_response' run")
        return cls.from_results(run_results(run), start)

    def plot(self, path: str | Path, hw: bool = False, title: str | None = None) -> Path:
        """PNG of the matrix (mm/mrad or mm/A, symmetric colour scale); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = _canvas(7.0, 6.0)
        ax = fig.subplots()
        m = self.matrix_hw * 1e3 if hw else self.matrix  # m/A -> mm/A; m/rad is mm/mrad
        v = float(np.nanmax(np.abs(m))) or 1.0
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.axhline(self.turns * self.nbpm - 0.5, color="k", lw=0.5)
        ax.set_xlabel("corrector (horizontal | vertical)")
        ax.set_ylabel("BPM passage (x turns | y turns)")
        ax.set_title(title or f"{self.kind} trajectory response, {self.turns} turn(s)")
        fig.colorbar(im, ax=ax, label="mm/A" if hw else "mm/mrad")
        fig.tight_layout()
        fig.savefig(path)
        return path


_MODEL_CACHE: dict[tuple, TrajectoryResponse] = {}


def model_trajectory_response(source: Any, correctors: Sequence[str] | str | None = None, *, turns: int = 1,
                              lattice=None) -> TrajectoryResponse:
    """The model response of the first ``turns`` turns of the injected beam (pyAT's analytical trajectory response).

    Args:
        source: a Profile, a profile name, a Twin or a Machine.
        correctors: device / family names (default: every in-service corrector, h then v).
        turns: turns of the response (1 for a transfer line).
        lattice: the pyAT lattice to use (default: the profile's design lattice, 4D).
    """
    profile = resolve_profile(source)
    if profile.kind != "ring" and turns != 1:
        raise ValueError(f"{profile.name} is a transfer line: its trajectory response is one pass (turns=1)")
    if int(turns) < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    key = None
    if lattice is None:
        key = (str(profile.path), profile.sha256, None if correctors is None else tuple(
            [correctors] if isinstance(correctors, str) else correctors), int(turns))
        if key in _MODEL_CACHE:
            return _copy(_MODEL_CACHE[key])
    out = _model_response(profile, correctors, int(turns), lattice)
    if key is not None:
        _MODEL_CACHE[key] = _copy(out)
        while len(_MODEL_CACHE) > 8:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return out


def trajectory_noise(profile: Profile, model: TrajectoryResponse) -> FloatArray:
    """The rms shot-to-shot noise [m] of each reading of a trajectory (rows of ``model``): the injected beam's
    jitter (profile ``errors.injection.jitter_*``) carried by the model's injection response, and the BPMs' own
    turn-by-turn noise (``errors.bpm.tbt_noise``), in quadrature."""
    inj = profile.spec.errors.injection
    jit = np.array([inj.jitter_x, inj.jitter_px, inj.jitter_y, inj.jitter_py], dtype=float)
    j = np.nan_to_num(np.asarray(model.injection, dtype=float))
    bpm = float(profile.spec.errors.bpm.tbt_noise)
    return np.sqrt((j * jit[None, :]) ** 2 @ np.ones(4) + bpm ** 2)


#: smallest half steps of the injection trims x [m], px [rad], y [m], py [rad] in a trajectory response
INJECTION_STEP_FLOOR = (1e-5, 1e-6, 1e-5, 1e-6)


def response_steps(model: TrajectoryResponse, noise: npt.ArrayLike, n_avg: int = 1, *, rel_error: float = 0.05,
                   floor: float = 1e-5, injection_floor: Sequence[float] = INJECTION_STEP_FLOOR,
                   max_excursion: float = 2e-3) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Half steps that measure each column of a trajectory response to ``rel_error`` (rms, relative) through the
    shot noise: a column measured from two steps of +-d, each reading averaged over ``n_avg`` shots, has an error
    of ``|noise| / (sqrt(2 n_avg) d |column|)``.

    Args:
        model: the model response (its columns give the signal per unit step).
        noise: (rows,) rms noise of one shot's reading [m] (:func:`trajectory_noise`).
        n_avg: shots averaged per reading.
        rel_error: the relative error aimed at.
        floor: smallest corrector step [rad] (the profile's default step).
        injection_floor: smallest steps of the injection trims x [m], px [rad], y [m], py [rad].
        max_excursion: largest trajectory change a step may make at a BPM [m] (the aperture's margin).

    Returns:
        ``(corrector_steps [rad], injection_steps, corrector_error, injection_error)``: the steps (at least the
        floors, at most the excursion allows) and the relative errors expected with them.
    """
    sigma = float(np.linalg.norm(np.nan_to_num(np.asarray(noise, dtype=float))))
    scale = math.sqrt(2.0 * max(int(n_avg), 1))

    def sized(cols: FloatArray, low: FloatArray) -> tuple[FloatArray, FloatArray]:
        cols = np.nan_to_num(np.asarray(cols, dtype=float))
        norm = np.linalg.norm(cols, axis=0)
        peak = np.max(np.abs(cols), axis=0) if cols.size else np.zeros(cols.shape[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            want = np.where(norm > 0, sigma / (rel_error * scale * norm), low)
            cap = np.where(peak > 0, max_excursion / peak, np.inf)
            d = np.minimum(np.maximum(want, low), np.maximum(cap, low))
            err = np.where(norm > 0, sigma / (scale * d * norm), 0.0)
        return d, err

    d_c, e_c = sized(model.matrix, np.full(np.asarray(model.matrix).shape[1], float(floor)))
    d_i, e_i = sized(model.injection, np.asarray(injection_floor, dtype=float).reshape(4))
    return d_c, d_i, e_c, e_i


def _copy(r: TrajectoryResponse) -> TrajectoryResponse:
    import copy

    return copy.deepcopy(r)


def _model_response(profile: Profile, correctors, turns: int, lattice) -> TrajectoryResponse:
    import at
    from at.latticetools import TrajectoryResponseMatrix

    ring = profile.load_lattice() if lattice is None else lattice.deepcopy()
    if getattr(ring, "is_6d", False):
        ring = ring.disable_6d(copy=True)
    table = corrector_table(profile, correctors)
    if not table:
        raise ValueError("no corrector selected (all out of service?)")
    nel = len(ring)
    bpms = np.asarray(profile.bpm_refpts, dtype=np.int64)
    n = bpms.size
    refs = np.array([int(profile.families[f].refpts[i]) for (_, f, i, _) in table], dtype=np.int64)
    long = at.Lattice([e.deepcopy() for _ in range(turns) for e in ring], energy=ring.energy,
                      periodicity=1) if turns > 1 else ring
    bpms_all = np.concatenate([bpms + k * nel for k in range(turns)]).astype(np.uint32)
    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if profile.kind == "ring":
            _, _, e0 = at.get_optics(ring, refpts=[0])
            tw = {"beta": np.asarray(e0.beta[0]), "alpha": np.asarray(e0.alpha[0])}
        else:
            tw = {k: np.asarray(v, dtype=float) for k, v in (profile.spec.twiss_in or {}).items()
                  if k in ("beta", "alpha")} or {"beta": np.ones(2), "alpha": np.zeros(2)}
    rows = turns * n
    resp = np.zeros((2 * rows, len(table)))
    for pl, code in (("x", 0), ("y", 1)):
        cols = [j for j, row in enumerate(table) if row[3] == pl]
        if not cols:
            continue
        cols = [cols[k] for k in np.argsort(refs[cols], kind="stable")]  # pyAT wants ascending refpts
        # a corrector is DC: it kicks the beam at every passage, so it is a steerer in every turn's copy
        steer = np.concatenate([refs[cols] + k * nel for k in range(turns)]).astype(np.uint32)
        with single_thread_blas(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trm = TrajectoryResponseMatrix(long, pl, bpms_all, steer)
            r = trm.build_analytical(twiss_in=tw)
        resp[code * rows:(code + 1) * rows, cols] = r.reshape(rows, turns, len(cols)).sum(axis=1)
    # injection knobs: the linear transfer from the injection point to every BPM passage (x <- x, px; y <- y, py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ms = at.find_m44(long, 0.0, refpts=bpms_all, orbit=np.zeros(6))
    inj = np.zeros((2 * rows, 4))
    inj[:rows, 0], inj[:rows, 1] = ms[:, 0, 0], ms[:, 0, 1]
    inj[rows:, 2], inj[rows:, 3] = ms[:, 2, 2], ms[:, 2, 3]
    # hardware units: d(physics)/d(hw) at the design setpoints
    e = profile.energy
    slope = np.empty(len(table))
    for j, (_, fam, i, _) in enumerate(table):
        spec = profile.families[fam].spec
        attr, index = spec.field_parts
        el = ring[int(refs[j])]
        v = getattr(el, attr, 0.0) if attr != "KickAngle" or hasattr(el, "KickAngle") else np.zeros(2)
        v = float(v if index is None else (np.asarray(v)[index] if len(np.asarray(v)) > index else 0.0))
        slope[j] = float(spec.calibration.slope(float(spec.calibration.physics2hw(v, e, e)), e, e))
    return TrajectoryResponse(matrix=resp, matrix_hw=resp * slope, injection=inj, bpm_names=profile.bpm_names,
                              corrector_names=[r[0] for r in table], planes=[r[3] for r in table], turns=turns,
                              bpm_refpts=bpms, corrector_refpts=refs, kind="model",
                              metadata={"profile": profile.name})


# ----------------------------------------------------------------------------------------------------
# readings and correction steps
@dataclass
class TrajectoryReading:
    """One trajectory acquisition: (turns, n) readings [m], NaN where no beam (or a dead BPM)."""

    x: FloatArray
    y: FloatArray

    def __post_init__(self) -> None:
        self.x = np.atleast_2d(np.asarray(self.x, dtype=float))
        self.y = np.atleast_2d(np.asarray(self.y, dtype=float))
        if self.x.shape != self.y.shape:
            raise ValueError(f"x and y readings differ in shape: {self.x.shape} and {self.y.shape}")

    @classmethod
    def of(cls, value: Any) -> TrajectoryReading:
        """From a TrajectoryReading, an ``(x, y)`` pair, or anything with ``.x`` and ``.y`` (a twin Acquisition)."""
        if isinstance(value, TrajectoryReading):
            return value
        if hasattr(value, "x") and hasattr(value, "y"):
            return cls(value.x, value.y)
        x, y = value
        return cls(x, y)

    @property
    def turns(self) -> int:
        return int(self.x.shape[0])

    def vector(self, turns: int | None = None) -> FloatArray:
        """``[x turn 0 .. x turn T-1, y turn 0 ..]`` of the first ``turns`` turns (the response's row order)."""
        t = self.turns if turns is None else int(turns)
        return np.concatenate([self.x[:t].reshape(-1), self.y[:t].reshape(-1)])


def reached(reading: Any, bad: npt.ArrayLike | None = None) -> int:
    """BPM passages the beam made (turn after turn): one more than the last passage with a finite reading.

    ``bad``: (n,) BPMs out of service, ignored (a dead BPM in the middle does not stop the count).
    """
    r = TrajectoryReading.of(reading)
    ok = np.isfinite(r.x) & np.isfinite(r.y)
    if bad is not None:
        ok &= ~np.asarray(bad, dtype=bool)[None, :]
    flat = ok.reshape(-1)
    idx = np.nonzero(flat)[0]
    return int(idx[-1]) + 1 if idx.size else 0


@dataclass
class TrajectoryStep:
    """A correction step: corrector steps [A], injection-knob steps, and what was used."""

    dk: FloatArray
    dinj: FloatArray
    obs_mask: np.ndarray
    var_mask: np.ndarray
    predicted_rms: float


def trajectory_step(response: TrajectoryResponse, deviation: npt.ArrayLike, *, n_passages: int | None = None,
                    turns: int | None = None, injection: bool = False, tikhonov: float | None = 0.02,
                    n_sv: int | None = None, corrector_scale: float = 1e-4,
                    injection_scale: Sequence[float] = (1e-3, 1e-4, 1e-3, 1e-4),
                    exclude_correctors: npt.ArrayLike | None = None, bad: npt.ArrayLike | None = None,
                    rows: np.ndarray | None = None, matrix: np.ndarray | None = None,
                    inj_matrix: np.ndarray | None = None) -> TrajectoryStep:
    """SVD trajectory correction on the BPMs the beam reaches (the window), with the correctors upstream of it.

    Args:
        response: the trajectory response (its ``matrix`` [m/rad]; steps are returned in A via the calibration).
        deviation: (2 T' n,) readings minus target in the response's row order for ``turns`` = T' turns [m]; NaN
            entries (no beam) are left out.
        n_passages: BPM passages reached (default: from the finite entries); correctors downstream of the last one
            cannot act and are not used.
        turns: turns of ``deviation`` (default: the response's).
        injection: also steer with the injection knobs.
        tikhonov: Tikhonov regularisation relative to the largest weighted singular value (default 0.02), or
            ``None`` with ``n_sv``.
        n_sv: number of singular values (with ``tikhonov=None``; default all).
        corrector_scale: natural scale of a corrector kick [rad] (SVD variable weight).
        injection_scale: natural scales of the injection knobs (m, rad, m, rad).
        exclude_correctors: (m,) correctors never moved.
        bad: (n,) BPMs out of service, left out.
        rows, matrix, inj_matrix: an explicit row selection / matrices (stitch and balance use differences of turns).

    Returns:
        :class:`TrajectoryStep` with ``dk`` [A] (m,) and ``dinj`` (4,) to add.
    """
    t = response.turns if turns is None else int(turns)
    rsel = response.rows(t) if rows is None else rows
    mat = response.matrix[rsel] if matrix is None else matrix
    imat = response.injection[rsel] if inj_matrix is None else inj_matrix
    d = np.asarray(deviation, dtype=float).reshape(-1)
    if d.shape != (mat.shape[0],):
        raise ValueError(f"deviation has {d.size} values, the response rows are {mat.shape[0]}")
    obs = np.isfinite(d)
    if bad is not None:
        b = np.asarray(bad, dtype=bool)
        nb = response.nbpm
        tiled = np.tile(b, mat.shape[0] // nb) if mat.shape[0] % nb == 0 else np.zeros(mat.shape[0], bool)
        obs &= ~tiled
    m = response.ncor
    var = np.ones(m, dtype=bool)
    if n_passages is not None:
        n = response.nbpm
        last = max(int(n_passages) - 1, 0)
        turn, bpm = divmod(last, n)
        var &= response.upstream(bpm, turn) if turn == 0 else True
    if exclude_correctors is not None:
        var &= ~np.asarray(exclude_correctors, dtype=bool)
    full = np.hstack([mat, imat]) if injection else mat
    vmask = np.concatenate([var, np.ones(4, dtype=bool)]) if injection else var
    vw = np.concatenate([np.full(m, corrector_scale), np.asarray(injection_scale, dtype=float)]) if injection \
        else np.full(m, corrector_scale)
    active = np.linalg.norm(np.where(obs[:, None], full, 0.0), axis=0) > 0
    vmask &= active
    if not obs.any() or not vmask.any():
        return TrajectoryStep(np.zeros(m), np.zeros(4), obs, vmask[:m], float("nan"))
    if tikhonov is not None:
        dv = _tikhonov(full, d, obs, vmask, vw, float(tikhonov))
    else:  # a singular-value cut: pyAT's SVD solver
        solver = SvdCorrector(full, var_weights=vw, obs_mask=obs, var_mask=vmask)
        dv = solver.correct(np.where(obs, d, np.nan), n_sv)
    pred = np.where(obs, d, 0.0) + full @ dv
    rpa = _rad_per_amp(response)
    with np.errstate(invalid="ignore", divide="ignore"):
        dk = np.where(np.isfinite(rpa) & (rpa > 0), dv[:m] / rpa, 0.0)  # rad -> A
    return TrajectoryStep(dk, dv[m:] if injection else np.zeros(4), obs, vmask[:m], rms(pred[obs]))


def _tikhonov(a: FloatArray, d: FloatArray, obs: np.ndarray, var: np.ndarray, vw: FloatArray,
              rel: float) -> FloatArray:
    """Tikhonov-regularised least squares ``min |A dv + d|^2 + alpha^2 |dv / vw|^2`` on the masked system.

    The same filter as an SVD with factors ``s / (s^2 + alpha^2)``, with ``alpha = rel x`` the largest weighted
    singular value, solved by the normal equations (one Cholesky instead of an SVD per step: the window changes
    at every step of the threading)."""
    w = a[np.ix_(obs, var)] * vw[var]
    g = w.T @ w
    smax2 = float(np.linalg.eigvalsh(g)[-1]) if g.shape[0] <= 64 else _power(g)
    alpha2 = (rel * rel) * smax2
    z = np.linalg.solve(g + alpha2 * np.eye(g.shape[0]), -(w.T @ d[obs]))
    dv = np.zeros(a.shape[1])
    dv[var] = vw[var] * z
    return dv


def _power(g: FloatArray, iters: int = 30) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite matrix (power iteration)."""
    v = np.ones(g.shape[0]) / math.sqrt(g.shape[0])
    lam = 0.0
    for _ in range(iters):
        u = g @ v
        lam = float(np.linalg.norm(u))
        if lam == 0.0:
            return 0.0
        v = u / lam
    return lam


def _rad_per_amp(response: TrajectoryResponse) -> FloatArray:
    """(m,) rad per A of each corrector (matrix_hw = matrix * rad_per_A)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.linalg.norm(response.matrix_hw, axis=0)
        den = np.linalg.norm(response.matrix, axis=0)
        return np.where(den > 0, num / den, np.nan)


# ----------------------------------------------------------------------------------------------------
# threading
@dataclass
class ThreadingRequest:
    """What to set before the next reading: absolute corrector setpoints [A] and injection trims (or None)."""

    correctors: FloatArray | None = None
    injection: FloatArray | None = None
    stage: str = ""
    note: str = ""


@dataclass
class ThreadingResult:
    """Outcome of :func:`thread_first_turns`.

    Attributes:
        success: the beam makes ``turns`` full turns and the turn-to-turn difference has converged.
        stage: where it ended (``first_turn``, ``stitch``, ``balance``, ``done``).
        setpoints: (m,) final corrector setpoints [A].
        injection: (4,) final injection trims.
        reached: BPM passages per reading (history).
        rms: (k, 2) rms of the readings (x, y) [m] per reading.
        steps: readings taken.
        message: why it stopped.
    """

    success: bool
    stage: str
    setpoints: FloatArray
    injection: FloatArray
    reached: list[int]
    rms: FloatArray
    steps: int
    message: str = ""

    @property
    def passages(self) -> int:
        """BPM passages of the last reading."""
        return int(self.reached[-1]) if self.reached else 0

    def to_results(self) -> dict[str, Any]:
        """Values for the run's ``results`` stream (the corrector names go to the start document)."""
        return {"success": bool(self.success), "stage": str(self.stage), "setpoints": np.asarray(self.setpoints),
                "injection": np.asarray(self.injection), "reached": np.asarray(self.reached, dtype=np.int64),
                "rms": np.asarray(self.rms, dtype=float).reshape(-1, 2), "steps": int(self.steps),
                "message": str(self.message)}

    @staticmethod
    def result_units() -> dict[str, str]:
        return {"success": "", "stage": "", "setpoints": "A", "injection": "m | rad", "reached": "BPM passages",
                "rms": "m", "steps": "readings", "message": ""}

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> ThreadingResult:
        if "reached" not in results or "setpoints" not in results:
            raise KeyError(f"no threading results here (got {sorted(results)}): is it a 'first_turns' run?")
        return cls(success=bool(np.asarray(results.get("success", False)).reshape(-1)[0]),
                   stage=str(np.asarray(results.get("stage", "")).reshape(-1)[0]),
                   setpoints=np.asarray(results["setpoints"], dtype=float),
                   injection=np.asarray(results.get("injection", np.zeros(4)), dtype=float),
                   reached=[int(v) for v in np.asarray(results["reached"]).reshape(-1)],
                   rms=np.asarray(results.get("rms", np.zeros((0, 2))), dtype=float).reshape(-1, 2),
                   steps=int(np.asarray(results.get("steps", 0)).reshape(-1)[0]),
                   message=str(np.asarray(results.get("message", "")).reshape(-1)[0]))

    @classmethod
    def from_run(cls, run: Any) -> ThreadingResult:
        """Read a ``thread_first_turns`` run back from the catalogue."""
        return cls.from_results(run_results(run), run_start(run))


def _donut(r0: float, r1: float, n: int) -> FloatArray:
    """(2, n) points of a golden-angle spiral between radii r0 and r1 (pySC's wiggle pattern)."""
    k = np.arange(n)
    phi = 2 * np.pi / ((1 + math.sqrt(5)) / 2)
    r = np.sqrt(r0**2 + (r1**2 - r0**2) * k / max(n - 1, 1))
    return np.vstack([r * np.cos(k * phi), r * np.sin(k * phi)])


def thread_first_turns(response: TrajectoryResponse, setpoints: npt.ArrayLike, low: npt.ArrayLike,
                       high: npt.ArrayLike, *, turns: int = 2, injection: npt.ArrayLike | None = (0, 0, 0, 0),
                       injection_limits: Sequence[float] = (5e-3, 2e-3, 5e-3, 2e-3), bad: npt.ArrayLike | None = None,
                       tikhonov: float = 0.02, gain: float = 1.0, max_step: float | None = None,
                       n_stitch: int = 4, stall: int = 6, wiggle_correctors: int = 8, wiggle_points: int = 24,
                       wiggle_range: tuple[float, float] = (0.3, 1.0), balance_gain: float = 0.5,
                       balance_tol: float = 0.05, balance_target: float = 10e-6, balance_steps: int = 20,
                       patience: int = 3, max_readings: int = 600
                       ) -> Generator[ThreadingRequest, Any, ThreadingResult]:
    """Thread the injected beam to ``turns`` full turns: the decisions only (a generator; see the module doc).

    Stages (pySC's ``first_turn``, ``stitch``, ``balance``, with injection steering):

    1. **first turn**: SVD correction of the readings the beam reaches towards zero, with the correctors
       upstream of the last BPM reached and the injection knobs; when the reach does not grow for ``stall``
       corrections, **wiggle**: the last 1 .. ``wiggle_correctors`` correctors before the loss point are moved
       together through a golden spiral of kicks (``wiggle_range`` x their limits) until the beam goes further.
    2. **stitch** (once the beam passes the first turn and ``n_stitch`` BPMs of the next): the first turn towards
       zero and the first ``n_stitch`` BPMs of the next turn towards the same BPMs of the first turn.
    3. **balance** (all ``turns`` turns): the first turn towards zero, each next turn towards the first (a
       period-1 trajectory: the closed orbit), with ``balance_gain`` of each step (the model's one-turn map is
       only approximate on an errored ring), until the turn-to-turn rms is below ``balance_target`` or
       ``patience`` steps have not lowered it by ``balance_tol`` (relative), at most ``balance_steps``; the
       machine is left in the best state found.

    Args:
        response: a trajectory response of at least ``turns`` turns (:func:`model_trajectory_response`).
        setpoints: (m,) present corrector setpoints [A] (columns of ``response``).
        low, high: (m,) corrector limits [A].
        turns: turns to thread (>= 2).
        injection: present injection trims (x, px, y, py), or ``None``: no injection steering.
        injection_limits: limits of the injection trims (m, rad, m, rad).
        bad: (n,) BPMs out of service (not used).
        tikhonov: Tikhonov regularisation (relative to the largest weighted singular value).
        gain: fraction of each computed step applied.
        max_step: largest corrector move per step [A].
        n_stitch: BPMs of the next turn matched in the stitch stage.
        stall: corrections without a longer reach before wiggling.
        wiggle_correctors, wiggle_points, wiggle_range: the wiggle search.
        balance_gain, balance_tol, balance_target, balance_steps, patience: the balance stage (fraction of each
            step, relative gain that counts as progress, turn-to-turn rms target [m], steps at most, steps
            without progress before stopping).
        max_readings: readings at most (then it stops, ``success=False``).

    Yields:
        :class:`ThreadingRequest` objects; send back the :class:`TrajectoryReading` (or ``(x, y)``) taken after applying each.

    Returns:
        :class:`ThreadingResult`.
    """
    if response.turns < turns:
        raise ValueError(f"the response has {response.turns} turn(s): threading {turns} turns needs a response of "
                         f"{turns} (model_trajectory_response(..., turns={turns}))")
    if turns < 2:
        raise ValueError("threading needs turns >= 2 (the first turn then its closure)")
    resp = response.truncated(turns)
    n, m = resp.nbpm, resp.ncor
    sp = np.asarray(setpoints, dtype=float).reshape(m).copy()
    lo = np.broadcast_to(np.asarray(low, dtype=float), (m,)).copy()
    hi = np.broadcast_to(np.asarray(high, dtype=float), (m,)).copy()
    use_inj = injection is not None
    inj = np.zeros(4) if injection is None else np.asarray(injection, dtype=float).reshape(4).copy()
    inj_lim = np.asarray(injection_limits, dtype=float)
    hist: list[int] = []
    rms_hist: list[tuple[float, float]] = []
    total = turns * n
    readings = 0

    def result(success: bool, stage: str, msg: str) -> ThreadingResult:
        return ThreadingResult(success, stage, sp.copy(), inj.copy(), list(hist), np.array(rms_hist).reshape(-1, 2),
                               readings, msg)

    def read(req: ThreadingRequest) -> Generator[ThreadingRequest, Any, TrajectoryReading]:
        nonlocal readings
        value = yield req
        readings += 1
        r = TrajectoryReading.of(value)
        if r.turns < turns:
            raise ValueError(f"threading {turns} turns needs readings of {turns} turns, got {r.turns}")
        r = TrajectoryReading(r.x[:turns], r.y[:turns])
        hist.append(reached(r, bad))
        rms_hist.append((rms(r.x), rms(r.y)))
        return r

    def apply(dk: FloatArray, dinj: FloatArray, stage: str, note: str) -> ThreadingRequest:
        nonlocal sp, inj
        step, _ = limit_step(gain * dk, sp, lo, hi, max_step=max_step)
        sp = sp + step
        if use_inj:
            inj = np.clip(inj + gain * dinj, -inj_lim, inj_lim)
        return ThreadingRequest(sp.copy(), inj.copy() if use_inj else None, stage, note)

    reading = yield from read(ThreadingRequest(None, None, "first_turn", "initial reading"))
    if hist[-1] == 0:
        return result(False, "first_turn", "no BPM sees the beam: check the injection (no reading to steer on)")

    # -------- stage 1: first turn (until the first turn and n_stitch BPMs of the next are reached) -----------
    best = hist[-1]
    since = 0
    target1 = min(n + n_stitch, total)
    wiggled_at = -1
    while hist[-1] < target1:
        if readings >= max_readings:
            return result(False, "first_turn", f"gave up after {readings} readings at {hist[-1]} BPM passages")
        if since >= stall and wiggled_at == hist[-1]:
            return result(False, "first_turn", f"stuck at {hist[-1]} BPM passages: corrections and the wiggle of "
                          f"{wiggle_correctors} correctors per plane do not get the beam further (correctors at "
                          "their limits? a BPM or magnet fault there?)")
        if since >= stall:
            wiggled_at = hist[-1]
            ok, reading = yield from _wiggle(read, resp, hist, sp, lo, hi, wiggle_correctors, wiggle_points,
                                             wiggle_range, inj if use_inj else None)
            if ok is not None:
                sp = ok
            since = 0
            best = max(best, hist[-1])
            continue
        nreach = hist[-1]
        t_used = 1 if nreach <= n else 2
        dev = reading.vector(t_used)
        rows_t = resp.rows(t_used)
        passages = np.concatenate([np.arange(t_used * n), np.arange(t_used * n)])
        dev = np.where(passages < nreach, dev, np.nan)
        stp = trajectory_step(resp, dev, n_passages=nreach, turns=t_used, injection=use_inj, tikhonov=tikhonov,
                              bad=bad, rows=rows_t)
        reading = yield from read(apply(stp.dk, stp.dinj, "first_turn", f"correction on {nreach} passages"))
        if hist[-1] > best:
            best, since = hist[-1], 0
        else:
            since += 1

    # -------- stage 2: stitch the next turn on the first --------------------------------------------------------
    for _ in range(balance_steps):
        if hist[-1] >= total:
            break
        if readings >= max_readings:
            return result(False, "stitch", f"gave up after {readings} readings at {hist[-1]} BPM passages")
        k = min(n_stitch, max(hist[-1] - n, 1))
        dev, mat, imat = _stitch_system(resp, reading, k)
        stp = trajectory_step(resp, dev, injection=use_inj, tikhonov=tikhonov, bad=None, rows=np.arange(dev.size),
                              matrix=mat, inj_matrix=imat)
        reading = yield from read(apply(stp.dk, stp.dinj, "stitch", f"stitch on {k} BPMs of turn 2"))
        if hist[-1] < n:
            return result(False, "stitch", "lost the first turn while stitching")
    if hist[-1] < total:
        return result(False, "stitch", f"{hist[-1]} of {total} BPM passages after stitching")

    # -------- stage 3: balance: every turn towards the first, keeping the best state -------------------------
    best = (float("inf"), sp.copy(), inj.copy())
    worse = 0
    msg = ""
    for _ in range(balance_steps):
        dev, mat, imat = _balance_system(resp, reading, turns)
        diff = rms(dev[2 * n:])
        if diff < best[0] * (1.0 - balance_tol):
            best, worse = (diff, sp.copy(), inj.copy()), 0
        else:
            worse += 1
        if diff <= balance_target:
            msg = f"turn-to-turn rms {diff * 1e6:.1f} um <= {balance_target * 1e6:g} um"
            break
        if worse >= patience:
            msg = f"turn-to-turn rms stopped falling ({patience} steps without a {balance_tol:.0%} gain)"
            break
        if readings >= max_readings:
            msg = f"{readings} readings"
            break
        stp = trajectory_step(resp, dev, injection=use_inj, tikhonov=tikhonov, rows=np.arange(dev.size),
                              matrix=mat, inj_matrix=imat)
        reading = yield from read(apply(balance_gain * stp.dk, balance_gain * stp.dinj, "balance",
                                        f"balance the turns (turn-to-turn rms {diff * 1e6:.0f} um)"))
        if hist[-1] < total:
            msg = f"a balance step lost transmission ({hist[-1]} of {total} passages): back to the best state"
            break
    else:
        msg = f"{balance_steps} balance steps"
    if not (np.array_equal(best[1], sp) and np.array_equal(best[2], inj)):
        sp, inj = best[1].copy(), best[2].copy()
        reading = yield from read(ThreadingRequest(sp.copy(), inj.copy() if use_inj else None, "balance",
                                          "back to the best balanced state"))
    ok = hist[-1] >= total
    return result(ok, "done" if ok else "balance",
                  f"{turns} turns{' reached' if ok else ' NOT reached'}; balanced to a turn-to-turn rms of "
                  f"{best[0] * 1e6:.1f} um ({msg})")


def _stitch_system(resp: TrajectoryResponse, reading: TrajectoryReading, k: int):
    """First turn towards 0 and the first k BPMs of turn 2 towards the same BPMs of turn 1 (pySC's stitch)."""
    n = resp.nbpm
    t = resp.turns
    sel = []
    for p in range(2):
        base = p * t * n
        sel.append(base + np.arange(n))
    r1 = np.concatenate(sel)
    v1 = np.concatenate([reading.x[0], reading.y[0]])
    r2a = np.concatenate([p * t * n + n + np.arange(k) for p in range(2)])  # turn-2 rows of the first k BPMs
    r2b = np.concatenate([p * t * n + np.arange(k) for p in range(2)])  # the same BPMs in turn 1
    v2 = np.concatenate([reading.x[1, :k] - reading.x[0, :k], reading.y[1, :k] - reading.y[0, :k]])
    mat = np.vstack([resp.matrix[r1], resp.matrix[r2a] - resp.matrix[r2b]])
    imat = np.vstack([resp.injection[r1], resp.injection[r2a] - resp.injection[r2b]])
    return np.concatenate([v1, v2]), mat, imat


def _balance_system(resp: TrajectoryResponse, reading: TrajectoryReading, turns: int):
    """First turn towards 0 and every next turn towards the first (pySC's balance)."""
    n = resp.nbpm
    t = resp.turns
    r1 = np.concatenate([p * t * n + np.arange(n) for p in range(2)])
    parts_v = [np.concatenate([reading.x[0], reading.y[0]])]
    parts_m = [resp.matrix[r1]]
    parts_i = [resp.injection[r1]]
    for k in range(1, turns):
        rk = np.concatenate([p * t * n + k * n + np.arange(n) for p in range(2)])
        parts_v.append(np.concatenate([reading.x[k] - reading.x[0], reading.y[k] - reading.y[0]]))
        parts_m.append(resp.matrix[rk] - resp.matrix[r1])
        parts_i.append(resp.injection[rk] - resp.injection[r1])
    return np.concatenate(parts_v), np.vstack(parts_m), np.vstack(parts_i)


def _wiggle(read, resp, hist, sp, lo, hi, ncor_max, npts, frac_range, inj):
    """Move the last correctors before the loss point through a spiral until the beam goes further.

    Returns (the new setpoints or None, the last reading)."""
    n = resp.nbpm
    start = hist[-1]
    last_bpm = min(max(start - 1, 0), n - 1)
    turn = (start - 1) // n if start > 0 else 0
    up = resp.upstream(last_bpm, turn)
    planes = np.array(resp.planes)
    h_idx = np.nonzero(up & (planes == "x"))[0]
    v_idx = np.nonzero(up & (planes == "y"))[0]
    h_idx = h_idx[np.argsort(resp.corrector_refpts[h_idx], kind="stable")]
    v_idx = v_idx[np.argsort(resp.corrector_refpts[v_idx], kind="stable")]
    pts = _donut(frac_range[0], frac_range[1], npts)
    base = sp.copy()
    half = 0.5 * (hi - lo)
    r = None
    for k in range(1, min(ncor_max, max(h_idx.size, v_idx.size)) + 1):  # no set tried twice
        ch, cv = h_idx[-k:], v_idx[-k:]
        for i in range(npts):
            trial = base.copy()
            trial[ch] = np.clip(base[ch] + pts[0, i] * half[ch], lo[ch], hi[ch])
            trial[cv] = np.clip(base[cv] + pts[1, i] * half[cv], lo[cv], hi[cv])
            r = yield from read(ThreadingRequest(trial.copy(), None if inj is None else inj.copy(), "wiggle",
                                        f"wiggle {k} corrector(s) per plane, point {i + 1}/{npts}"))
            if hist[-1] > start:
                return trial, r
    r = yield from read(ThreadingRequest(base.copy(), None if inj is None else inj.copy(), "wiggle", "wiggle failed: back"))
    return None, r


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig
