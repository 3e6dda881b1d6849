"""Fast, safe use of pyAT's tracking engine.

pyAT converts a lattice for its C engine on every call unless the engine is called with the same list of
elements and ``reuse=True``: each twin keeps one list per lattice (:func:`track`). The engine reconverts by itself
when another lattice was tracked since (pyAT >= 0.9, checked in ``tests/test_compat.py``), so nothing outside the
twin needs to know; the twin asks for a fresh conversion only when it replaced an element attribute object (a
scalar field), which the engine cannot see.
"""

from __future__ import annotations

import threading

import numpy as np

from .._compat.pyat import atpass

__all__ = ["ENGINE_LOCK", "closed_orbit_dct", "generation", "orbit_jacobian", "track", "transverse_map"]

#: The C engine holds global state: every tracking call of the twins goes through this lock.
ENGINE_LOCK = threading.RLock()


def generation() -> int:
    """Kept for the twin's bookkeeping: the engine's conversion is always reusable (see the module docstring);
    the twin marks its own stale conversions with a negative generation."""
    return 0


def track(ring, r_in: np.ndarray, refpts, keep: bool, nturns: int = 1) -> np.ndarray:
    """Track particles (6, n) through ``ring`` with the C engine directly; returns (6, n, nrefs, nturns).

    Skips ``lattice_pass``'s per-call Python preparation (a scan of every element, ~3 ms on EBS), which is
    what makes a kick-then-orbit cycle slow; ``r_in`` is copied, never modified.
    """
    r = np.asfortranarray(np.array(r_in, dtype=np.float64, copy=True).reshape(6, -1))
    refs = np.asarray(refpts, dtype=np.uint32).reshape(-1)
    kw = _params(ring)
    return atpass(_elements(ring), r, nturns, refpts=refs, reuse=bool(keep), **kw)


_ZERO1 = np.zeros(1)
_PARAMS: dict[int, tuple[object, dict]] = {}


def _params(ring) -> dict:
    hit = _PARAMS.get(id(ring))
    if hit is None or hit[0] is not ring:
        h = int(getattr(ring, "harmonic_number", 1) or 1)
        kw = {"energy": ring.energy, "particle": ring.particle, "bunch_currents": _ZERO1, "bunch_spos": _ZERO1,
              "harmonic_number": h, "fillpattern": getattr(ring, "fillpattern", np.zeros(h))}
        hit = (ring, kw)
        _PARAMS[id(ring)] = hit
    return hit[1]
_ELEMENTS: dict[int, tuple[object, list]] = {}


def _elements(ring) -> list:
    hit = _ELEMENTS.get(id(ring))
    if hit is None or hit[0] is not ring or len(hit[1]) != len(ring):
        hit = (ring, list(ring))
        _ELEMENTS[id(ring)] = hit
    return hit[1]


_IDX5 = np.array([0, 1, 2, 3, 5])


def orbit_jacobian(ring, z: np.ndarray, keep: bool, step: float = 3e-8) -> np.ndarray:
    """(5, 5) matrix A = J - I' of the closed-orbit residual in (x, px, y, py, dp), as pyAT's ``_orbit_dct``."""
    delta = np.zeros((6, 6), order="F")
    for i in range(5):
        delta[i, i] = step
    in_mat = track(ring, z.reshape(6, 1) + delta, [len(ring)], keep)[:, :, 0, 0]
    j5 = (in_mat[_IDX5, :5] - in_mat[_IDX5, 5:]) / step
    id5 = np.zeros((5, 5))
    id5[np.arange(4), np.arange(4)] = 1.0
    return j5 - id5


def transverse_map(ring, z: np.ndarray, end: np.ndarray, keep: bool, step: float = 3e-8) -> np.ndarray:
    """One-turn 4x4 transverse map at the orbit ``z`` (6,), whose one-turn end ``end`` (6,) is known: four
    particles tracked (one per transverse coordinate), at the energy and path length of ``z``."""
    delta = np.zeros((6, 4), order="F")
    for i in range(4):
        delta[i, i] = step
    out = track(ring, z.reshape(6, 1) + delta, [len(ring)], keep)[:, :, 0, 0]
    return (out[:4, :] - end[:4, None]) / step


def closed_orbit_dct(ring, refpts: np.ndarray, dct: float, guess: np.ndarray, a_inv: np.ndarray,
                     keep: bool, tol: float = 1e-11, max_iter: int = 10):
    """Chord-Newton closed orbit with fixed path lengthening ``dct`` [m] (RF frequency fixed).

    Reuses the inverse Jacobian ``a_inv`` of a previous solution: each iteration is one single-particle turn
    recorded at ``refpts``. Returns (z, positions (nrefs, 6), iterations, (the last particle tracked (6,), its
    one-turn end (6,))) or None if it does not converge; the last particle is within ``tol`` of ``z``, and with its
    end it spares :func:`transverse_map` a reference particle.
    """
    z = guess.copy()
    z[5] = 0.0
    refs = np.append(refpts, len(ring)).astype(np.uint32)
    theta = np.array([0.0, 0.0, 0.0, 0.0, dct])
    for it in range(1, max_iter + 1):
        tracked = z.copy()
        out = track(ring, np.asfortranarray(tracked.reshape(6, 1)), refs, keep)[:, 0, :, 0]  # (6, nrefs+1)
        keep = True
        end = out[:, -1]
        if not np.all(np.isfinite(end)):
            return None
        b = end[_IDX5] - np.append(z[:4], 0.0) - theta
        dz = a_inv @ b
        z[:5] -= dz
        if np.linalg.norm(dz) < tol:
            return z, out[:, :-1].T, it, (tracked, end)
    return None
