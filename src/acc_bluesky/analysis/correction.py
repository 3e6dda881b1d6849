"""SVD orbit correction (MML's ``setorbit``): a weighted, masked SVD of a measured or model matrix.

The weighting and masking follow pyAT's response-matrix solvers (observables divided by their weights, variables
multiplied by theirs); Tikhonov regularisation, the RF frequency as an extra variable (MML's FitRF), the
noise-aware singular-value cut and the step limits are added here. Units: orbit [m], correctors in hardware units [A] (or whatever unit the
matrix columns are per), RF [Hz].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ._common import FloatArray, rms
from .orm import OrbitResponse

__all__ = [
    "SvdCorrector",
    "CorrectionSystem",
    "CorrectionStep",
    "INJECTION_KNOBS",
    "INJECTION_KNOB_LIMITS",
    "StepLimits",
    "limit_step",
    "orbit_rms",
    "SvCut",
    "noise_sv_cut",
    "orm_element_noise",
    "correction_floor",
    "StepVerdict",
    "judge_step",
    "n_sv_within_limits",
]


class SvdCorrector:
    """Weighted, masked SVD inverse of a response matrix ``R`` (observables x variables).

    Args:
        response: (nobs, nvar) matrix, e.g. m/A.
        obs_weights: per observable, its importance (1/sigma: larger = fitted harder). Default 1.
        var_weights: per variable, its natural scale (larger = the variable is used more freely). Default 1.
        obs_mask: observables used (False = excluded: ignored in the fit).
        var_mask: variables used (False = excluded: never moved).

    The weighted matrix is ``R * var_weights / obs_sigma`` (``obs_sigma = 1 / obs_weights``), as pyAT's solvers.
    """

    def __init__(self, response: npt.ArrayLike, obs_weights: npt.ArrayLike | None = None,
                 var_weights: npt.ArrayLike | None = None, obs_mask: npt.ArrayLike | None = None,
                 var_mask: npt.ArrayLike | None = None):
        r = np.asarray(response, dtype=float)
        if r.ndim != 2:
            raise ValueError(f"response must be a 2-D matrix, got shape {r.shape}")
        self._shape = r.shape
        self._obsmask = np.ones(r.shape[0], dtype=bool)
        self._varmask = np.ones(r.shape[1], dtype=bool)
        self._v: np.ndarray | None = None
        self._uh: np.ndarray | None = None
        self.singular_values: np.ndarray | None = None
        self._ow = np.ones(r.shape[0]) if obs_weights is None else np.broadcast_to(
            np.asarray(obs_weights, dtype=float), (r.shape[0],)).copy()
        self._vw = np.ones(r.shape[1]) if var_weights is None else np.broadcast_to(
            np.asarray(var_weights, dtype=float), (r.shape[1],)).copy()
        if np.any(self._ow <= 0) or np.any(self._vw <= 0) or not (np.all(np.isfinite(self._ow))
                                                                   and np.all(np.isfinite(self._vw))):
            raise ValueError("weights must be finite and > 0 (exclude an item with the masks instead)")
        if obs_mask is not None:
            self._obsmask = np.asarray(obs_mask, dtype=bool).copy()
        if var_mask is not None:
            self._varmask = np.asarray(var_mask, dtype=bool).copy()
        bad_rows = ~np.all(np.isfinite(r), axis=1)
        self._obsmask &= ~bad_rows
        if not self._obsmask.any() or not self._varmask.any():
            raise ValueError("every observable or every variable is excluded: nothing to correct with")
        self.response = np.where(np.isfinite(r), r, 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def weighted_response(self) -> FloatArray:
        return self.response * (self.varweights / self.obsweights.reshape(-1, 1))

    def solve(self) -> None:
        """The SVD of the weighted response over the observables and variables in use."""
        sel = np.ix_(self._obsmask, self._varmask)
        u, s, vh = np.linalg.svd(self.weighted_response[sel], full_matrices=False)
        self._v = vh.T * (1.0 / s) * self.varweights[self._varmask].reshape(-1, 1)
        self._uh = u.T / self.obsweights[self._obsmask]
        self.singular_values = s

    @property
    def varweights(self) -> np.ndarray:
        return self._vw

    @property
    def obsweights(self) -> np.ndarray:
        return 1.0 / self._ow

    def exclude_observables(self, mask: npt.ArrayLike) -> None:
        """Also exclude the observables where ``mask`` is True (e.g. NaN readings); the SVD is redone."""
        m = np.asarray(mask, dtype=bool)
        if np.any(m & self._obsmask):
            self._obsmask = self._obsmask & ~m
            self.singular_values = None

    @property
    def obs_mask(self) -> np.ndarray:
        return self._obsmask.copy()

    @property
    def var_mask(self) -> np.ndarray:
        return self._varmask.copy()

    def correction_matrix(self, nvals: int | None = None, tikhonov: float | None = None) -> FloatArray:
        """Pseudo-inverse (nvar, nobs) with ``nvals`` singular values, or Tikhonov-regularised with ``alpha``.

        Tikhonov uses the filter factors ``s / (s^2 + alpha^2)`` instead of ``1/s`` (``alpha`` in the units of the
        weighted singular values, see :attr:`singular_values`).
        """
        if self.singular_values is None:
            self.solve()
        s = self.singular_values
        if nvals is not None and not 1 <= int(nvals) <= len(s):
            raise ValueError(f"n_sv must be between 1 and {len(s)} (number of singular values), got {nvals}")
        k = len(s) if nvals is None else int(nvals)
        if tikhonov is None:
            filt = np.ones(k)
        elif tikhonov < 0:
            raise ValueError(f"tikhonov alpha must be >= 0, got {tikhonov}")
        else:
            filt = (s * s / (s * s + tikhonov * tikhonov))[:k]  # multiplies 1/s
        cormat = np.zeros(self.shape[::-1])
        cormat[np.ix_(self._varmask, self._obsmask)] = (self._v[:, :k] * filt) @ self._uh[:k, :]
        return cormat

    def correct(self, deviation: npt.ArrayLike, nvals: int | None = None,
                tikhonov: float | None = None) -> FloatArray:
        """Variable change that cancels ``deviation`` (observed minus target); NaN observables are excluded."""
        d = np.asarray(deviation, dtype=float)
        if d.shape != (self.shape[0],):
            raise ValueError(f"deviation has shape {d.shape}, expected ({self.shape[0]},)")
        nan = ~np.isfinite(d)
        if np.any(nan & self._obsmask):
            self.exclude_observables(nan)
        return -self.correction_matrix(nvals, tikhonov) @ np.where(nan, 0.0, d)

    def used_singular_values(self, nvals: int | None = None) -> FloatArray:
        if self.singular_values is None:
            self.solve()
        return self.singular_values[: (len(self.singular_values) if nvals is None else int(nvals))].copy()


#: the injection knobs a transfer line's correction may use, in this order (units m, rad, m, rad) ...
INJECTION_KNOBS = ("x", "px", "y", "py")
#: ... and their limits +- (the twin's injection trims and the trajectory tools')
INJECTION_KNOB_LIMITS = (5e-3, 2e-3, 5e-3, 2e-3)


@dataclass(frozen=True)
class CorrectionStep:
    """One step of every variable of a :class:`CorrectionSystem`.

    Attributes:
        dk: (m,) corrector steps [A] (the ORM's column order).
        dinj: (4,) injection knob steps (x [m], px [rad], y [m], py [rad]); zeros without injection knobs.
        drf: RF frequency step [Hz] (0 without ``fit_rf``).
    """

    dk: FloatArray
    dinj: FloatArray
    drf: float = 0.0


@dataclass
class CorrectionSystem:
    """The linear system of an orbit correction built from an :class:`OrbitResponse`.

    Rows are BPM readings ``[x; y]`` [m]; columns the selected correctors [A], then on a transfer line the four
    injection knobs (x [m], px [rad], y [m], py [rad]: the beam's entrance position and angle, which set the
    trajectory the BPMs read), then with ``fit_rf`` the RF frequency [Hz]. Weights, exclusions and the scales of
    the RF and injection columns are set here.

    Attributes:
        orm: the (sub)matrix used.
        response: (2n, m[+4][+1]) matrix, m/A (m/m, m/rad for the injection knobs, m/Hz for RF).
        solver: the :class:`SvdCorrector`.
        fit_rf: whether the last variable is the RF frequency.
        rf_weight: the RF variable's scale [Hz] (chosen so its column weighs like an average corrector's).
        n_injection: 4 with the injection knobs as variables (after the correctors), else 0.
        injection_weights: (4,) their scales (m, rad, m, rad: each column weighs like an average corrector's).
    """

    orm: OrbitResponse
    response: FloatArray
    solver: SvdCorrector
    fit_rf: bool
    rf_weight: float = 1.0
    warnings: list[str] = field(default_factory=list)
    n_injection: int = 0
    injection_weights: FloatArray | None = None

    @classmethod
    def build(cls, orm: OrbitResponse, *, fit_rf: bool = False, bpm_weights: npt.ArrayLike | None = None,
              corrector_weights: npt.ArrayLike | None = None, exclude_bpms: Sequence[str | int] = (),
              exclude_correctors: Sequence[str | int] = (), bad_bpms: npt.ArrayLike | None = None,
              planes: Sequence[str] | None = None, injection: npt.ArrayLike | None = None) -> CorrectionSystem:
        """Assemble the system.

        Args:
            orm: the response (hardware units are used).
            fit_rf: add the RF frequency as a variable (needs ``orm.rf``).
            injection: (2n, 4) response of the readings ``[x; y]`` to the injection knobs x [m], px [rad], y [m],
                py [rad] (a transfer line: its trajectory response to the entrance coordinates,
                ``TrajectoryResponse.injection``): the knobs become variables after the correctors. A line's
                orbit is the trajectory of the beam from the injector: its entrance error is corrected at its
                source, and the BPMs upstream of the first corrector of a plane can be steered by nothing else.
            bpm_weights: (n,) or (2n,) per BPM (or per reading) importance, larger = fitted harder.
            corrector_weights: (m,) per corrector scale, larger = used more freely.
            exclude_bpms: BPM names/indices ignored (both planes).
            exclude_correctors: corrector names/indices never moved.
            bad_bpms: (n,) boolean mask of BPMs out of service (ignored).
            planes: reading planes corrected (``("x",)`` corrects only the horizontal orbit); default: the planes
                the ORM's correctors kick in (vertical correctors alone do not try to correct the horizontal
                orbit through the coupling).
        """
        n = orm.nbpm
        if planes is None:
            planes = tuple(sorted(set(orm.planes)))
        resp = orm.matrix_hw
        notes: list[str] = []
        colnorm = np.linalg.norm(resp, axis=0)
        typical = float(np.mean(colnorm[colnorm > 0])) if np.any(colnorm > 0) else 1.0
        n_inj, inj_w = 0, None
        if injection is not None:
            inj = np.asarray(injection, dtype=float)
            if inj.shape != (2 * n, len(INJECTION_KNOBS)):
                raise ValueError(f"injection must be the ({2 * n}, 4) response to the injection knobs x, px, y, py, "
                                 f"got shape {inj.shape}")
            knorm = np.linalg.norm(np.nan_to_num(inj), axis=0)
            inj_w = np.where(knorm > 0, typical / np.where(knorm > 0, knorm, 1.0), 1.0)
            resp = np.column_stack([resp, inj])
            n_inj = len(INJECTION_KNOBS)
        if fit_rf:
            if orm.rf is None:
                raise ValueError("fit_rf=True needs an ORM with an RF column: measure it with rf=True or use "
                                 "orm='model'")
            rfnorm = float(np.linalg.norm(orm.rf))
            rf_w = typical / rfnorm if rfnorm > 0 else 1.0
            resp = np.column_stack([resp, orm.rf])
        else:
            rf_w = 1.0
        obs_mask = np.ones(2 * n, dtype=bool)
        for b in exclude_bpms:
            i = orm.bpm_index(b)
            obs_mask[[i, n + i]] = False
        if bad_bpms is not None:
            bad = np.asarray(bad_bpms, dtype=bool)
            obs_mask &= ~np.concatenate([bad, bad])
        if "x" not in planes:
            obs_mask[:n] = False
        if "y" not in planes:
            obs_mask[n:] = False
        var_mask = np.ones(resp.shape[1], dtype=bool)
        for c in exclude_correctors:
            var_mask[orm.corrector_index(c)] = False
        ow = None
        if bpm_weights is not None:
            w = np.asarray(bpm_weights, dtype=float).reshape(-1)
            if w.shape == (n,):
                w = np.concatenate([w, w])
            if w.shape != (2 * n,):
                raise ValueError(f"bpm_weights must have {n} or {2 * n} values, got {w.shape}")
            zero = w <= 0
            obs_mask &= ~zero
            ow = np.where(zero, 1.0, w)
        vw = np.ones(resp.shape[1])
        if corrector_weights is not None:
            cw = np.asarray(corrector_weights, dtype=float).reshape(-1)
            if cw.shape != (orm.ncor,):
                raise ValueError(f"corrector_weights must have {orm.ncor} values, got {cw.shape}")
            zero = cw <= 0
            var_mask[: orm.ncor] &= ~zero
            vw[: orm.ncor] = np.where(zero, 1.0, cw)
        if n_inj:
            vw[orm.ncor:orm.ncor + n_inj] = inj_w
        if fit_rf:
            vw[-1] = rf_w
        # columns of correctors that cannot act on the corrected planes would make the SVD singular
        active = np.linalg.norm(resp[obs_mask], axis=0) > 0
        if np.any(var_mask & ~active):
            var_mask &= active
        solver = SvdCorrector(resp, obs_weights=ow, var_weights=vw, obs_mask=obs_mask, var_mask=var_mask)
        return cls(orm=orm, response=resp, solver=solver, fit_rf=fit_rf, rf_weight=rf_w, warnings=notes,
                   n_injection=n_inj, injection_weights=inj_w)

    @property
    def nvar(self) -> int:
        return self.response.shape[1]

    def solve_step(self, deviation: npt.ArrayLike, *, n_sv: int | None = None, tikhonov: float | None = None,
                   gain: float = 1.0) -> CorrectionStep:
        """The step of every variable (correctors [A], injection knobs, RF [Hz]) that cancels ``gain`` x
        ``deviation`` (readings - target, 2n)."""
        dv = gain * self.solver.correct(deviation, n_sv, tikhonov)
        m = self.orm.ncor
        dinj = dv[m:m + self.n_injection] if self.n_injection else np.zeros(len(INJECTION_KNOBS))
        return CorrectionStep(dv[:m], np.asarray(dinj, dtype=float), float(dv[-1]) if self.fit_rf else 0.0)

    def step(self, deviation: npt.ArrayLike, *, n_sv: int | None = None, tikhonov: float | None = None,
             gain: float = 1.0) -> tuple[FloatArray, float]:
        """Corrector steps [A] (m,) and RF step [Hz] that cancel ``gain`` x ``deviation`` (readings - target, 2n).
        A system with injection knobs steps them too: use :meth:`solve_step`, which returns their step as well."""
        if self.n_injection:
            raise ValueError("this system steers with the injection knobs too: use solve_step(), which returns "
                             "their step (dinj) with the correctors' and the RF's")
        st = self.solve_step(deviation, n_sv=n_sv, tikhonov=tikhonov, gain=gain)
        return st.dk, st.drf

    def predicted(self, deviation: npt.ArrayLike, dk: FloatArray, drf: float = 0.0,
                  dinj: npt.ArrayLike | None = None) -> FloatArray:
        """Readings after applying ``dk`` [A] (and ``drf`` [Hz], ``dinj`` to the injection knobs) in the linear
        model."""
        v = np.asarray(dk, dtype=float)
        if self.n_injection:
            v = np.append(v, np.zeros(self.n_injection) if dinj is None else np.asarray(dinj, dtype=float))
        if self.fit_rf:
            v = np.append(v, drf)
        return np.asarray(deviation, dtype=float) + self.response @ v


@dataclass
class StepLimits:
    """What :func:`limit_step` did: the scale applied for ``max_step``, the correctors clipped at a limit."""

    scale: float = 1.0
    clipped: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def limit_step(step: npt.ArrayLike, current: npt.ArrayLike, low: npt.ArrayLike, high: npt.ArrayLike,
               max_step: float | None = None, names: Sequence[str] | None = None,
               units: str = "A") -> tuple[FloatArray, StepLimits]:
    """Make a corrector step safe.

    1. If any ``|step|`` exceeds ``max_step``, the whole step is scaled down (its direction is kept).
    2. Each new setpoint ``current + step`` is clipped into ``[low, high]``.

    Returns the safe step and a :class:`StepLimits` report (messages name the correctors).
    """
    s = np.asarray(step, dtype=float).copy()
    cur = np.asarray(current, dtype=float)
    lo = np.broadcast_to(np.asarray(low, dtype=float), s.shape)
    hi = np.broadcast_to(np.asarray(high, dtype=float), s.shape)
    rep = StepLimits()
    names = list(names) if names is not None else [f"#{i}" for i in range(len(s))]
    if max_step is not None:
        if max_step <= 0:
            raise ValueError(f"max_step must be > 0, got {max_step}")
        big = float(np.max(np.abs(s))) if s.size else 0.0
        if big > max_step:
            rep.scale = max_step / big
            s *= rep.scale
            rep.messages.append(f"step scaled by {rep.scale:.3g} so no corrector moves more than {max_step:g} "
                                f"{units} (largest requested {big:.3g} {units} on {names[int(np.argmax(np.abs(s)))]})")
    new = cur + s
    clipped = np.nonzero((new < lo) | (new > hi))[0]
    if clipped.size:
        new = np.clip(new, lo, hi)
        s = new - cur
        rep.clipped = clipped.tolist()
        shown = ", ".join(names[i] for i in clipped[:8]) + (" ..." if clipped.size > 8 else "")
        rep.messages.append(f"{clipped.size} corrector(s) clipped at their limits: {shown}")
    return s, rep


def orbit_rms(x: npt.ArrayLike, y: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> tuple[float, float]:
    """(rms x, rms y) [m] of the finite readings (optionally only where ``mask``)."""
    return rms(x, mask), rms(y, mask)


# ------------------------------------------------------------------------------------------------------------
# steering that never makes things worse: a singular-value cut above the noise, a judge of every step
@dataclass
class SvCut:
    """The default singular-value cut of :func:`noise_sv_cut`.

    Attributes:
        n_sv: number of leading singular values kept (>= 1).
        singular_values: all weighted singular values.
        matrix_floor: singular values below this are dominated by the response's own error (dropped).
        signal: per mode, |projection of the deviation| (``None`` without a deviation).
        noise: per mode, the rms projection of the BPM noise.
        dropped: one line per reason, for the run's messages.
    """

    n_sv: int
    singular_values: FloatArray
    matrix_floor: float
    signal: FloatArray | None
    noise: FloatArray
    dropped: list[str] = field(default_factory=list)


def orm_element_noise(bpm_noise: float, delta: npt.ArrayLike, n_avg: int = 1, bipolar: bool = True) -> FloatArray:
    """rms error of each ORM column's elements [m per unit of ``delta``] from the BPM noise of its measurement.

    A bipolar column ``(x(+d) - x(-d)) / 2d`` has ``sigma / (sqrt(2 n_avg) d)``; unipolar ``(x(d) - x0) / d`` has
    ``sqrt(2) sigma / (sqrt(n_avg) d)``."""
    d = np.abs(np.asarray(delta, dtype=float))
    if np.any(d <= 0):
        raise ValueError("delta must be > 0 for every column")
    s = float(bpm_noise) / math.sqrt(max(int(n_avg), 1))
    return s / (math.sqrt(2.0) * d) if bipolar else math.sqrt(2.0) * s / d


def noise_sv_cut(solver: SvdCorrector, deviation: npt.ArrayLike | None = None, *, bpm_noise: float | npt.ArrayLike,
                 n_avg: int = 1, response_noise: float | npt.ArrayLike | None = None, rel_error: float = 1e-3,
                 kappa: float = 3.0) -> SvCut:
    """The default number of singular values: drop the modes the noise owns.

    Two kinds of modes are dropped (the cut keeps a prefix of the singular values, at least one):

    1. **The response's own spread**: singular values below ``matrix_floor`` = the larger of ``rel_error`` x the
       largest one (model or calibration error) and the norm of the response's element noise
       (``response_noise``, e.g. :func:`orm_element_noise`; its spectral norm is about
       ``noise x (sqrt(nobs) + sqrt(nvar))`` in the weighted space): their singular vectors are noise.
    2. **BPM noise**: with a ``deviation`` (readings - target), trailing modes whose projection is below ``kappa``
       times the projection of the BPM noise (``bpm_noise`` [m] per reading, averaged ``n_avg`` times): correcting
       them would only move correctors by ``noise / s`` (the large steps of noise-dominated modes).

    Args:
        solver: the :class:`SvdCorrector` (weights and masks as the correction uses them).
        deviation: (nobs,) readings minus target [m], or ``None`` (only the matrix floor).
        bpm_noise: rms noise of one reading [m] (scalar or per observable).
        n_avg: readings averaged per orbit.
        response_noise: rms error of the response elements (scalar, per column (nvar,), or (nobs, nvar)).
        rel_error: relative error of the response (model mismatch) when nothing better is known.
        kappa: signal-to-noise ratio a mode needs to be corrected.

    Returns:
        :class:`SvCut` (``n_sv`` for :meth:`SvdCorrector.correct` / :meth:`CorrectionSystem.step`).
    """
    if solver.singular_values is None:
        solver.solve()
    s = np.asarray(solver.singular_values, dtype=float)
    om, vm = solver.obs_mask, solver.var_mask
    nobs, nvar = int(om.sum()), int(vm.sum())
    sig = np.broadcast_to(np.asarray(bpm_noise, dtype=float), (solver.shape[0],))[om] / math.sqrt(max(n_avg, 1))
    uh = solver._uh  # (k, nobs_used): projections on the weighted left singular vectors, in observable units
    noise = np.sqrt((uh * uh) @ (sig * sig))
    floor = float(rel_error) * float(s[0])
    notes: list[str] = []
    if response_noise is not None:
        rn = np.asarray(response_noise, dtype=float)
        full = np.broadcast_to(rn if rn.ndim != 1 else rn.reshape(1, -1), solver.shape)
        w = (solver.varweights / solver.obsweights.reshape(-1, 1))[np.ix_(om, vm)]
        e = full[np.ix_(om, vm)] * w
        rms_e = float(np.sqrt(np.mean(e * e)))
        floor = max(floor, rms_e * (math.sqrt(nobs) + math.sqrt(nvar)))
    eligible = int(np.sum(s >= floor))
    if eligible < len(s):
        notes.append(f"{len(s) - eligible} singular value(s) below the response's own error ({floor:.3g}) dropped")
    eligible = max(eligible, 1)
    signal = None
    n_sv = eligible
    if deviation is not None:
        d = np.asarray(deviation, dtype=float)[om]
        d = np.where(np.isfinite(d), d, 0.0)
        signal = np.abs(uh @ d)
        strong = np.nonzero(signal[:eligible] >= kappa * noise[:eligible])[0]
        n_sv = int(strong[-1]) + 1 if strong.size else 1
        if n_sv < eligible:
            notes.append(f"{eligible - n_sv} trailing mode(s) at the BPM-noise level (< {kappa:g} sigma) dropped")
    return SvCut(n_sv=n_sv, singular_values=s.copy(), matrix_floor=floor, signal=signal, noise=noise, dropped=notes)


def correction_floor(solver: SvdCorrector, deviation: npt.ArrayLike, n_sv: int, *,
                     bpm_noise: float = 0.0, n_avg: int = 1) -> float:
    """rms [m] of ``deviation`` (nobs,) that a perfect step with ``n_sv`` singular values leaves: the part outside
    the kept modes (over the used observables) and the BPM noise. What :func:`judge_step` calls the floor."""
    if solver.singular_values is None:
        solver.solve()
    om = solver.obs_mask
    d = np.asarray(deviation, dtype=float)[om]
    d = np.where(np.isfinite(d), d, 0.0)
    w = 1.0 / solver.obsweights[om]  # importance: the SVD lives in the weighted space
    u = (solver._uh[:int(n_sv)] / w).T  # the solver's left singular vectors (its _uh is U^T scaled by w)
    resid = (d * w - u @ (u.T @ (d * w))) / w
    noise = float(bpm_noise) / math.sqrt(max(int(n_avg), 1))
    return float(math.sqrt(float(np.mean(resid * resid)) + noise * noise))


@dataclass
class StepVerdict:
    """What to do after a correction step (:func:`judge_step`).

    Attributes:
        undo: the step made the rms worse (beyond the noise): put the correctors back.
        converged: the rms reached its floor (no further step can do better with these settings).
        stalled: the step improved by less than ``min_improvement``: stop iterating (converged or not).
        message: one line for the run (``"iteration 2: rms 191 -> 472 um: worse, step undone"``).
    """

    undo: bool
    converged: bool
    stalled: bool
    message: str


def judge_step(rms_before: float, rms_after: float, floor: float, *, noise: float = 0.0,
               min_improvement: float = 0.02, rtol: float = 0.2) -> StepVerdict:
    """Judge one correction step from the rms before and after it [m].

    - **undo** when ``rms_after > rms_before + 2 noise`` (worse beyond what the BPM noise explains);
    - **converged** only when ``rms_after <= floor x (1 + rtol) + 2 noise``: the floor is what a perfect step can
      reach (:func:`correction_floor`; at least the BPM noise), not merely "it stopped improving";
    - **stalled** when the step gained less than ``min_improvement`` of ``rms_before`` (or was undone): iterating
      further does not help, whether or not the floor was reached.

    ``noise`` is the rms noise of the rms itself (about ``bpm_noise / sqrt(n_avg)``)."""
    vals = (rms_before, rms_after, floor, noise)
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ValueError(f"rms values must be finite and >= 0, got before={rms_before}, after={rms_after}, "
                         f"floor={floor}, noise={noise}")
    worse = rms_after > rms_before + 2.0 * noise
    converged = (not worse) and rms_after <= floor * (1.0 + rtol) + 2.0 * noise
    gained = rms_before - rms_after
    stalled = worse or gained < min_improvement * rms_before
    um = 1e6
    if worse:
        msg = f"rms {rms_before * um:.3g} -> {rms_after * um:.3g} um: worse, step undone"
    elif converged:
        msg = f"rms {rms_before * um:.3g} -> {rms_after * um:.3g} um: at its floor ({floor * um:.3g} um), converged"
    elif stalled:
        msg = (f"rms {rms_before * um:.3g} -> {rms_after * um:.3g} um: stalled above its floor "
               f"({floor * um:.3g} um), not converged")
    else:
        msg = f"rms {rms_before * um:.3g} -> {rms_after * um:.3g} um (floor {floor * um:.3g} um)"
    return StepVerdict(undo=worse, converged=converged, stalled=stalled, message=msg)


def n_sv_within_limits(system: CorrectionSystem, deviation: npt.ArrayLike, n_sv: int, current: npt.ArrayLike,
                       low: npt.ArrayLike, high: npt.ArrayLike, *, gain: float = 1.0,
                       max_step: float | None = None, injection: tuple[npt.ArrayLike, npt.ArrayLike,
                                                                        npt.ArrayLike] | None = None
                       ) -> tuple[int, str]:
    """The largest number of singular values ``<= n_sv`` whose step needs no clipping.

    A step clipped at the corrector limits is no longer the least-squares step: its direction changes and it can
    make the orbit worse (a transfer line steered with too few, too weak trims). Fewer singular values give smaller
    steps in the same least-squares sense. ``current``, ``low``, ``high``: setpoints and limits of the system's
    correctors (its column order, hardware units); ``injection``: ``(trims, low, high)`` (4,) of its injection
    knobs, if it has them and they have limits; ``max_step`` as in :func:`limit_step` (scaling, not clipping, so it
    is not counted; the injection step scales with the correctors'). Returns ``(n, message)``; ``n = 1`` if even
    one mode needs clipping (then :func:`limit_step` clips it and :func:`judge_step` judges the result)."""
    cur = np.asarray(current, dtype=float)
    lo = np.broadcast_to(np.asarray(low, dtype=float), cur.shape)
    hi = np.broadcast_to(np.asarray(high, dtype=float), cur.shape)
    for n in range(int(n_sv), 0, -1):
        st = system.solve_step(deviation, n_sv=n, gain=gain)
        dk, dinj = st.dk, st.dinj
        if max_step is not None and dk.size and np.max(np.abs(dk)) > max_step:
            dinj = dinj * (max_step / np.max(np.abs(dk)))
            dk = dk * (max_step / np.max(np.abs(dk)))
        new = cur + dk
        ok = bool(np.all((new >= lo) & (new <= hi)))
        if ok and injection is not None and system.n_injection:
            t, tlo, thi = (np.asarray(a, dtype=float) for a in injection)
            ok = bool(np.all((t + dinj >= tlo) & (t + dinj <= thi)))
        if ok:
            msg = "" if n == n_sv else (f"{n_sv - n} singular value(s) dropped so that no corrector reaches its "
                                        f"limit ({n} kept)")
            return n, msg
    return 1, "even one singular value needs a corrector beyond its limit: the step is clipped"
