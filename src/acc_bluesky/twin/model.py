"""The Twin: one pyAT lattice with errors, setpoints in hardware units in, observables out.

- Setpoints are hardware values (A, Hz, V); the profile's calibration (and the twin's hidden calibration errors)
  turn them into element fields, written in place so pyAT's converted lattice stays valid.
- Observables are computed lazily once per change of state and cached: N sets then a read cost one solve.
- The closed orbit is 4D with the RF frequency deviation (fixed path length, as ``find_orbit4(df=...)``), solved
  by a chord-Newton iteration that keeps pyAT's converted lattice and starts from the last orbit; 6D where the
  profile asks. Beam loss (no closed orbit, orbit beyond the aperture, anomaly) gives NaN readings and 0 current.
- Thread-safe (one re-entrant lock) and deterministic for a seed.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._compat.scipy import single_thread_blas
from ..profile import Family, LimitError, Profile, load_profile
from . import _engine
from .anomalies import Anomalies
from .beam import Beam  # tbt: injected/stored beam, BPM acquisition modes
from .errors import ErrorModel, apply_alignment, line_entrance, line_trajectory
from .errors import explain_loss, named_stream  # lattice: named noise stream, no-closed-orbit diagnosis

__all__ = ["Twin", "Observables", "BeamLost", "UnknownDevice"]

_ALIASES = {"K": ("PolynomB", 1), "H": ("PolynomB", 2)}


class BeamLost(RuntimeError):
    """Raised only by strict accessors; readings give NaN instead."""


class UnknownDevice(KeyError):
    """An unknown family, device or LUME variable; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


@dataclass
class Observables:
    """Truth of one state of the twin (cached)."""

    orbit0: np.ndarray  # (6,) at the lattice entrance
    x: np.ndarray  # (nbpm,) true beam position [m]
    y: np.ndarray
    lost: bool
    reason: str = ""


class _FamilyState:
    """Setpoints, readbacks and element writes of one family."""

    def __init__(self, fam: Family, ring, energy: float, field_err: np.ndarray):
        self.fam = fam
        self.spec = fam.spec
        self.refpts = fam.refpts
        attr, index = fam.spec.field_parts
        self.attr, self.index = _ALIASES.get(attr, (attr, index))
        self.energy = energy
        self.cal = fam.spec.calibration
        self.err = field_err  # relative field / calibration error per element
        self.arrays = []
        for r in self.refpts.tolist():
            e = ring[r]
            if self.attr == "KickAngle" and not hasattr(e, "KickAngle"):
                e.KickAngle = np.zeros(2)
            if self.attr in ("PolynomB", "PolynomA"):
                self._ensure_order(e, self.index)
            arr = getattr(e, self.attr, None)
            if isinstance(arr, np.ndarray):
                if arr.dtype != np.float64 or not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(arr, dtype=np.float64)
                    setattr(e, self.attr, arr)
                self.arrays.append(arr)
            else:
                self.arrays.append(None)  # scalar attribute: written with setattr (forces a cold solve)
        self.elements = [ring[r] for r in self.refpts.tolist()]
        design = np.array([self._read(i) for i in range(len(self.refpts))])
        self.design_physics = design
        self.design_hw = np.asarray(self.cal.physics2hw(design, energy, energy), dtype=float).reshape(-1)
        self.setpoint = self.design_hw.copy()
        self.applied = self.design_hw.copy()  # what the power supply delivers (readback)
        self.ramp_from = self.design_hw.copy()
        self.ramp_t0 = np.zeros(len(self.refpts))
        self.scalar = any(a is None for a in self.arrays)

    @staticmethod
    def _ensure_order(e, index: int) -> None:
        for name in ("PolynomA", "PolynomB"):
            p = getattr(e, name, None)
            if p is None:
                setattr(e, name, np.zeros(index + 1))
            elif len(p) <= index:
                setattr(e, name, np.pad(np.asarray(p, dtype=float), (0, index + 1 - len(p))))
        if getattr(e, "MaxOrder", index) < index:
            e.MaxOrder = index

    def _read(self, i: int) -> float:
        arr = self.arrays[i]
        if arr is None:
            return float(getattr(self.elements[i], self.attr))
        return float(arr[self.index or 0])

    def write(self, i: int, hw: float, factor: float = 1.0) -> None:
        phys = self.cal.hw2physics(hw, self.energy, self.energy) * (1.0 + self.err[i]) * factor
        arr = self.arrays[i]
        if arr is None:
            setattr(self.elements[i], self.attr, phys)
        else:
            arr[self.index or 0] = phys


class Twin:
    """Digital twin of one accelerator, backed by pyAT.

    Args:
        profile: a :class:`~acc_bluesky.profile.Profile` or a profile name/path.
        seed: error seed; ``None`` is the ideal machine without errors or noise.
        errors: an explicit :class:`ErrorModel` (overrides the seed's default errors).
        error_scale: multiplier on the profile's alignment errors (overrides ``errors.scale``).
        clock: time source [s] for ramps, lifetime and BPM acquisition (``time.monotonic``).
    """

    def __init__(self, profile: Profile | str, seed: int | None = None, *, errors: ErrorModel | None = None,
                 error_scale: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.profile = load_profile(profile)
        self.seed = seed
        self._clock = clock
        self._lock = threading.RLock()
        self._optics_version = 0  # bumped by every change of a non-corrector magnet
        self._optics_checked = -1  # the optics version whose linear stability was last checked
        self._orbit_checked: np.ndarray | None = None  # the BPM orbit (x, y) where it was checked
        self._halftraces_checked: np.ndarray | None = None  # cos(2 pi nu) of the one-turn map's eigen-modes there
        self._feed_down = 0.0  # their largest change per metre of orbit between two verdicts of one optics
        self._unstable: str | None = None  # why the one-turn map is unstable, at that version and orbit
        self.design = self.profile.load_lattice()
        self.ring = self.profile.load_lattice()
        self.is_ring = self.profile.kind == "ring"
        self.is_6d = bool(getattr(self.ring, "is_6d", False))
        self.energy = self.profile.energy
        if errors is None:
            errors = ErrorModel.ideal(self.profile) if seed is None else ErrorModel.generate(
                self.profile, seed, error_scale)
        self.errors = errors
        self._noise_rng = named_stream(0 if seed is None else seed, "noise")  # stable name: same in every process
        self.noise_on = seed is not None
        self.bpm_refpts = self.profile.bpm_refpts
        self.nbpm = len(self.bpm_refpts)
        self._apply_alignment()
        self._families: dict[str, _FamilyState] = {}
        for name, fam in self.profile.families.items():
            ferr = np.zeros(len(fam))
            if fam.spec.type in ("hcor", "vcor"):
                ferr = self.errors.corrector_calibration.get(name, ferr)
            else:
                ferr = np.array([self.errors.field.get(int(r), 0.0) for r in fam.refpts.tolist()])
            self._families[name] = _FamilyState(fam, self.ring, self.energy, ferr)
        self._ramped_families = [n for n, st in self._families.items() if st.spec.ramp_rate]
        self._apply_field_errors_outside_families()
        for st in self._families.values():
            for i in range(len(st.refpts)):
                st.write(i, st.applied[i])
        # element lengths never change in the twin: the revolution path is computed once, not at every solve
        self._path_per_period = float(self.ring.circumference / self.ring.periodicity)
        self._f0 = self._design_frequency()
        self.rf_frequency_setpoint = self._f0
        self.rf_voltage_setpoint = self._design_voltage()
        self.anomalies = Anomalies(self)
        self._version = 0
        self._listeners: list[Callable[[], None]] = []  # called at every change of state (subscribe())
        self._cache: dict[str, tuple[int, Any]] = {}
        self._engine_gen = -1
        self._guess = np.zeros(6)
        self._a_inv: np.ndarray | None = None
        self._t_inject = self._clock()
        self._bpm_last: tuple[float, np.ndarray, np.ndarray] | None = None
        self.stats = {"solves": 0, "cold": 0, "chord_passes": 0, "stability_maps": 0}
        # --- tbt: the injected/stored beam and the BPM acquisition modes (twin/beam.py) ---
        self.beam = Beam(self)
        # --- end tbt ---

    # ------------------------------------------------------------------------------------------------
    # construction helpers
    def _apply_alignment(self) -> None:
        apply_alignment(self.ring, self.errors)

    def _apply_field_errors_outside_families(self) -> None:
        driven = {(int(r), st.attr, st.index) for st in self._families.values() for r in st.refpts.tolist()}
        for r, err in self.errors.field.items():
            e = self.ring[r]
            main = {"Quadrupole": 1, "Sextupole": 2, "Octupole": 3}.get(type(e).__name__)
            if main is not None and ("PolynomB", main) not in {(a, i) for (rr, a, i) in driven if rr == r}:
                e.PolynomB[main] *= 1.0 + err
            elif type(e).__name__ == "Dipole" and e.Length > 0:
                pb = np.asarray(e.PolynomB, dtype=float).copy()
                pb[0] += err * e.BendingAngle / e.Length
                e.PolynomB = pb

    def _design_frequency(self) -> float:
        """The cavity's frequency; without a cavity ``h x`` the revolution frequency, ``h`` from the profile's
        ``rf.harmonic_number``, else the harmonic nearest 500 MHz (:attr:`Profile.rf_nominal_frequency`)."""
        return self.profile.rf_nominal_frequency if self.is_ring else 0.0

    def _design_voltage(self) -> float:
        try:
            return float(self.design.get_rf_voltage())
        except Exception:  # noqa: BLE001
            return 0.0

    # ------------------------------------------------------------------------------------------------
    # state
    @property
    def version(self) -> int:
        """Incremented at every change of state."""
        return self._version

    def _touch(self) -> None:
        self._version += 1
        for fn in self._listeners:
            fn()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (no argument, in the thread that changed the state, with the twin's lock held) at
        every change of state; returns the function that unsubscribes. Callbacks must only schedule work (read
        the twin later, outside the callback): the sim backend uses it to update monitored signals."""
        with self._lock:
            self._listeners = [*self._listeners, callback]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [f for f in self._listeners if f is not callback]

        return unsubscribe

    @property
    def family_names(self) -> list[str]:
        return list(self._families)

    def family(self, name: str) -> _FamilyState:
        try:
            return self._families[name]
        except KeyError:
            raise UnknownDevice(f"unknown family {name!r}; valid families: {sorted(self._families)}") from None

    def _indices(self, st: _FamilyState, index) -> np.ndarray:
        n = len(st.refpts)
        if index is None:
            return np.arange(n)
        idx = np.atleast_1d(np.asarray(index, dtype=int))
        if np.any((idx < 0) | (idx >= n)):
            raise UnknownDevice(f"{st.fam.name}: index {index} out of range 0..{n - 1}")
        return idx

    def set_setpoint(self, family: str, values, index=None) -> None:
        """Set hardware setpoint(s) of a family (all, or ``index``: int or array). Limits are checked first."""
        with self._lock:
            st = self.family(family)
            idx = self._indices(st, index)
            vals = np.broadcast_to(np.asarray(values, dtype=float), idx.shape).copy()
            names = st.fam.names
            if len(idx) == 1:
                st.spec.limits.check(names[int(idx[0])], vals[0], st.spec.units)
            else:
                st.spec.limits.check(family, vals, st.spec.units, names=[names[i] for i in idx.tolist()])
            now = self._clock()
            ramp = st.spec.ramp_rate
            for i, v in zip(idx.tolist(), vals.tolist()):
                if self.anomalies.is_stuck(family, i):
                    st.setpoint[i] = v
                    continue
                if ramp:
                    st.ramp_from[i] = self._ramped(st, i, now)
                    st.ramp_t0[i] = now
                    st.setpoint[i] = v
                else:
                    st.setpoint[i] = v
                    st.applied[i] = v
                    self._write(st, i)
            self._touch()

    def _ramped(self, st: _FamilyState, i: int, now: float) -> float:
        rate = st.spec.ramp_rate
        if not rate:
            return float(st.setpoint[i])
        d = st.setpoint[i] - st.ramp_from[i]
        step = rate * max(0.0, now - st.ramp_t0[i])
        return float(st.setpoint[i]) if abs(d) <= step else float(st.ramp_from[i] + math.copysign(step, d))

    def _update_ramps(self) -> None:
        if not self._ramped_families:
            return
        now = self._clock()
        for name, st in self._families.items():
            if not st.spec.ramp_rate:
                continue
            for i in np.nonzero(st.applied != st.setpoint)[0].tolist():
                if self.anomalies.is_stuck(name, i):
                    continue
                st.applied[i] = self._ramped(st, i, now)
                self._write(st, i)
                self._touch()

    def _write(self, st: _FamilyState, i: int) -> None:
        name = st.fam.name
        factor = 0.0 if (self.anomalies.is_dead(name, i) or self.anomalies.is_tripped(name)) else 1.0
        st.write(i, st.applied[i], factor)
        if st.spec.type not in ("hcor", "vcor"):
            self._optics_version += 1
        if st.arrays[i] is None:
            self._engine_gen = -1  # scalar attribute: the converted lattice is stale

    def _rewrite_family(self, name: str) -> None:
        st = self.family(name)
        for i in range(len(st.refpts)):
            self._write(st, i)
        self._touch()

    def get_setpoint(self, family: str, index=None) -> np.ndarray | float:
        """Hardware setpoint(s)."""
        with self._lock:
            st = self.family(family)
            out = st.setpoint[self._indices(st, index)].copy()
            return float(out[0]) if isinstance(index, (int, np.integer)) else out

    def get_readback(self, family: str, index=None) -> np.ndarray | float:
        """Hardware readback(s): what the power supply delivers (lags with ramps, 0 when dead or tripped)."""
        with self._lock:
            self._update_ramps()
            st = self.family(family)
            idx = self._indices(st, index)
            out = st.applied[idx].copy()
            for k, i in enumerate(idx.tolist()):
                if self.anomalies.is_dead(family, i) or self.anomalies.is_tripped(family):
                    out[k] = 0.0
            return float(out[0]) if isinstance(index, (int, np.integer)) else out

    def get_strength(self, family: str, index=None, truth: bool = False) -> np.ndarray | float:
        """Physics strength(s) from the nominal calibration; ``truth=True`` reads the lattice field itself."""
        with self._lock:
            st = self.family(family)
            idx = self._indices(st, index)
            if truth:
                self._update_ramps()
                out = np.array([st._read(i) for i in idx.tolist()])
            else:
                out = np.asarray(st.cal.hw2physics(self.get_readback(family)[idx], self.energy, self.energy))
            out = np.atleast_1d(out)
            return float(out[0]) if isinstance(index, (int, np.integer)) else out

    # RF ---------------------------------------------------------------------------------------------
    @property
    def rf_frequency(self) -> float:
        return self.rf_frequency_setpoint

    def set_rf_frequency(self, f: float) -> None:
        """RF frequency setpoint [Hz] (limits checked)."""
        with self._lock:
            self._check_rf_frequency("RF frequency", f)
            self.rf_frequency_setpoint = float(f)
            if self.is_6d:
                self.ring.set_rf_frequency(self.rf_frequency_setpoint + self.errors.rf_frequency)
                self._engine_gen = -1
            self._touch()

    def _check_rf_frequency(self, name: str, f: float) -> None:
        """Refuse an RF frequency outside the profile's ``rf.frequency_limits`` or, in a ring, not > 0."""
        self.profile.spec.rf.frequency_limits.check(name, f, "Hz")
        if self.is_ring and not float(f) > 0:
            raise LimitError(f"{name}: {f} Hz refused: an RF frequency must be > 0 Hz (nominal {self._f0:.9g} Hz); "
                             "set rf.frequency_limits in the profile to bound it")

    def set_rf_voltage(self, v: float) -> None:
        """RF voltage setpoint [V] (limits checked)."""
        with self._lock:
            self.profile.spec.rf.voltage_limits.check("RF voltage", v, "V")
            self.rf_voltage_setpoint = float(v)
            if self.is_6d:
                self.ring.set_rf_voltage(self.rf_voltage_setpoint)
                self._engine_gen = -1
            self._touch()

    @property
    def rf_nominal_frequency(self) -> float:
        return self._f0

    @property
    def df(self) -> float:
        """True RF frequency deviation from the design [Hz]."""
        return self.rf_frequency_setpoint + self.errors.rf_frequency - self._f0

    # ------------------------------------------------------------------------------------------------
    # observables (truth)
    def _cached(self, key: str, fn):
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self._version:
            return hit[1]
        val = fn()
        self._cache[key] = (self._version, val)
        return val

    def observables(self) -> Observables:
        """The true closed orbit (or trajectory for a line) at the BPMs, computed once per state."""
        with self._lock:
            self._update_ramps()
            return self._cached("obs", self._solve_explained)

    # -- no-closed-orbit diagnosis (lattice engineer): a lost beam says why and what to do ------------------
    def _solve_explained(self) -> Observables:
        obs = self._solve()
        if obs.lost:  # e.g. "lower error_scale, or thread the first turns" (twin.errors.explain_loss)
            obs.reason = explain_loss(self, obs.reason)
        return obs
    # -- end of the diagnosis ------------------------------------------------------------------------------

    def _solve(self) -> Observables:
        self.stats["solves"] += 1
        if self.anomalies.beam_lost:
            return self._lost("beam lost (anomaly); call twin.inject() to refill")
        with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if not self.is_ring:
                    return self._solve_line()
                if self.is_6d:
                    return self._solve_6d()
                return self._solve_4d()
            except Exception as err:  # noqa: BLE001 - pyAT raises AtError, LinAlgError, ...
                return self._lost(f"no closed orbit: {err}")

    def _lost(self, reason: str) -> Observables:
        nan = np.full(self.nbpm, np.nan)
        self._a_inv = None
        self._guess = np.zeros(6)
        return Observables(np.full(6, np.nan), nan, nan.copy(), True, reason)

    def _check_aperture(self, z, pos) -> Observables:
        x, y = pos[:, 0], pos[:, 2]
        spec = self.profile.spec.beam
        if not (np.all(np.isfinite(pos[:, :4]))):
            return self._lost("particle lost in tracking")
        if np.any(np.abs(x) > spec.aperture_x) or np.any(np.abs(y) > spec.aperture_y):
            return self._lost(
                f"orbit beyond the aperture (max |x| {np.max(np.abs(x)) * 1e3:.2f} mm, "
                f"|y| {np.max(np.abs(y)) * 1e3:.2f} mm)")
        return Observables(z.copy(), x.copy(), y.copy(), False)

    def _dct(self) -> float:
        frf = self._f0
        df = self.df
        return -self._path_per_period * df / (frf + df) if frf else 0.0

    def _solve_4d(self) -> Observables:
        import at

        dct = self._dct()
        keep = self._engine_gen == _engine.generation() and self._engine_gen >= 0
        if keep and self._a_inv is not None:
            res = _engine.closed_orbit_dct(self.ring, self.bpm_refpts, dct, self._guess, self._a_inv, keep=True)
            if res is not None:
                z, pos, it, last = res
                self.stats["chord_passes"] += it
                self._engine_gen = _engine.generation()
                a = None
                if it > 5:
                    a = _engine.orbit_jacobian(self.ring, z, keep=True)
                    self._a_inv = np.linalg.inv(a)
                self._guess = z
                return self._check_stability(pos, a=a, last=last) or self._check_aperture(z, pos)
        # cold: pyAT's own solver, then the Jacobian for the next time
        self.stats["cold"] += 1
        guess = self._guess if np.all(np.isfinite(self._guess)) else np.zeros(6)
        z, pos = at.find_orbit4(self.ring, refpts=self.bpm_refpts, dct=dct, guess=guess)
        if not np.all(np.isfinite(z)):
            return self._lost("no closed orbit (tracking lost the particle)")
        self._engine_gen = _engine.generation()
        a = _engine.orbit_jacobian(self.ring, z, keep=True)
        self._a_inv = np.linalg.inv(a)
        self._engine_gen = _engine.generation()
        self._guess = z
        return self._check_stability(pos, a=a) or self._check_aperture(z, pos)

    #: the stability verdict is renewed when the closed orbit at the BPMs has moved by more than this [m] since it
    #: was made (sextupole feed-down: corrector moves change the optics too) ...
    STABILITY_ORBIT_TOLERANCE = 0.2e-3
    #: ... or, once two verdicts of the present optics have measured how fast the half-traces cos(2 pi nu) of its
    #: eigen-modes move with the orbit, by more than a quarter of the orbit change that would bring a mode onto a
    #: resonance at the fastest rate seen (an integer or half-integer tune, or the two modes onto each other: sum
    #: and difference resonances), up to this [m]
    STABILITY_ORBIT_TOLERANCE_MAX = 2e-3

    def _check_stability(self, pos: np.ndarray, a: np.ndarray | None = None,
                         last: tuple[np.ndarray, np.ndarray] | None = None) -> Observables | None:
        """Beam lost (an Observables) if the transverse one-turn map at the closed orbit is unstable, else None.

        A closed orbit can exist on a lattice that no beam survives (a tune pushed onto an integer or half-integer
        resonance by a quadrupole, or by the feed-down of sextupoles the orbit passes off-centre). The verdict is
        renewed whenever the one-turn Jacobian is at hand anyway (a cold solve, a refreshed chord), at every change
        of the optics (any non-corrector magnet), and when the orbit at the BPMs (``pos``) has moved since it was
        made by more than :meth:`stability_tolerance` (corrector moves); otherwise it is kept. ``pos``: the orbit at
        the BPMs (nbpm, 6); ``a``: the 5x5 Jacobian at hand, if any; else ``last``: the chord solver's last particle
        and its one-turn end, so the map costs four particles."""
        here = np.concatenate([pos[:, 0], pos[:, 2]])
        same_optics = self._optics_checked == self._optics_version
        comparable = (self._orbit_checked is not None and here.shape == self._orbit_checked.shape
                      and bool(np.all(np.isfinite(here))))
        moved = float(np.max(np.abs(here - self._orbit_checked))) if comparable else math.inf
        if a is None and same_optics and moved <= self.stability_tolerance():
            return self._lost(self._unstable) if self._unstable else None
        if a is not None:
            m44 = a[:4, :4] + np.eye(4)  # orbit_jacobian gives J - I' in (x, px, y, py, dp)
        else:
            m44 = _engine.transverse_map(self.ring, last[0], last[1], keep=True)
        self.stats["stability_maps"] += 1
        eig = np.linalg.eigvals(m44)
        rho = float(np.max(np.abs(eig)))
        self._unstable = (None if rho < 1.0 + 1e-3 else  # finite-difference map: |eig| = 1 to ~1e-5
                          f"unstable optics: one-turn map eigenvalue of modulus {rho:.4g} > 1 (a tune on a "
                          "resonance?); restore the quadrupoles")
        # one half-trace cos(2 pi nu) per eigen-mode: linear in a small change of the map, unlike the tunes (at the
        # edge of a stop band the tune moves as the square root of the perturbation)
        halftraces = np.sort(np.cos(np.angle(eig)))[::2]  # (the conjugates of a pair share it)
        if not same_optics:
            self._feed_down = 0.0
        elif (a is None and comparable and moved > 0.0 and self._halftraces_checked is not None
              and self._unstable is None):  # the rate is learnt from corrector moves only (a warm chord solve)
            change = float(np.max(np.abs(halftraces - self._halftraces_checked)))
            self._feed_down = max(self._feed_down, change / moved)
        self._optics_checked = self._optics_version
        self._orbit_checked = here
        self._halftraces_checked = None if self._unstable else halftraces
        return self._lost(self._unstable) if self._unstable else None

    def stability_tolerance(self) -> float:
        """Orbit change [m] within which the last stability verdict holds: :attr:`STABILITY_ORBIT_TOLERANCE`
        until two verdicts of the present optics have measured how fast its modes' half-traces move with the orbit,
        then a quarter of the change that would bring a mode onto a resonance at that rate, within
        [:attr:`STABILITY_ORBIT_TOLERANCE`, :attr:`STABILITY_ORBIT_TOLERANCE_MAX`]."""
        base = self.STABILITY_ORBIT_TOLERANCE
        q = self._halftraces_checked
        if q is None or self._feed_down <= 0.0:
            return base
        margin = float(min(np.min(1.0 - np.abs(q)), abs(q[1] - q[0])))  # to a resonance; to the other mode
        return float(np.clip(0.25 * margin / self._feed_down, base, max(base, self.STABILITY_ORBIT_TOLERANCE_MAX)))

    def _solve_6d(self) -> Observables:
        import at

        z, pos = at.find_orbit6(self.ring, refpts=self.bpm_refpts)
        self._engine_gen = -1
        if not np.all(np.isfinite(z)):
            return self._lost("no 6D closed orbit")
        return self._check_aperture(z, pos)

    def _solve_line(self) -> Observables:
        """A line has no closed orbit: what its BPMs read in orbit mode is the mean trajectory of the beam the
        injector sends, the beam of a trajectory shot without its jitter (:meth:`Beam.injected`: the entrance orbit,
        the static injection error, the injection trims and energy), tracked once through the errored line. Lost
        where a shot is: outside the aperture at any element, or lost in tracking."""
        z = self.beam.injected()
        pos, lost = line_trajectory(self.ring, z, self.bpm_refpts, self.profile.spec.beam)
        self._engine_gen = -1
        if lost is not None:
            return self._lost(lost)
        return self._check_aperture(z, pos)

    def _line_input(self) -> np.ndarray:
        """The line's design entrance orbit (profile ``twiss_in.closed_orbit``, else on axis) (6,)."""
        return line_entrance(self.profile)

    # public truth accessors ---------------------------------------------------------------------------
    @property
    def beam_lost(self) -> bool:
        return self.observables().lost

    @property
    def loss_reason(self) -> str:
        return self.observables().reason

    def orbit(self) -> tuple[np.ndarray, np.ndarray]:
        """True beam position (x, y) [m] at every BPM (NaN when the beam is lost)."""
        o = self.observables()
        return o.x.copy(), o.y.copy()

    def _linear_data(self):
        import at

        def compute():
            obs = self.observables()
            if obs.lost:
                return None
            with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._engine_gen = -1
                try:
                    if self.is_ring:
                        kw = {"orbit": obs.orbit0} if not self.is_6d else {}
                        _, ringdata, elemdata = at.get_optics(self.ring, refpts=self.bpm_refpts, **kw)
                        return ringdata, elemdata
                    ld0 = self._twiss_in()
                    _, _, elemdata = at.get_optics(self.ring, refpts=self.bpm_refpts, twiss_in=ld0)
                    return None, elemdata
                except Exception:  # noqa: BLE001 - unstable optics = beam lost
                    return None

        with self._lock:
            self._update_ramps()
            return self._cached("optics", compute)

    def _twiss_in(self):
        tw = dict(self.profile.spec.twiss_in or {})
        tw.pop("closed_orbit", None)
        return {k: np.asarray(v, dtype=float) for k, v in tw.items()}

    def tunes(self) -> np.ndarray:
        """True fractional tunes (qx, qy) (NaN when the beam is lost or the optics unstable)."""
        d = self._linear_data()
        if d is None or d[0] is None:
            return np.full(2, np.nan)
        return np.asarray(d[0].tune[:2], dtype=float) % 1.0

    def dispersion(self) -> tuple[np.ndarray, np.ndarray]:
        """True dispersion (eta_x, eta_y) [m] at the BPMs."""
        d = self._linear_data()
        if d is None:
            nan = np.full(self.nbpm, np.nan)
            return nan, nan.copy()
        disp = d[1].dispersion
        return disp[:, 0].copy(), disp[:, 2].copy()

    def beta(self) -> tuple[np.ndarray, np.ndarray]:
        """True beta functions [m] at the BPMs."""
        d = self._linear_data()
        if d is None:
            nan = np.full(self.nbpm, np.nan)
            return nan, nan.copy()
        return d[1].beta[:, 0].copy(), d[1].beta[:, 1].copy()

    def chromaticity(self) -> np.ndarray:
        """True linear chromaticities (xi_x, xi_y) at the current RF frequency, per lattice period (as the
        tunes: a lattice of one cell with ``periodicity`` P is simulated as that cell closed on itself)."""
        import at

        def compute():
            obs = self.observables()
            if obs.lost or not self.is_ring:
                return np.full(2, np.nan)
            with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._engine_gen = -1
                period = float(getattr(self.ring, "periodicity", 1) or 1)
                try:
                    if self.is_6d:
                        return np.asarray(at.get_chrom(self.ring)[:2]) / period
                    return np.asarray(at.get_chrom(self.ring, dp=float(obs.orbit0[4]))[:2]) / period
                except Exception:  # noqa: BLE001
                    return np.full(2, np.nan)

        with self._lock:
            self._update_ramps()
            return self._cached("chrom", compute).copy()

    def momentum_compaction(self) -> float:
        """Momentum compaction factor of the design lattice."""
        import at

        def compute():
            with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._engine_gen = -1
                r = self.design if not self.is_6d else self.design.disable_6d(copy=True)
                return float(at.get_mcf(r))

        hit = self._cache.get("mcf")
        if hit is None:
            self._cache["mcf"] = (-1, compute())
        return self._cache["mcf"][1]

    def energy_deviation(self) -> float:
        """dp/p of the closed orbit (set by the RF frequency through the path length)."""
        return float(self.observables().orbit0[4])

    # ------------------------------------------------------------------------------------------------
    # what the instruments show
    def read_bpms(self) -> tuple[np.ndarray, np.ndarray]:
        """BPM readings (x, y) [m]: truth transformed by offsets, gains, rolls, plus noise; NaN if lost/dead; the
        anomalies' noisy BPMs add their noise, frozen ones repeat the reading they froze at.

        With an acquisition rate (profile ``bpm.rate`` [Hz]) the BPM system acquires at the ticks ``k / rate`` of
        the clock: every read within one period returns that period's acquisition, whatever changed since (a
        plan sees a corrector move only from the next acquisition on: what ``settle`` waits for). Without one,
        every read is a fresh acquisition (fresh noise)."""
        with self._lock:
            now = self._clock()
            rate = self.profile.spec.bpm.rate
            if rate:
                now = math.floor(now * rate)  # the acquisition this read falls in
                if self._bpm_last is not None and self._bpm_last[0] == now:
                    return self._bpm_last[1].copy(), self._bpm_last[2].copy()
            x, y = self.orbit()
            xm, ym = self.errors.bpm_transform(x, y)
            if self.noise_on and self.errors.bpm_noise > 0:
                xm = xm + self._noise_rng.normal(0.0, self.errors.bpm_noise, self.nbpm)
                ym = ym + self._noise_rng.normal(0.0, self.errors.bpm_noise, self.nbpm)
            an = self.anomalies
            for i in sorted(an.noisy_bpms):  # failing electronics: more noise, from the seeded generator
                xm[i] += self._noise_rng.normal(0.0, an.noisy_bpms[i])
                ym[i] += self._noise_rng.normal(0.0, an.noisy_bpms[i])
            for i in sorted(an.frozen_bpms):  # a stalled acquisition repeats the reading it froze at
                held = an.frozen_bpms[i]
                if held is None:
                    an.frozen_bpms[i] = (float(xm[i]), float(ym[i]))
                else:
                    xm[i], ym[i] = held
            dead = an.dead_bpms
            if dead:
                xm[sorted(dead)] = np.nan
                ym[sorted(dead)] = np.nan
            self._bpm_last = (now, xm, ym)
            return xm.copy(), ym.copy()

    def read_tunes(self) -> np.ndarray:
        """Tune monitor reading: true fractional tunes plus noise."""
        q = self.tunes()
        if self.noise_on and self.errors.tune_noise > 0 and np.all(np.isfinite(q)):
            q = q + self._noise_rng.normal(0.0, self.errors.tune_noise, 2)
        return q

    def beam_current(self) -> float:
        """Stored current [A]: exponential decay since injection, 0 when lost."""
        if self.beam_lost:
            return 0.0
        b = self.profile.spec.beam
        return float(b.current * math.exp(-(self._clock() - self._t_inject) / b.lifetime))

    def beam_lifetime(self) -> float:
        """Beam lifetime [s] (0 when lost)."""
        return 0.0 if self.beam_lost else float(self.profile.spec.beam.lifetime)

    def inject(self) -> None:
        """Refill: clears a beam-loss anomaly and restarts the decay."""
        with self._lock:
            self.anomalies.beam_lost = False
            self._t_inject = self._clock()
            self._touch()

    def trajectory(self, nturns: int = 1, injection: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """First-turn(s) trajectory as the BPMs read it: (nturns, nbpm) x and y [m]; NaN after the loss point.

        ``injection``: (6,) coordinates at the lattice entrance (default: on axis).
        """
        with self._lock, _engine.ENGINE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._update_ramps()
            z = np.zeros(6) if injection is None else np.asarray(injection, dtype=float)
            out = _engine.track(self.ring, np.asfortranarray(z.reshape(6, 1).copy()), self.bpm_refpts,
                                keep=False, nturns=nturns)
            self._engine_gen = -1
            pos = out[:, 0, :, :]  # (6, nbpm, nturns)
            x, y = pos[0].T.copy(), pos[2].T.copy()
            spec = self.profile.spec.beam
            lost = ~np.isfinite(x) | ~np.isfinite(y) | (np.abs(x) > spec.aperture_x) | (np.abs(y) > spec.aperture_y)
            flat = lost.reshape(-1)
            if np.any(flat):
                first = int(np.argmax(flat))
                x.reshape(-1)[first:] = np.nan
                y.reshape(-1)[first:] = np.nan
            xm = np.empty_like(x)
            ym = np.empty_like(y)
            for t in range(nturns):
                xm[t], ym[t] = self.errors.bpm_transform(x[t], y[t])
            if self.noise_on and self.errors.tbt_noise > 0:
                xm += self._noise_rng.normal(0.0, self.errors.tbt_noise, xm.shape)
                ym += self._noise_rng.normal(0.0, self.errors.tbt_noise, ym.shape)
            return xm, ym

    # ------------------------------------------------------------------------------------------------
    # LUME model interface: get / set / reset / supported_variables
    @property
    def supported_variables(self) -> dict[str, dict[str, Any]]:
        """LUME-style variables: name -> {type: input|output, units, limits, shape}."""
        v: dict[str, dict[str, Any]] = {}
        for name, st in self._families.items():
            lim = [st.spec.limits.low, st.spec.limits.high]
            for dev in st.fam.device_names:
                v[dev] = {"type": "input", "units": st.spec.units, "limits": lim, "shape": []}
        rf = self.profile.spec.rf
        v["RF:frequency"] = {"type": "input", "units": "Hz", "limits": [rf.frequency_limits.low,
                                                                        rf.frequency_limits.high], "shape": []}
        v["RF:voltage"] = {"type": "input", "units": "V", "limits": [rf.voltage_limits.low,
                                                                     rf.voltage_limits.high], "shape": []}
        for k, units, shape in (("orbit:x", "m", [self.nbpm]), ("orbit:y", "m", [self.nbpm]),
                                ("tune:x", "", []), ("tune:y", "", []), ("beam:current", "A", []),
                                ("beam:lifetime", "s", []), ("chromaticity:x", "", []), ("chromaticity:y", "", []),
                                ("dispersion:x", "m", [self.nbpm])):
            v[k] = {"type": "output", "units": units, "shape": shape}
        return v

    def _parse(self, name: str) -> tuple[str, int]:
        try:
            fam, i = self.profile.locate(name)
        except KeyError:
            fam, i = "", -1
        if fam in self._families:
            return fam, i
        first = next(iter(self._families.values())).fam.names[0] if self._families else "?"
        raise UnknownDevice(
            f"unknown variable {name!r}; inputs are device names like {first!r}, or 'RF:frequency', 'RF:voltage'; "
            f"outputs: {[k for k, s in self.supported_variables.items() if s['type'] == 'output']}")

    def get(self, names: str | Iterable[str]) -> dict[str, Any]:
        """Values of LUME variables by name."""
        single = isinstance(names, str)
        names = [names] if single else list(names)
        out: dict[str, Any] = {}
        with self._lock:
            for n in names:
                if n == "RF:frequency":
                    out[n] = self.rf_frequency_setpoint
                elif n == "RF:voltage":
                    out[n] = self.rf_voltage_setpoint
                elif n in ("orbit:x", "orbit:y"):
                    x, y = self.read_bpms()
                    out[n] = x if n.endswith("x") else y
                elif n in ("tune:x", "tune:y"):
                    out[n] = float(self.read_tunes()["xy".index(n[-1])])
                elif n == "beam:current":
                    out[n] = self.beam_current()
                elif n == "beam:lifetime":
                    out[n] = self.beam_lifetime()
                elif n in ("chromaticity:x", "chromaticity:y"):
                    out[n] = float(self.chromaticity()["xy".index(n[-1])])
                elif n == "dispersion:x":
                    out[n] = self.dispersion()[0]
                else:
                    fam, i = self._parse(n)
                    out[n] = float(self._families[fam].setpoint[i])
        return out

    def set(self, values: Mapping[str, float]) -> None:
        """Set LUME input variables; all are validated (names, limits) before any is applied."""
        with self._lock:
            plan = []
            for n, v in values.items():
                if n == "RF:frequency":
                    self._check_rf_frequency(n, v)
                    plan.append((self.set_rf_frequency, (v,)))
                elif n == "RF:voltage":
                    self.profile.spec.rf.voltage_limits.check(n, v, "V")
                    plan.append((self.set_rf_voltage, (v,)))
                else:
                    fam, i = self._parse(n)
                    self._families[fam].spec.limits.check(n, v, self._families[fam].spec.units)
                    plan.append((self.set_setpoint, (fam, v, i)))
            for fn, args in plan:
                fn(*args)

    def reset(self) -> None:
        """Back to the design setpoints, no anomalies, beam injected (errors stay: they are the machine)."""
        with self._lock:
            self.anomalies.clear()
            for st in self._families.values():
                st.setpoint[:] = st.design_hw
                st.applied[:] = st.design_hw
                st.ramp_from[:] = st.design_hw
                for i in range(len(st.refpts)):
                    st.write(i, st.applied[i])
            self._optics_version += 1  # the quadrupoles and sextupoles are back: a new stability verdict
            self.rf_frequency_setpoint = self._f0
            self.rf_voltage_setpoint = self._design_voltage()
            self._engine_gen = -1
            self.beam.reset()  # tbt: orbit mode, no kick, no injection trims
            self.inject()

    # ------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """All setpoints (hardware units), for save/compare."""
        with self._lock:
            d: dict[str, Any] = {n: st.setpoint.copy() for n, st in self._families.items()}
            d["RF:frequency"] = self.rf_frequency_setpoint
            d["RF:voltage"] = self.rf_voltage_setpoint
            return d

    def summary(self) -> str:
        """A few lines describing the machine and its state."""
        x, y = self.orbit()
        q = self.tunes()
        xi = self.chromaticity()
        fams = ", ".join(f"{n}({len(st.refpts)})" for n, st in self._families.items())
        lines = [
            f"{self.profile.facility} {self.profile.accelerator} [{self.profile.name}]  "
            f"E={self.energy / 1e9:.3g} GeV  seed={self.seed}  {'6D' if self.is_6d else '4D'}",
            f"  lattice {self.profile.lattice_path.name}: {len(self.ring)} elements, {self.nbpm} BPMs",
            f"  families: {fams}",
        ]
        if self.beam_lost:
            lines.append(f"  BEAM LOST: {self.loss_reason}")
        else:
            lines.append(f"  orbit rms x={np.std(x) * 1e6:.1f} um  y={np.std(y) * 1e6:.1f} um   "
                         f"tunes {q[0]:.4f} {q[1]:.4f}   chromaticity {xi[0]:.2f} {xi[1]:.2f}")
        return "\n".join(lines)
