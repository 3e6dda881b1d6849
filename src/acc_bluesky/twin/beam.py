"""The beam of the twin: an injected beam, a pinger, and what the BPMs acquire in each mode.

- **Injection.** The injected beam arrives at the lattice entrance (a ring) or with the profile's entrance orbit (a
  line), off by a static error drawn once per seed and a shot-to-shot jitter (profile ``errors.injection``), plus the
  injection steering knobs (:meth:`Beam.set_injection`: the last transfer-line steerers / septum, four trims x, px,
  y, py). It is tracked through the twin's lattice, so a ring with no closed orbit still gives trajectories.
- **Pinger.** :meth:`Beam.kick_stored` kicks the stored beam (the closed orbit) at the lattice entrance, or at a
  chosen element with a ``KickAngle``, and records N turns: turn-by-turn (TbT) data.
- **Acquisition modes** of the BPM system (:attr:`Beam.mode`): ``orbit`` (the closed orbit, ``Twin.read_bpms``; on a
  line the mean trajectory of the injected beam: :meth:`Beam.injected` without the jitter, which averages out),
  ``trajectory`` (first turns of an injected shot, single pass on a line) and ``tbt`` (N turns after a pinger
  trigger). Readings go through the BPM errors (offset, gain, roll) plus the TbT noise (``errors.bpm.tbt_noise``),
  and are NaN from where the beam is lost; the loss (turn, element) is in the :class:`Acquisition`.
- One particle by default (the centroid of a bunch with no size); ``nparticles > 1`` tracks a Gaussian bunch (the
  ring's natural emittance, 1 % coupling, its energy spread unless set) whose centroid the BPMs read, for
  decoherence; a BPM reading is NaN where fewer than ``loss_threshold`` of the particles arrive.

Draws come from named streams ``numpy.random.default_rng([seed, crc32(name)])``: the static injection error is
the same for a seed whatever else happens; jitter and noise follow the order of the shots. All methods take the
twin's lock and the tracking engine's lock (thread-safe). No bluesky or ophyd-async here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._compat.scipy import single_thread_blas
from . import _engine
from .errors import injection_error, stream


__all__ = ["BPM_MODES", "Acquisition", "Beam", "stream"]

#: acquisition modes of the BPM system
BPM_MODES = ("orbit", "trajectory", "tbt")
#: up to this many particle-turns the aperture is checked at every element entrance; beyond, at the BPMs and the
#: turn ends (then the element of a loss is found by tracking that turn again)
ALL_ELEMENT_PASSES = 64
#: limits of the injection trims (x [m], px [rad], y [m], py [rad]) and of the pinger (x, y [rad])
INJECTION_TRIM_LIMITS = np.array([5e-3, 2e-3, 5e-3, 2e-3])
KICK_LIMIT = 5e-3
#: limit of the injected beam's energy trim (dp/p)
INJECTION_ENERGY_LIMIT = 1e-2


@dataclass(frozen=True)
class Acquisition:
    """One acquisition of the BPM system.

    Attributes:
        mode: ``orbit``, ``trajectory`` or ``tbt``.
        x, y: (turns, nbpm) readings [m] (BPM errors and noise; NaN where no beam or a dead BPM).
        x_true, y_true: (turns, nbpm) true beam centroid [m] (the twin's truth; NaN where lost).
        intensity: (turns, nbpm) fraction of the particles reaching each BPM (the sum signal).
        lost_turn: 0-based turn where the beam is lost (``None`` if it survives every turn).
        lost_element: lattice index of the first element at whose entrance the beam is outside the aperture or
            already lost in tracking (``None`` if it survives).
        lost_element_name: its FamName (``""`` if it survives).
        lost_s: its position along the lattice [m] (NaN if it survives).
        reason: why the beam is lost (``""`` if it survives).
        kick: (2,) pinger kick (x, y) [rad] (zeros for an injected shot or an orbit).
        start: (6,) initial centroid coordinates (x, px, y, py, dp, ct) [m, rad, m, rad, 1, m].
        nparticles: particles tracked.
        time: the twin's clock at the acquisition [s].
    """

    mode: str
    x: np.ndarray
    y: np.ndarray
    x_true: np.ndarray
    y_true: np.ndarray
    intensity: np.ndarray
    lost_turn: int | None = None
    lost_element: int | None = None
    lost_element_name: str = ""
    reason: str = ""
    lost_s: float = float("nan")
    kick: np.ndarray = field(default_factory=lambda: np.zeros(2))
    start: np.ndarray = field(default_factory=lambda: np.zeros(6))
    nparticles: int = 1
    time: float = 0.0

    @property
    def turns(self) -> int:
        return int(self.x.shape[0])

    @property
    def nbpm(self) -> int:
        return int(self.x.shape[1])

    @property
    def lost(self) -> bool:
        return self.lost_turn is not None

    @property
    def bpms_reached(self) -> int:
        """Number of BPM passages (all turns, in passage order) before the beam is lost (true intensity)."""
        ok = (self.intensity.reshape(-1) > 0) & np.isfinite(self.x_true.reshape(-1))
        return int(np.argmin(ok)) if not np.all(ok) else int(ok.size)

    @property
    def turns_reached(self) -> float:
        """Turns made, in units of a full turn (``bpms_reached / nbpm``)."""
        return self.bpms_reached / self.nbpm

    def transmission(self) -> dict[str, Any]:
        """What a beam-loss / current monitor shows: where the beam was lost."""
        return {"lost": self.lost, "lost_turn": self.lost_turn, "lost_element": self.lost_element,
                "lost_element_name": self.lost_element_name, "lost_s": self.lost_s, "bpms_reached": self.bpms_reached,
                "turns_reached": self.turns_reached, "reason": self.reason,
                "final_intensity": float(np.nan_to_num(self.intensity[-1, -1]))}


class Beam:
    """Injected and stored beam of a :class:`~acc_bluesky.twin.Twin`: ``twin.beam``.

    Attributes:
        injection_error: (6,) static error of the injected beam (truth) [m, rad, m, rad, 1, m].
        jitter: (6,) rms shot-to-shot jitter.
        mode: BPM acquisition mode (``orbit``, ``trajectory``, ``tbt``): what :meth:`trigger` acquires.
        turns: turns acquired in ``trajectory`` (default 1) and ``tbt`` (default 1024) modes.
        kick: (2,) pinger kick (x, y) [rad] fired by :meth:`trigger` in ``tbt`` mode.
        kicker: lattice index of the pinger (``None``: the lattice entrance).
        nparticles: particles tracked (1 = the centroid).
        emittance: (2,) emittances [m rad] of a multi-particle bunch (default: natural emittance, 1 % coupling).
        energy_spread: rms dp/p of a multi-particle bunch (default: the ring's natural one).
        loss_threshold: a BPM reads NaN where fewer than this fraction of the particles arrive.
        last: the last :class:`Acquisition`.
    """

    def __init__(self, twin: Any) -> None:
        self._twin = twin
        spec = twin.profile.spec.errors
        inj = spec.injection
        self.jitter = np.array([inj.jitter_x, inj.jitter_px, inj.jitter_y, inj.jitter_py, inj.jitter_energy, 0.0])
        seed = twin.seed
        self.injection_error = injection_error(twin.profile, seed)
        if seed is None:
            self.jitter = np.zeros(6)
        self._jitter_rng = stream(seed, "injection-jitter")
        self._noise_rng = stream(seed, "tbt-noise")
        self._bunch_rng = stream(seed, "bunch")
        self.injection_trim = np.zeros(4)
        self.injection_energy = 0.0
        self.mode = "orbit"
        self._turns = {"trajectory": 1, "tbt": 1024}
        self.kick = np.zeros(2)
        self.kicker: int | None = None
        self.nparticles = 1
        self.emittance: np.ndarray | None = None
        self.energy_spread: float | None = None
        self.loss_threshold = 0.5
        self.last: Acquisition | None = None
        self._natural: tuple[np.ndarray, float] | None = None

    # ------------------------------------------------------------------------------------------------
    # settings
    @property
    def turns(self) -> int:
        """Turns acquired in the current mode (1 in ``orbit`` mode)."""
        return 1 if self.mode == "orbit" else self._turns[self.mode]

    def set_mode(self, mode: str, turns: int | None = None) -> None:
        """Set the BPM acquisition mode (``orbit``, ``trajectory``, ``tbt``) and, for the last two, the turns."""
        if mode not in BPM_MODES:
            raise ValueError(f"BPM acquisition mode must be one of {BPM_MODES}, got {mode!r}")
        with self._twin._lock:
            if turns is not None:
                if mode == "orbit":
                    raise ValueError("the orbit mode acquires one closed orbit: 'turns' applies to the "
                                     "'trajectory' and 'tbt' modes")
                self._turns[mode] = self._check_turns(turns, mode)
            self.mode = mode

    def _check_turns(self, turns: int, mode: str) -> int:
        t = int(turns)
        if t < 1 or t != turns:
            raise ValueError(f"turns must be a positive integer, got {turns!r}")
        if not self._twin.is_ring and t > 1:
            raise ValueError(f"{self._twin.profile.name} is a transfer line: a {mode} acquisition is one pass "
                             "(turns=1)")
        return t

    def set_injection(self, trim) -> None:
        """Injection steering: (4,) trims (x [m], px [rad], y [m], py [rad]) added to the injected beam."""
        t = np.asarray(trim, dtype=float).reshape(-1)
        if t.shape != (4,) or not np.all(np.isfinite(t)):
            raise ValueError(f"injection trims are 4 finite values (x [m], px [rad], y [m], py [rad]), got {trim!r}")
        over = np.abs(t) > INJECTION_TRIM_LIMITS
        if np.any(over):
            names = np.array(["x", "px", "y", "py"])[over].tolist()
            raise ValueError(f"injection trim(s) {names} beyond the limits +-{INJECTION_TRIM_LIMITS.tolist()} "
                             "(m, rad, m, rad): nothing set")
        with self._twin._lock:
            self.injection_trim = t.copy()
            self._twin._touch()  # a line's orbit is the injected beam's trajectory

    def set_injection_energy(self, dp: float) -> None:
        """Energy trim of the injected beam (dp/p, the injector's energy), added to its static error."""
        v = float(dp)
        if not math.isfinite(v) or abs(v) > INJECTION_ENERGY_LIMIT:
            raise ValueError(f"injection energy trim must be finite and within +-{INJECTION_ENERGY_LIMIT} (dp/p), "
                             f"got {dp!r}: nothing set")
        with self._twin._lock:
            self.injection_energy = v
            self._twin._touch()

    def set_kick(self, kick, kicker: int | None = None) -> None:
        """Pinger kick (x, y) [rad], fired by :meth:`trigger` in ``tbt`` mode; ``kicker``: its lattice index."""
        k = np.broadcast_to(np.asarray(kick, dtype=float), (2,)).copy()
        if not np.all(np.isfinite(k)) or np.any(np.abs(k) > KICK_LIMIT):
            raise ValueError(f"pinger kick must be finite and within +-{KICK_LIMIT} rad, got {kick!r}")
        with self._twin._lock:
            if kicker is not None:
                self._kick_array(int(kicker))  # refuses an element without a KickAngle
            self.kick = k
            self.kicker = None if kicker is None else int(kicker)

    def injected(self) -> np.ndarray:
        """(6,) coordinates of the injected beam without jitter (truth): design + static error + trims."""
        z = self._design_injection() + self.injection_error
        z[:4] += self.injection_trim
        z[4] += self.injection_energy
        return z

    def reset(self) -> None:
        """Back to the defaults: orbit mode, no kick, no injection trims (the errors stay)."""
        with self._twin._lock:
            self.injection_trim = np.zeros(4)
            self.injection_energy = 0.0
            self.mode = "orbit"
            self._turns = {"trajectory": 1, "tbt": 1024}
            self.kick = np.zeros(2)
            self.kicker = None
            self.nparticles = 1
            self.last = None
            self._twin._touch()

    # ------------------------------------------------------------------------------------------------
    # acquisitions
    def trigger(self) -> Acquisition:
        """One acquisition in the current :attr:`mode` (stored in :attr:`last`)."""
        with self._twin._lock:
            if self.mode == "orbit":
                return self.read_orbit()
            if self.mode == "trajectory":
                return self.inject()
            return self.kick_stored()

    def read_orbit(self) -> Acquisition:
        """The closed orbit as an acquisition of one turn (``Twin.read_bpms``)."""
        tw = self._twin
        with tw._lock:
            xm, ym = tw.read_bpms()
            xt, yt = tw.orbit()
            obs = tw.observables()
            inten = np.full((1, tw.nbpm), 0.0 if obs.lost else 1.0)
            acq = Acquisition("orbit", xm.reshape(1, -1), ym.reshape(1, -1), xt.reshape(1, -1),
                              yt.reshape(1, -1), inten, lost_turn=0 if obs.lost else None, reason=obs.reason,
                              start=np.asarray(obs.orbit0, dtype=float).copy(), time=tw._clock())
            self.last = acq
            return acq

    def inject(self, turns: int | None = None, nparticles: int | None = None, jitter: bool = True) -> Acquisition:
        """Inject one shot and record its first ``turns`` turns (default :attr:`turns` of the trajectory mode).

        The shot starts at :meth:`injected` plus a jitter draw (``jitter=False``: none). Works whether or not the
        ring has a closed orbit.
        """
        tw = self._twin
        with tw._lock:
            nt = self._turns["trajectory"] if turns is None else self._check_turns(turns, "trajectory")
            npart = self.nparticles if nparticles is None else int(nparticles)
            z = self.injected()
            if jitter and tw.noise_on and np.any(self.jitter > 0):
                z = z + self._jitter_rng.standard_normal(6) * self.jitter
            parts = self._bunch(z, npart, stored=False)
            acq = self._acquire("trajectory", parts, nt, z, np.zeros(2))
            self.last = acq
            return acq

    def kick_stored(self, kick=None, turns: int | None = None, nparticles: int | None = None) -> Acquisition:
        """Kick the stored beam with the pinger and record ``turns`` turns (default: the tbt mode's turns).

        The beam starts on the closed orbit (4D with the RF frequency deviation, or 6D); the kick (x, y) [rad] is
        applied at :attr:`kicker` (default: the lattice entrance). No stored beam (no closed orbit, beam lost):
        every reading is NaN and the loss is at turn 0.
        """
        tw = self._twin
        with tw._lock:
            if kick is not None:
                self.set_kick(kick, self.kicker)
            nt = self._turns["tbt"] if turns is None else self._check_turns(turns, "tbt")
            npart = self.nparticles if nparticles is None else int(nparticles)
            obs = tw.observables()
            if obs.lost:
                nan = np.full((nt, tw.nbpm), np.nan)
                acq = Acquisition("tbt", nan, nan.copy(), nan.copy(), nan.copy(), np.zeros((nt, tw.nbpm)),
                                  lost_turn=0, reason=f"no stored beam: {obs.reason}", kick=self.kick.copy(),
                                  start=np.full(6, np.nan), nparticles=npart, time=tw._clock())
                self.last = acq
                return acq
            z0 = np.asarray(obs.orbit0, dtype=float).copy()
            parts = self._bunch(z0, npart, stored=True)
            kick = self.kick.copy()
            if self.kicker is None:
                parts[1] += kick[0]
                parts[3] += kick[1]
                acq = self._acquire("tbt", parts, nt, z0, kick)
            else:
                acq = self._acquire("tbt", parts, nt, z0, kick, kicker=self.kicker)
            self.last = acq
            return acq

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Readings (x, y) (turns, nbpm) [m] of the last acquisition (a fresh one if none yet)."""
        with self._twin._lock:
            acq = self.last if self.last is not None else self.trigger()
            return acq.x.copy(), acq.y.copy()

    # ------------------------------------------------------------------------------------------------
    # internals
    def _design_injection(self) -> np.ndarray:
        tw = self._twin
        if tw.is_ring:
            return np.zeros(6)
        return np.asarray(tw._line_input(), dtype=float).copy()

    def _natural_beam(self) -> tuple[np.ndarray, float]:
        if self._natural is None:
            import at  # noqa: F401 - Lattice methods

            tw = self._twin
            try:
                with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rp = tw.design.radiation_parameters()
                    tw._engine_gen = -1
                ex = float(rp.emittances[0])
                sd = float(rp.sigma_e)
            except Exception:  # noqa: BLE001 - a line or a lattice without radiation integrals
                ex, sd = 1e-9, 1e-3
            if not (math.isfinite(ex) and ex > 0):
                ex = 1e-9
            if not (math.isfinite(sd) and sd > 0):
                sd = 1e-3
            self._natural = (np.array([ex, 0.01 * ex]), sd)
        return self._natural

    def _bunch(self, z: np.ndarray, npart: int, stored: bool) -> np.ndarray:
        """(6, npart) particle coordinates around the centroid ``z`` (npart=1: the centroid itself)."""
        if npart < 1:
            raise ValueError(f"nparticles must be >= 1, got {npart}")
        parts = np.tile(np.asarray(z, dtype=float).reshape(6, 1), (1, npart))
        if npart == 1:
            return parts
        emit, sd = self._natural_beam()
        if self.emittance is not None:
            emit = np.broadcast_to(np.asarray(self.emittance, dtype=float), (2,))
        if self.energy_spread is not None:
            sd = float(self.energy_spread)
        beta, alpha, disp = self._entrance_twiss()
        g = self._bunch_rng.standard_normal((6, npart))
        offs = np.zeros((6, npart))
        for p in range(2):  # matched uncoupled ellipses: x = sqrt(e b) u, px = sqrt(e / b) (v - a u)
            u, v = g[2 * p], g[2 * p + 1]
            offs[2 * p] = math.sqrt(emit[p] * beta[p]) * u
            offs[2 * p + 1] = math.sqrt(emit[p] / beta[p]) * (v - alpha[p] * u)
        offs[4] = sd * g[4]
        offs[:4] += np.outer(disp, offs[4])  # the dispersion of the matched beam
        offs -= offs.mean(axis=1, keepdims=True)  # the centroid is z exactly
        return parts + offs

    def _entrance_twiss(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Design beta (2,), alpha (2,) and dispersion (4,) at the lattice entrance."""
        import at

        tw = self._twin
        with _engine.ENGINE_LOCK, single_thread_blas(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tw._engine_gen = -1
            try:
                if tw.is_ring:
                    _, _, ed = at.get_optics(tw.design, refpts=[0])
                else:
                    _, _, ed = at.get_optics(tw.design, refpts=[0], twiss_in=tw._twiss_in())
                return (np.asarray(ed.beta[0][:2]), np.asarray(ed.alpha[0][:2]),
                        np.asarray(ed.dispersion[0][:4]))
            except Exception:  # noqa: BLE001 - unstable design optics: a round beam
                return np.ones(2), np.zeros(2), np.zeros(4)

    def _kick_array(self, kicker: int) -> np.ndarray:
        tw = self._twin
        if not 0 <= kicker < len(tw.ring):
            raise ValueError(f"pinger element index {kicker} out of range 0..{len(tw.ring) - 1}")
        e = tw.ring[kicker]
        arr = getattr(e, "KickAngle", None)
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.shape != (2,):
            raise ValueError(f"element {kicker} ({e.FamName}) has no KickAngle to act as a pinger: use a corrector "
                             "or sextupole with a corrector winding, or kicker=None (the lattice entrance)")
        return arr

    def _track(self, parts: np.ndarray, refs: np.ndarray, nturns: int) -> np.ndarray:
        tw = self._twin
        keep = tw._engine_gen >= 0 and tw._engine_gen == _engine.generation()
        out = _engine.track(tw.ring, parts, refs, keep=keep, nturns=nturns)
        if not keep:
            tw._engine_gen = _engine.generation()
        return out

    def _acquire(self, mode: str, parts: np.ndarray, nturns: int, start: np.ndarray, kick: np.ndarray,
                 kicker: int | None = None) -> Acquisition:
        tw = self._twin
        ring = tw.ring
        nel = len(ring)
        bpms = np.asarray(tw.bpm_refpts, dtype=np.int64)
        every = nturns * parts.shape[1] <= ALL_ELEMENT_PASSES
        refs = np.arange(nel + 1, dtype=np.uint32) if every else np.append(bpms, nel).astype(np.uint32)
        bpm_cols = bpms if every else np.arange(len(bpms))
        tw._update_ramps()
        with _engine.ENGINE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kicker is None:
                out = self._track(parts, refs, nturns)
            else:  # the pinger fires once: turn 1 with the kick on the element, then the other turns
                arr = self._kick_array(kicker)
                saved = arr.copy()
                try:
                    arr[0] = saved[0] + kick[0]
                    arr[1] = saved[1] + kick[1]
                    first = self._track(parts, refs, 1)
                finally:
                    arr[:] = saved
                if nturns > 1:
                    rest = self._track(first[:, :, -1, 0], refs, nturns - 1)
                    out = np.concatenate([first, rest], axis=3)
                else:
                    out = first
        # out: (6, npart, nrefs, nturns) -> loss mask per particle at every recorded point, in passage order
        ap = tw.profile.spec.beam
        xs, ys = out[0], out[2]
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(xs) | ~np.isfinite(ys) | (np.abs(xs) > ap.aperture_x) | (np.abs(ys) > ap.aperture_y)
        npart = parts.shape[1]
        seq = np.transpose(bad, (0, 2, 1)).reshape(npart, -1)  # (npart, nturns*nrefs), passage order
        dead = np.cumsum(seq, axis=1) > 0
        alive = ~dead.reshape(npart, nturns, len(refs))  # (npart, nturns, nrefs)
        frac = alive.mean(axis=0)  # (nturns, nrefs)
        ok = frac >= self.loss_threshold if npart > 1 else frac > 0
        # centroid of the surviving particles at the BPMs
        w = alive[:, :, bpm_cols]  # (npart, nturns, nbpm)
        xb = np.transpose(xs[:, bpm_cols, :], (0, 2, 1))  # (npart, nturns, nbpm)
        yb = np.transpose(ys[:, bpm_cols, :], (0, 2, 1))
        cnt = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            xc = np.where(w, xb, 0.0).sum(axis=0) / cnt
            yc = np.where(w, yb, 0.0).sum(axis=0) / cnt
        okb = ok[:, bpm_cols]
        xc[~okb] = np.nan
        yc[~okb] = np.nan
        lost_turn = lost_el = None
        name = reason = ""
        flat = ok.reshape(-1)
        if not np.all(flat):
            k = int(np.argmin(flat))
            lost_turn, col = divmod(k, len(refs))
            if every:
                el = int(refs[col])
            else:
                el = self._locate_loss(out, lost_turn, col, alive)
            lost_el = min(el, nel - 1)
            name = ring[lost_el].FamName
            reason = (f"beam lost in turn {lost_turn} at element {lost_el} ({name}, s={self._spos(lost_el):.3f} m): "
                      f"outside the aperture +-{ap.aperture_x * 1e3:g} x {ap.aperture_y * 1e3:g} mm or lost in "
                      "tracking")
        xm, ym = tw.errors.bpm_transform(xc, yc)
        if tw.noise_on and tw.errors.tbt_noise > 0:
            xm = xm + self._noise_rng.normal(0.0, tw.errors.tbt_noise, xm.shape)
            ym = ym + self._noise_rng.normal(0.0, tw.errors.tbt_noise, ym.shape)
        dead_bpms = sorted(tw.anomalies.dead_bpms)
        if dead_bpms:
            xm[:, dead_bpms] = np.nan
            ym[:, dead_bpms] = np.nan
        return Acquisition(mode, xm, ym, xc, yc, frac[:, bpm_cols].copy(), lost_turn, lost_el, name, reason,
                           float("nan") if lost_el is None else self._spos(lost_el),
                           np.asarray(kick, dtype=float).copy(), np.asarray(start, dtype=float).copy(), npart,
                           tw._clock())

    def _locate_loss(self, out: np.ndarray, turn: int, col: int, alive: np.ndarray) -> int:
        """Element of a loss seen at the BPMs: retrack that turn from its start, recording at every element."""
        tw = self._twin
        nel = len(tw.ring)
        bpms = np.asarray(tw.bpm_refpts, dtype=np.int64)
        if turn == 0:
            return int(bpms[col]) if col < len(bpms) else nel
        start = out[:, :, -1, turn - 1]  # the end of the previous turn
        keep = alive[:, turn - 1, -1]
        if not np.any(keep):
            return int(bpms[col]) if col < len(bpms) else nel
        refs = np.arange(nel + 1, dtype=np.uint32)
        with _engine.ENGINE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = self._track(np.asfortranarray(start[:, keep]), refs, 1)[:, :, :, 0]
        ap = tw.profile.spec.beam
        with np.errstate(invalid="ignore"):
            bad = (~np.isfinite(o[0]) | ~np.isfinite(o[2]) | (np.abs(o[0]) > ap.aperture_x)
                   | (np.abs(o[2]) > ap.aperture_y))
        frac = 1.0 - (np.cumsum(bad, axis=1) > 0).mean(axis=0)
        thr = self.loss_threshold if o.shape[1] > 1 else 1.0
        below = np.nonzero(frac * keep.mean() < thr)[0]
        return int(below[0]) if below.size else (int(bpms[col]) if col < len(bpms) else nel)

    def _spos(self, index: int) -> float:
        tw = self._twin
        sp = getattr(self, "_spos_cache", None)
        if sp is None:
            sp = tw.design.get_s_pos(range(len(tw.design) + 1))
            self._spos_cache = sp
        return float(sp[index])
