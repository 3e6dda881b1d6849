"""The truth a twin knows, as a campaign records it after each step (no bluesky: the twin and pyAT only).

Figures (:data:`FIGURES`: name -> units, meaning): the beam stored or not, the rms orbit at the BPMs, the
beta-beating against the design lattice (pyAT ``get_optics`` on the twin's errored lattice and on the design), the
fractional tunes and chromaticities, and the transmission of the injected beam over ``turns`` turns. Tunes and
chromaticities are per lattice period, as the twin's tune monitor shows them and its ``tunes()`` and
``chromaticity()`` give them (a lattice of one cell with ``periodicity`` P is simulated as that cell closed on
itself).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np

from ..analysis.bba import bba_model, true_orbit_at_quads

__all__ = ["FIGURES", "design_values", "truth"]

#: Truth figures: name -> (units, meaning).
FIGURES: dict[str, tuple[str, str]] = {
    "beam": ("", "1 if the beam is stored (closed orbit and current), 0 if lost"),
    "orbit_rms_x": ("m", "true rms horizontal orbit at the BPMs"),
    "orbit_rms_y": ("m", "true rms vertical orbit at the BPMs"),
    "centre_rms_x": ("m", "rms horizontal distance of the closed orbit from the magnetic centres of the "
                          "quadrupoles (what beam-based alignment and the golden orbit make small)"),
    "centre_rms_y": ("m", "rms vertical distance of the closed orbit from the magnetic centres of the quadrupoles"),
    "beta_beat_x": ("", "rms of (beta_x - beta_x design) / beta_x design at the BPMs"),
    "beta_beat_y": ("", "rms of (beta_y - beta_y design) / beta_y design at the BPMs"),
    "tune_x": ("", "true fractional horizontal tune (per period)"),
    "tune_y": ("", "true fractional vertical tune (per period)"),
    "chrom_x": ("", "true horizontal chromaticity (per period)"),
    "chrom_y": ("", "true vertical chromaticity (per period)"),
    "tune_error": ("", "largest |tune - target| over the planes (target: the step's, else design)"),
    "chrom_error": ("", "largest |chromaticity - target| over the planes (target: the step's, else design)"),
    "transmission": ("", "fraction of the turns the injected beam (no jitter) survives"),
}

_DESIGN: dict[tuple[str, str], dict[str, Any]] = {}
_DESIGN_LOCK = threading.Lock()


def design_values(profile) -> dict[str, Any]:
    """Tunes, chromaticities (per period) and beta functions at the BPMs of the design lattice (cached)."""
    from ..profile import load_profile
    from ..twin import Twin

    prof = load_profile(profile)
    key = (str(prof.path), prof.sha256)
    with _DESIGN_LOCK:
        hit = _DESIGN.get(key)
        if hit is None:
            ideal = Twin(prof, seed=None)
            bx, by = ideal.beta()
            hit = _DESIGN[key] = {
                "tunes": np.asarray(ideal.tunes(), dtype=float),
                "chrom": np.asarray(ideal.chromaticity(), dtype=float),
                "beta_x": bx, "beta_y": by, "ring": ideal.is_ring}
        return hit


def _rms(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=float)
    return float(np.sqrt(np.mean(v**2))) if v.size and np.all(np.isfinite(v)) else math.nan


def _transmission(twin, turns: int) -> float:
    """Fraction of ``turns`` the injected centroid (static errors and trims, no jitter) survives, the apertures
    checked at the BPMs. Nothing of the twin's state (random streams, last acquisition) changes."""
    if turns <= 0:
        return math.nan
    from ..twin import _engine

    z = np.asarray(twin.beam.injected(), dtype=float).reshape(6, 1)
    refs = np.asarray(twin.bpm_refpts, dtype=np.uint32)
    ap = twin.profile.spec.beam
    with twin._lock, _engine.ENGINE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _engine.track(twin.ring, z, refs, keep=False, nturns=int(turns))
        twin._engine_gen = -1  # as the twin does after tracking of its own: its next solve converts afresh
    x, y = out[0, 0], out[2, 0]  # (nbpm, nturns)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x) | ~np.isfinite(y) | (np.abs(x) > ap.aperture_x) | (np.abs(y) > ap.aperture_y)
    lost_turns = np.flatnonzero(bad.any(axis=0))
    return 1.0 if lost_turns.size == 0 else float(lost_turns[0]) / float(turns)


def _quads(profile) -> list[str]:
    """The in-service quadrupoles of the profile's quadrupole families (device names)."""
    return [q.name for q in bba_model(profile).quads if q.in_service]


def truth(twin, *, tune_target=None, chrom_target=None, turns: int = 100) -> dict[str, float]:
    """The truth figures (:data:`FIGURES`) of ``twin`` now; NaN where they do not exist (no beam)."""
    design = design_values(twin.profile)
    lost = bool(twin.beam_lost) or not twin.beam_current() > 0
    out = {k: math.nan for k in FIGURES}
    out["beam"] = 0.0 if lost else 1.0
    if twin.is_ring:
        try:
            out["transmission"] = _transmission(twin, turns)
        except Exception:  # noqa: BLE001 - a tracking failure is no transmission
            out["transmission"] = 0.0
    if lost:
        return out
    x, y = twin.orbit()
    out["orbit_rms_x"], out["orbit_rms_y"] = _rms(x), _rms(y)
    quads = _quads(twin.profile)
    if quads:
        try:
            c = true_orbit_at_quads(twin, quads)
            out["centre_rms_x"], out["centre_rms_y"] = _rms(c[:, 0]), _rms(c[:, 1])
        except Exception:  # noqa: BLE001 - no orbit through the split lattice: no figure
            pass
    bx, by = twin.beta()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["beta_beat_x"] = _rms((bx - design["beta_x"]) / design["beta_x"])
        out["beta_beat_y"] = _rms((by - design["beta_y"]) / design["beta_y"])
    if twin.is_ring:
        q = np.asarray(twin.tunes(), dtype=float)
        xi = np.asarray(twin.chromaticity(), dtype=float)
        out["tune_x"], out["tune_y"] = float(q[0]), float(q[1])
        out["chrom_x"], out["chrom_y"] = float(xi[0]), float(xi[1])
        qt = design["tunes"] if tune_target is None else np.asarray(tune_target, dtype=float)
        xt = design["chrom"] if chrom_target is None else np.asarray(chrom_target, dtype=float)
        dq = np.abs((q - qt + 0.5) % 1.0 - 0.5)  # fractional: 0.99 is 0.01 from 0.0
        out["tune_error"] = float(np.max(dq)) if np.all(np.isfinite(dq)) else math.nan
        dxi = np.abs(xi - xt)
        out["chrom_error"] = float(np.max(dxi)) if np.all(np.isfinite(dxi)) else math.nan
    return out
