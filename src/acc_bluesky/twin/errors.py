"""Error model of the twin (pySC-like): magnets, BPMs, correctors, RF.

All errors are drawn once per seed from truncated Gaussians with the rms values of the profile's ``errors``
section. The twin knows them (the truth); devices only see what the hardware would show.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _field

import numpy as np

from ..profile import Profile

__all__ = ["ErrorModel", "truncated_normal"]


def truncated_normal(rng: np.random.Generator, sigma, size, cut: float = 2.5) -> np.ndarray:
    """Gaussian samples of rms ``sigma`` (before truncation) redrawn beyond ``cut`` sigma."""
    out = rng.standard_normal(size)
    bad = np.abs(out) > cut
    while np.any(bad):
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > cut
    return out * sigma


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

    @classmethod
    def ideal(cls, profile: Profile) -> ErrorModel:
        n = len(profile.bpm_refpts)
        return cls(bpm_offset=np.zeros((n, 2)), bpm_gain=np.zeros((n, 2)), bpm_roll=np.zeros(n))

    @classmethod
    def generate(cls, profile: Profile, seed: int, scale: float | None = None) -> ErrorModel:
        """Draw the profile's default error set for ``seed``; ``scale`` overrides the alignment scale."""
        spec = profile.spec.errors
        rng = np.random.default_rng([int(seed), 0xE44])
        cut = spec.truncation
        s = spec.scale if scale is None else scale
        em = cls.ideal(profile)
        for k, mspec in enumerate(spec.magnets):
            try:
                refs = profile.select(mspec.select, f"errors.magnets.{k}.select")
            except Exception:  # noqa: BLE001 - a class absent from this lattice is not an error here
                continue
            n = len(refs)
            dx = truncated_normal(rng, mspec.dx * s, n, cut)
            dy = truncated_normal(rng, mspec.dy * s, n, cut)
            rl = truncated_normal(rng, mspec.roll * s, n, cut)
            fe = truncated_normal(rng, mspec.field, n, cut)
            for i, r in enumerate(refs.tolist()):
                if mspec.dx:
                    em.dx[r] = float(dx[i])
                if mspec.dy:
                    em.dy[r] = float(dy[i])
                if mspec.roll:
                    em.roll[r] = float(rl[i])
                if mspec.field:
                    em.field[r] = float(fe[i])
        nb = len(profile.bpm_refpts)
        b = spec.bpm
        em.bpm_offset = truncated_normal(rng, b.offset, (nb, 2), cut)
        em.bpm_gain = truncated_normal(rng, b.gain, (nb, 2), cut)
        em.bpm_roll = truncated_normal(rng, b.roll, nb, cut)
        em.bpm_noise = b.noise
        em.tbt_noise = b.tbt_noise
        for name, fam in profile.families_of_type("hcor", "vcor").items():
            em.corrector_calibration[name] = truncated_normal(rng, spec.corrector_calibration, len(fam), cut)
        em.rf_frequency = float(truncated_normal(rng, spec.rf_frequency, 1, cut)[0])
        em.tune_noise = spec.tune_noise
        return em

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
