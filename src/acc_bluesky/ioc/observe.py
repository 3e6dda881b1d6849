"""What the IOC publishes, computed from a twin: orbit, tunes, readbacks, beam.

The tunes come from the one-turn 4x4 matrix at the twin's closed orbit (the same physics as ``get_optics``'
tunes, centred differences as pyAT's ``find_m44``), tracked on the lattice the twin's orbit solver keeps converted:
one eight-particle turn (a few ms on EBS) instead of a full optics computation (70 ms idle, up to a second on a
loaded machine), and without making the next orbit solve a cold one. This module is a workaround until the twin
offers fast tunes itself; it reads the twin's lock, engine generation and closed orbit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..twin import Twin
from ..twin import _engine

__all__ = ["one_turn_tunes", "Observation", "Observer"]

_XY_STEP = 3.0e-8  # pyAT DConstant.XYStep


def one_turn_tunes(twin: Twin) -> np.ndarray:
    """True fractional tunes (qx, qy) from the one-turn matrix at the closed orbit; NaN if the beam is lost.

    Agrees with :meth:`Twin.tunes` (pyAT ``get_optics``) to ~1e-8 for 4D rings; 6D rings and lines fall back to it.
    """
    from at import a_matrix

    if not twin.is_ring or twin.is_6d:
        return twin.tunes()
    with twin._lock:
        obs = twin.observables()
        if obs.lost:
            return np.full(2, np.nan)
        z = np.asarray(obs.orbit0, dtype=float)
        scaling = np.full(4, _XY_STEP)
        dg = np.concatenate((0.5 * np.diag(scaling), np.zeros((2, 4))))
        r_in = np.asfortranarray(z.reshape(6, 1) + np.concatenate((dg, -dg), axis=1))
        with _engine.ENGINE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keep = twin._engine_gen >= 0 and twin._engine_gen == _engine.generation()
            out = _engine.track(twin.ring, r_in, [len(twin.ring)], keep)[:, :, 0, 0]
            if not keep:
                twin._engine_gen = _engine.generation()  # the twin's lattice is the converted one now
        m44 = (out[:4, :4] - out[:4, 4:]) / scaling
        if not np.all(np.isfinite(m44)):
            return np.full(2, np.nan)
        try:
            _, vps = a_matrix(m44)
        except Exception:  # noqa: BLE001 - unstable one-turn matrix: no tunes
            return np.full(2, np.nan)
        q = np.mod(np.angle(vps) / (2.0 * np.pi), 1.0)
        if np.any(np.abs(np.abs(vps) - 1.0) > 1e-6):  # growing/damped mode: optics unstable
            return np.full(2, np.nan)
        return np.asarray(q[:2], dtype=float)


@dataclass
class Observation:
    """One publication's worth of observables (hardware units, m, A, s)."""

    version: int
    x: np.ndarray
    y: np.ndarray
    tunes: np.ndarray
    lost: bool
    loss_reason: str
    current: float
    lifetime: float
    rf_frequency: float
    rf_voltage: float
    setpoints: dict[str, np.ndarray] = field(default_factory=dict)
    readbacks: dict[str, np.ndarray] = field(default_factory=dict)
    changed: bool = True  # the twin's state changed since the previous observation


class Observer:
    """Computes observations of a twin, recomputing the physics only when its ``version`` changed.

    BPM noise is fresh at every call (the twin adds it to the cached orbit); tune noise likewise, from its own
    seeded generator so the twin's BPM noise sequence stays the one of a sim-mode twin.
    """

    def __init__(self, twin: Twin):
        self.twin = twin
        self._version = -1
        self._q = np.full(2, np.nan)
        seed = twin.seed
        self._rng = np.random.default_rng(None if seed is None else [int(seed), 0x10C])

    def observe(self) -> Observation:
        t = self.twin
        with t._lock:
            readbacks = {n: np.asarray(t.get_readback(n), dtype=float) for n in t.family_names}  # updates ramps
            version = t.version
            changed = version != self._version
            x, y = t.read_bpms()
            lost = t.beam_lost
            if changed:
                self._q = one_turn_tunes(t)
                self._version = version
            q = self._q.copy()
            sigma = t.errors.tune_noise if t.noise_on else 0.0
            if sigma > 0 and np.all(np.isfinite(q)):
                q = q + self._rng.normal(0.0, sigma, 2)
            return Observation(
                version=version, x=x, y=y, tunes=q, lost=lost, loss_reason=t.loss_reason if lost else "",
                current=t.beam_current(), lifetime=t.beam_lifetime(), rf_frequency=float(t.rf_frequency_setpoint),
                rf_voltage=float(t.rf_voltage_setpoint),
                setpoints={n: np.asarray(t.get_setpoint(n), dtype=float) for n in t.family_names},
                readbacks=readbacks, changed=changed)
