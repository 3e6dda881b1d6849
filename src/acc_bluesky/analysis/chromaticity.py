"""Chromaticity: RF-frequency scan design and fit, model chromaticity response of sextupole families.

The beam energy is moved with the RF frequency, as on a real ring: at a fixed harmonic number a relative
frequency change ``df / f`` changes the path length by ``dC / C = -df / (f + df)``, and the momentum deviation
follows from the model's path-length polynomial ``dC / C = alpha_1 dp + alpha_2 dp^2`` (momentum compaction
factor and its first correction). The user never chooses 4D or 6D: the scan asks for ``dp`` and the tool picks
the frequencies. Chromaticity is ``xi = dQ / d(dp)`` at the starting point (dp = 0), from a polynomial fit.

Pure numpy/pyAT.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ._common import FloatArray, resolve_profile, run_results, run_start
from .tune import FamilyResponse, _Correction, _model_family_response, model_lattice

__all__ = [
    "Chromaticity",
    "ChromaticityResponse",
    "ChromaticityCorrection",
    "momentum_compaction_poly",
    "rf_steps_for_dp",
    "dp_from_rf_steps",
    "scan_points",
    "fit_chromaticity",
    "lattice_chromaticity",
    "model_chromaticity_response",
    "model_momentum_compaction",
]


def momentum_compaction_poly(ring, dp_range: float = 2e-3, order: int = 2) -> FloatArray:
    """Path-length polynomial ``[alpha_1, alpha_2, ...]`` of a pyAT ring: ``dC/C = alpha_1 dp + alpha_2 dp^2 ...``.

    Fitted by pyAT's ``get_mcf`` over ``dp`` in ``[-dp_range, dp_range]`` (4D copy of the ring).
    """
    import at

    r = ring.disable_6d(copy=True) if getattr(ring, "is_6d", False) else ring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = at.get_mcf(r, fit_order=order, n_step=max(2 * order + 1, 5), DPStep=2.0 * float(dp_range))
    return np.atleast_1d(np.asarray(a, dtype=float))


def _path(dp: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    return sum(a * dp ** (k + 1) for k, a in enumerate(alphas))


def rf_steps_for_dp(dp: npt.ArrayLike, f_rf: float, alphas: npt.ArrayLike) -> FloatArray:
    """RF frequency steps [Hz] from ``f_rf`` [Hz] that put the beam at momentum deviations ``dp``.

    ``alphas``: the path-length polynomial (a float is the linear momentum compaction factor): then
    ``df = -alpha_c f_rf dp`` to first order.
    """
    a = np.atleast_1d(np.asarray(alphas, dtype=float))
    x = _path(np.asarray(dp, dtype=float), a)
    return -float(f_rf) * x / (1.0 + x)


def dp_from_rf_steps(df: npt.ArrayLike, f_rf: float, alphas: npt.ArrayLike) -> FloatArray:
    """Momentum deviations of RF frequency steps ``df`` [Hz] from ``f_rf`` [Hz] (inverse of
    :func:`rf_steps_for_dp`)."""
    a = np.atleast_1d(np.asarray(alphas, dtype=float))
    df = np.asarray(df, dtype=float)
    x = -df / (float(f_rf) + df)
    dp = x / a[0]
    for _ in range(30):  # Newton on the path-length polynomial, from the linear guess
        g = _path(dp, a) - x
        dg = sum((k + 1) * c * dp ** k for k, c in enumerate(a))
        step = g / dg
        dp = dp - step
        if np.all(np.abs(step) <= 1e-15):
            break
    return dp


def scan_points(dp_max: float, steps: int) -> FloatArray:
    """The momentum deviations of a symmetric scan: ``steps`` (odd, >= 3) points in ``[-dp_max, dp_max]``."""
    if not (isinstance(steps, (int, np.integer)) and steps >= 3 and steps % 2 == 1):
        raise ValueError(f"steps must be an odd integer >= 3 (so that dp = 0 is measured), got {steps!r}")
    if not (np.isfinite(dp_max) and 0 < dp_max <= 0.05):
        raise ValueError(f"dp_max must be in (0, 0.05] (relative momentum deviation, e.g. 2e-3), got {dp_max!r}")
    return np.linspace(-dp_max, dp_max, int(steps))


def fit_chromaticity(dp: npt.ArrayLike, qx: npt.ArrayLike, qy: npt.ArrayLike,
                     order: int = 1) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Polynomial fit of the tunes versus momentum deviation.

    Args:
        dp: momentum deviations of the samples (n,).
        qx, qy: tunes of the samples (n,) (NaN samples are ignored).
        order: polynomial order (1 linear, 2 quadratic, 3 cubic).

    Returns:
        ``xi`` (2,) = dQ/d(dp) at dp = 0, its standard error (2,) from the fit residuals (NaN without spare
        points), and the coefficients (2, order + 1) in increasing powers of dp.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    dp = np.asarray(dp, dtype=float).reshape(-1)
    xi = np.full(2, np.nan)
    err = np.full(2, np.nan)
    coeffs = np.full((2, order + 1), np.nan)
    for k, q in enumerate((qx, qy)):
        q = np.asarray(q, dtype=float).reshape(-1)
        ok = np.isfinite(q) & np.isfinite(dp)
        n = int(ok.sum())
        if len(np.unique(dp[ok])) <= order:
            raise ValueError(f"fit of order {order} needs at least {order + 1} distinct dp with a tune reading, "
                             f"got {len(np.unique(dp[ok]))}")
        a = np.vander(dp[ok], order + 1, increasing=True)
        c, *_ = np.linalg.lstsq(a, q[ok], rcond=None)
        coeffs[k] = c
        xi[k] = c[1]
        if n > order + 1:
            r = q[ok] - a @ c
            s2 = float(r @ r) / (n - order - 1)
            cov = s2 * np.linalg.inv(a.T @ a)
            err[k] = float(np.sqrt(cov[1, 1]))
    return xi, err, coeffs


def lattice_chromaticity(ring) -> FloatArray:
    """Linear chromaticities (xi_x, xi_y) = dQ/d(dp) of a pyAT ring (pyAT ``get_chrom``, 4D), per lattice period
    as the tunes of :func:`acc_bluesky.analysis.tune.lattice_tunes` (``get_chrom`` gives them for the whole
    ring: divided by the lattice's ``periodicity``)."""
    import at

    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xi = np.asarray(at.get_chrom(ring)[:2], dtype=float)
    return xi / float(getattr(ring, "periodicity", 1) or 1)


@dataclass
class Chromaticity:
    """A measured chromaticity (RF scan and fit).

    Attributes:
        xi: (2,) chromaticities dQx/d(dp), dQy/d(dp) at the starting RF frequency.
        xi_std: (2,) standard errors from the fit residuals.
        dp: (n,) momentum deviation of each scan point (from ``alphas``).
        df: (n,) RF frequency step of each point from the starting frequency [Hz].
        qx, qy: (n,) measured tunes per point (averages).
        qx_std, qy_std: (n,) standard deviation of the readings per point.
        coeffs: (2, order + 1) fit coefficients in increasing powers of dp.
        order: fit order.
        f_rf: starting RF frequency [Hz] (restored after the scan).
        alphas: path-length polynomial used to convert df to dp (alpha_c first).
        uid: the run it was read from, if any.
    """

    xi: FloatArray
    xi_std: FloatArray
    dp: FloatArray
    df: FloatArray
    qx: FloatArray
    qy: FloatArray
    qx_std: FloatArray
    qy_std: FloatArray
    coeffs: FloatArray
    order: int
    f_rf: float
    alphas: FloatArray
    uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Chromaticity(xi_x={self.xi[0]:.3f} +- {self.xi_std[0]:.3f}, xi_y={self.xi[1]:.3f} +- "
                f"{self.xi_std[1]:.3f}, {len(self.dp)} points, dp_max={np.max(np.abs(self.dp)):.2g}, "
                f"order {self.order}{', uid=' + self.uid[:8] if self.uid else ''})")

    @property
    def alpha_c(self) -> float:
        """Linear momentum compaction factor used."""
        return float(self.alphas[0])

    def tunes_at(self, dp: npt.ArrayLike) -> FloatArray:
        """Fitted tunes (2, ...) at momentum deviations ``dp``."""
        dp = np.asarray(dp, dtype=float)
        return np.stack([np.polynomial.polynomial.polyval(dp, c) for c in self.coeffs])

    @classmethod
    def from_scan(cls, df: npt.ArrayLike, qx: npt.ArrayLike, qy: npt.ArrayLike, f_rf: float,
                  alphas: npt.ArrayLike, order: int = 1, *, point: npt.ArrayLike | None = None) -> Chromaticity:
        """Analyse a scan: samples of the tunes at RF steps ``df`` [Hz] from ``f_rf`` [Hz].

        ``point``: index of the scan point of each sample (several readings per point); default one sample each.
        """
        df = np.asarray(df, dtype=float).reshape(-1)
        qx = np.asarray(qx, dtype=float).reshape(-1)
        qy = np.asarray(qy, dtype=float).reshape(-1)
        alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
        dp = dp_from_rf_steps(df, f_rf, alphas)
        xi, err, coeffs = fit_chromaticity(dp, qx, qy, order)
        point = np.arange(len(df)) if point is None else np.asarray(point, dtype=int).reshape(-1)
        pts = np.unique(point)
        agg = {k: np.zeros(len(pts)) for k in ("df", "dp", "qx", "qy", "sx", "sy")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, p in enumerate(pts):
                s = point == p
                agg["df"][i] = df[s][0]
                agg["dp"][i] = dp[s][0]
                agg["qx"][i] = np.nanmean(qx[s])
                agg["qy"][i] = np.nanmean(qy[s])
                agg["sx"][i] = np.nanstd(qx[s]) if s.sum() > 1 else 0.0
                agg["sy"][i] = np.nanstd(qy[s]) if s.sum() > 1 else 0.0
        return cls(xi=xi, xi_std=err, dp=agg["dp"], df=agg["df"], qx=agg["qx"], qy=agg["qy"], qx_std=agg["sx"],
                   qy_std=agg["sy"], coeffs=coeffs, order=int(order), f_rf=float(f_rf), alphas=alphas)

    def to_results(self) -> dict[str, Any]:
        """Arrays for ``store_result``."""
        return {"xi": self.xi, "xi_std": self.xi_std, "dp": self.dp, "df": self.df, "qx": self.qx, "qy": self.qy,
                "qx_std": self.qx_std, "qy_std": self.qy_std, "coeffs_x": self.coeffs[0],
                "coeffs_y": self.coeffs[1], "order": int(self.order), "f_rf": float(self.f_rf),
                "alphas": self.alphas}

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> Chromaticity:
        """Rebuild from the stored results of a ``chromaticity`` run."""
        start = dict(start or {})
        try:
            r = {k: np.asarray(results[k], dtype=float) for k in ("xi", "xi_std", "dp", "df", "qx", "qy",
                                                                   "coeffs_x", "coeffs_y", "f_rf", "alphas")}
        except KeyError as err:
            raise KeyError(f"no chromaticity in these results (missing {err}; got {sorted(results)}): is it a "
                           "'chromaticity' run that completed?") from err
        n = r["dp"].shape
        return cls(xi=r["xi"].reshape(2), xi_std=r["xi_std"].reshape(2), dp=r["dp"].reshape(-1),
                   df=r["df"].reshape(-1), qx=r["qx"].reshape(-1), qy=r["qy"].reshape(-1),
                   qx_std=np.asarray(results.get("qx_std", np.zeros(n)), dtype=float).reshape(-1),
                   qy_std=np.asarray(results.get("qy_std", np.zeros(n)), dtype=float).reshape(-1),
                   coeffs=np.stack([r["coeffs_x"].reshape(-1), r["coeffs_y"].reshape(-1)]),
                   order=int(np.asarray(results.get("order", len(r["coeffs_x"].reshape(-1)) - 1))),
                   f_rf=float(r["f_rf"]), alphas=np.atleast_1d(r["alphas"]), uid=start.get("uid"),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "facility") if k in start})

    @classmethod
    def from_run(cls, run: Any) -> Chromaticity:
        """Read a chromaticity measurement back from a run of the catalogue."""
        start = run_start(run)
        tool = start.get("tool")
        if tool is not None and tool != "chromaticity":
            raise ValueError(f"run {start.get('uid', '?')} is a {tool!r} run, not a 'chromaticity' run")
        return cls.from_results(run_results(run), start)


class ChromaticityResponse(FamilyResponse):
    """Chromaticity response dxi/dI [1/A] and dxi/dH [1/m^-3] (2 x n sextupole families)."""

    observable: ClassVar[str] = "chromaticity"
    tool: ClassVar[str] = "chromaticity_response"


def model_chromaticity_response(source: Any, families: Sequence[str] | None = None, *,
                                setpoints: Mapping[str, npt.ArrayLike] | None = None, lattice=None,
                                delta: float | npt.ArrayLike | None = None) -> ChromaticityResponse:
    """The model chromaticity response (pure pyAT ``get_chrom``): each family's strength changed by +-delta.

    Args:
        source: a Profile, profile name, Twin or Machine.
        families: family names (default: every sextupole family of the profile).
        setpoints: hardware setpoints ``{family: A}`` at which to evaluate the model (default: design).
        lattice: start from this lattice instead of the design one.
        delta: half step in physics units (m^-3) per family (default: 1e-3 of the family's mean |H|).

    Returns:
        :class:`ChromaticityResponse` with ``kind="model"``.
    """
    return _model_family_response(source, families, ("sextupole",), lattice_chromaticity, setpoints, lattice,
                                  delta, ChromaticityResponse)


def model_momentum_compaction(source: Any, setpoints: Mapping[str, npt.ArrayLike] | None = None,
                              dp_range: float = 2e-3) -> FloatArray:
    """Path-length polynomial of the model (design lattice at ``setpoints``), see :func:`momentum_compaction_poly`."""
    return momentum_compaction_poly(model_lattice(resolve_profile(source), setpoints), dp_range=dp_range)



class ChromaticityCorrection(_Correction):
    """A ``chromaticity_correction`` run: ``history`` are the measured chromaticities before each correction and
    after the last; ``steps_hw`` the sextupole family steps [A] per iteration; ``delta_physics`` in m^-3."""

    tool: ClassVar[str] = "chromaticity_correction"
    _prefix: ClassVar[str] = "xi"

    def __repr__(self) -> str:
        return (f"ChromaticityCorrection({', '.join(self.families)}: ({self.before[0]:.2f}, {self.before[1]:.2f}) "
                f"-> ({self.after[0]:.2f}, {self.after[1]:.2f}), target ({self.target[0]:.2f}, "
                f"{self.target[1]:.2f}), {self.iterations} iteration(s), "
                f"{'converged' if self.converged else 'NOT converged'})")
