"""pyAT internals used by acc_bluesky (accelerator-toolbox 0.9).

``atpass``: the C tracking engine itself. pyAT's public ``lattice_pass(..., keep_lattice=True)`` builds a new list
of elements at every call, and the engine reconverts a lattice whenever the list object differs from the last one
it converted; calling the engine with one kept list per lattice is what makes a kick-then-orbit cycle 3 ms instead
of 25 ms on EBS. The engine also reconverts by itself when another lattice (another list) was tracked since:
``reuse=True`` is safe whoever else tracks in the process (``tests/test_compat.py`` checks both behaviours).
"""

from __future__ import annotations

from at.tracking.track import _atpass as atpass

__all__ = ["atpass"]
