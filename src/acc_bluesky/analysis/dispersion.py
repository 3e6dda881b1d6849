"""Dispersion from the orbit change of an RF frequency step (MML's ``measdisp``).

At fixed RF frequency the path length is fixed; a step ``df`` [Hz] changes the momentum by
``dp/p = -df / (f_RF * alpha_c)`` and the orbit by ``eta * dp/p``. ``alpha_c`` comes from the model (design
lattice, 4D), so the tool runs unchanged on a real machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ._common import FloatArray, resolve_profile, rms, run_results, tool_run_start
from .orm import momentum_compaction

__all__ = ["DEFAULT_RF_STEP_DP", "Dispersion", "dispersion_from_orbits", "dp_from_df", "model_momentum_compaction_of",
           "model_dispersion", "rf_step_for_dp"]

#: the momentum deviation |dp/p| an RF step is sized for when neither the caller nor the profile gives the step
#: (ESRF-EBS's 20 Hz: 3.2e-4): the orbit moves by eta x 3e-4 (30 um for 0.1 m of dispersion), far above the BPM
#: noise, and the second-order dispersion stays small
DEFAULT_RF_STEP_DP = 3e-4


def dp_from_df(df: npt.ArrayLike, f_rf: float, alpha_c: float) -> FloatArray | float:
    """Relative momentum deviation for an RF frequency change ``df`` [Hz] at frequency ``f_rf`` [Hz]."""
    if alpha_c == 0 or f_rf == 0:
        raise ValueError(f"need a non-zero momentum compaction and RF frequency (alpha_c={alpha_c}, f={f_rf})")
    out = -np.asarray(df, dtype=float) / (f_rf * alpha_c)
    return float(out) if np.ndim(out) == 0 else out


def rf_step_for_dp(f_rf: float, alpha_c: float, dp: float = DEFAULT_RF_STEP_DP) -> float:
    """The RF step [Hz] that changes the momentum by ``|dp|``: ``|df| = |dp| |alpha_c| f_rf`` (> 0).

    Args:
        f_rf: RF frequency [Hz] (> 0).
        alpha_c: momentum compaction factor (non-zero).
        dp: relative momentum deviation wanted (default :data:`DEFAULT_RF_STEP_DP`).

    Raises:
        ValueError: naming the input that cannot size a step.
    """
    f, a, d = float(f_rf), float(alpha_c), float(dp)
    if not (np.isfinite(f) and f > 0):
        raise ValueError(f"cannot size the RF step: the RF frequency must be > 0 Hz, got {f_rf!r} (a ring without a "
                         "cavity: set rf.harmonic_number in the profile)")
    if not (np.isfinite(a) and a != 0):
        raise ValueError(f"cannot size the RF step: the momentum compaction must be a non-zero number, got {alpha_c!r}"
                         " (give df explicitly, or tools.dispersion.df in the profile)")
    if not (np.isfinite(d) and d != 0):
        raise ValueError(f"cannot size the RF step: dp must be a non-zero number, got {dp!r}")
    return abs(d * a) * f


def dispersion_from_orbits(x: npt.ArrayLike, y: npt.ArrayLike, df: npt.ArrayLike, f_rf: float,
                           alpha_c: float) -> tuple[FloatArray, FloatArray]:
    """Dispersion (eta_x, eta_y) [m] from orbits measured at RF offsets ``df`` [Hz].

    Args:
        x, y: (k, n) BPM readings [m] at the k frequency offsets (k >= 2; a reference at df=0 may be included).
        df: (k,) RF frequency offsets [Hz] from ``f_rf``.
        f_rf: RF frequency [Hz] of the reference.
        alpha_c: momentum compaction factor.

    A straight line is fitted per BPM against ``dp``; with symmetric steps the quadratic (second-order
    dispersion) term cancels.
    """
    xs = np.atleast_2d(np.asarray(x, dtype=float))
    ys = np.atleast_2d(np.asarray(y, dtype=float))
    dfs = np.asarray(df, dtype=float).reshape(-1)
    if xs.shape[0] != dfs.size or ys.shape[0] != dfs.size:
        raise ValueError(f"need one orbit per frequency offset: x {xs.shape}, y {ys.shape}, df {dfs.shape}")
    if np.unique(dfs).size < 2:
        raise ValueError("need at least two different RF frequencies")
    dp = np.asarray(dp_from_df(dfs, f_rf, alpha_c))
    a = np.column_stack([np.ones_like(dp), dp])
    coef_x = np.linalg.lstsq(a, xs, rcond=None)[0]
    coef_y = np.linalg.lstsq(a, ys, rcond=None)[0]
    return coef_x[1], coef_y[1]


def model_momentum_compaction_of(source: Any) -> float:
    """alpha_c of the design lattice of a profile / twin / machine (4D)."""
    return momentum_compaction(resolve_profile(source).load_lattice())


def model_dispersion(source: Any, lattice=None) -> tuple[FloatArray, FloatArray]:
    """Model dispersion (eta_x, eta_y) [m] at the BPMs (design lattice unless ``lattice`` is given)."""
    import warnings

    import at

    prof = resolve_profile(source)
    ring = prof.load_lattice() if lattice is None else lattice
    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ed = at.get_optics(ring, refpts=prof.bpm_refpts)
    return ed.dispersion[:, 0].copy(), ed.dispersion[:, 2].copy()


@dataclass
class Dispersion:
    """Measured dispersion at the BPMs.

    Attributes:
        eta_x, eta_y: (n,) dispersion [m] as the BPMs see it.
        bpm_names: the n BPM names.
        df: (k,) RF offsets used [Hz].
        f_rf: reference RF frequency [Hz].
        alpha_c: momentum compaction used.
        dp: (k,) momentum deviations of the steps.
        uid: the run it was read from.
    """

    eta_x: FloatArray
    eta_y: FloatArray
    bpm_names: list[str]
    df: FloatArray
    f_rf: float
    alpha_c: float
    dp: FloatArray | None = None
    uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    s: FloatArray | None = None  #: s [m] of the BPMs (for figures), when known

    def __post_init__(self) -> None:
        self.eta_x = np.asarray(self.eta_x, dtype=float)
        self.eta_y = np.asarray(self.eta_y, dtype=float)
        self.df = np.asarray(self.df, dtype=float).reshape(-1)
        self.bpm_names = [str(b) for b in self.bpm_names]
        if self.dp is None:
            self.dp = np.asarray(dp_from_df(self.df, self.f_rf, self.alpha_c)).reshape(-1)

    def __repr__(self) -> str:
        return (f"Dispersion({len(self.bpm_names)} BPMs, eta_x rms {rms(self.eta_x) * 1e3:.1f} mm, "
                f"eta_y rms {rms(self.eta_y) * 1e3:.2f} mm, df={self.df.tolist()} Hz)")

    @property
    def vector(self) -> FloatArray:
        """``[eta_x; eta_y]`` (2n,) [m]: the layout of an ORM column."""
        return np.concatenate([self.eta_x, self.eta_y])

    def rf_response(self) -> FloatArray:
        """Orbit response to the RF frequency [m/Hz], ``-eta / (f alpha_c)`` (2n,)."""
        return -self.vector / (self.f_rf * self.alpha_c)

    def to_results(self) -> dict[str, np.ndarray]:
        """Arrays and numbers for the run's ``results`` stream; the RF offsets (a few values) go to the start
        document (``rf_offsets``), as short arrays do not fit Tiled's SQL event tables."""
        return {"eta_x": self.eta_x, "eta_y": self.eta_y, "f_rf": np.asarray(self.f_rf),
                "alpha_c": np.asarray(self.alpha_c)}

    @classmethod
    def from_results(cls, results: dict[str, Any], start: dict[str, Any] | None = None) -> Dispersion:
        start = start or {}
        for k in ("eta_x", "eta_y"):
            if k not in results:
                raise KeyError(f"no {k!r} in the results {sorted(results)}: is this a dispersion run?")
        n = np.asarray(results["eta_x"]).size
        return cls(eta_x=results["eta_x"], eta_y=results["eta_y"],
                   bpm_names=list(start.get("bpm_names") or [f"BPM_{i + 1:03d}" for i in range(n)]),
                   df=np.asarray(results.get("df", start.get("rf_offsets", [np.nan])), dtype=float),
                   f_rf=float(np.asarray(results["f_rf"])), alpha_c=float(np.asarray(results["alpha_c"])),
                   dp=results.get("dp"), uid=start.get("uid"),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "time") if k in start},
                   s=None if start.get("bpm_s") is None else np.asarray(start["bpm_s"], dtype=float))

    @classmethod
    def from_run(cls, run: Any) -> Dispersion:
        """Read what ``measure_dispersion`` stored in a run (a Tiled ``BlueskyRun``)."""
        start = tool_run_start(run, "dispersion", "dispersion run")
        return cls.from_results(run_results(run), start)

    def plot(self, path: str | Path, model: tuple[npt.ArrayLike, npt.ArrayLike] | None = None) -> Path:
        """PNG of eta_x and eta_y [mm] per BPM (and a model curve if given). Thread-safe: matplotlib's object API
        on an Agg canvas, no pyplot state."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(9, 5), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 1, sharex=True)
        pos = np.arange(len(self.bpm_names)) if self.s is None else np.asarray(self.s, dtype=float)
        for ax, eta, k, lab in ((axes[0], self.eta_x, 0, "eta_x"), (axes[1], self.eta_y, 1, "eta_y")):
            ax.plot(pos, eta * 1e3, ".-", lw=0.8, ms=3, label="measured")
            if model is not None:
                ax.plot(pos, np.asarray(model[k]) * 1e3, "-", lw=0.8, label="model")
            ax.set_ylabel(f"{lab} [mm]")
            ax.legend(loc="upper right", fontsize=8)
            ax.grid(alpha=0.3)
        axes[1].set_xlabel("BPM index" if self.s is None else "s [m]")
        fig.suptitle(f"dispersion (df = {self.df.tolist()} Hz, alpha_c = {self.alpha_c:.3e})")
        fig.tight_layout()
        fig.savefig(path)
        return path
