"""The upstream internals acc_bluesky reaches into (``acc_bluesky._compat``): these fail loudly when they move.

pyAT: the C engine ``atpass`` and its reuse rule; bluesky-queueserver: the permission rule for one plan.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def hmba():
    import at
    import machine_data

    ring = at.load_lattice(os.path.join(os.path.dirname(machine_data.__file__), "hmba.mat"))
    ring.disable_6d()
    return ring


def test_pyat_engine_reuses_a_kept_list_and_reconverts_after_another_lattice(hmba):
    """The twin's fast path relies on both: the same list with reuse=True is not reconverted (in-place changes of
    element arrays are seen), and another lattice tracked in between makes the engine reconvert by itself."""
    import at

    from acc_bluesky._compat.pyat import atpass

    a, b = hmba.deepcopy(), hmba.deepcopy()
    for e in b:
        if isinstance(e, at.Quadrupole):
            e.PolynomB[1] *= 1.01
    la, lb = list(a), list(b)
    refs = np.array([len(a)], dtype=np.uint32)
    z = np.asfortranarray(np.array([1e-4, 0, 1e-4, 0, 0, 0.0]).reshape(6, 1))

    def x(lst, reuse):
        return float(atpass(lst, z.copy(), 1, refpts=refs, reuse=reuse, energy=a.energy, particle=a.particle)[0, 0, 0, 0])

    xa, xb = x(la, False), x(lb, False)
    assert xa != xb
    assert x(la, True) == xa  # b was converted last: the engine reconverted a by itself
    q = next(e for e in a if isinstance(e, at.Quadrupole))
    q.PolynomB[1] *= 1.02  # an in-place change is seen with reuse
    assert x(la, True) == x(la, False) != xa
    # the engine keeps the converted lattice (not a timing: a fact): an attribute replaced by a new array is not
    # seen with reuse (the kept conversion holds the old array), and is seen once the list is reconverted
    kept = x(la, True)
    q.PolynomB = q.PolynomB * 1.05
    assert x(la, True) == kept, "pyAT's engine no longer keeps a converted lattice: the twin's fast path is gone"
    assert x(la, False) != kept and x(la, True) == x(la, False)


def test_queueserver_permission_rule():
    from acc_bluesky._compat.queueserver import plan_allowed_by_rules

    assert plan_allowed_by_rules("measure_orm", [":.*"], [])
    assert not plan_allowed_by_rules("measure_orm", [":.*"], [":^measure_"])
    assert not plan_allowed_by_rules("count", [":^measure_"], [])


def test_queueserver_worker_keeps_the_running_item():
    import inspect

    from bluesky_queueserver.manager.worker import RunEngineWorker

    from acc_bluesky._compat.queueserver import running_item

    src = inspect.getsource(RunEngineWorker)
    assert "self._running_plan_info = plan_info" in src, "the RE worker no longer keeps the running item"
    assert running_item() is None  # not in a worker
