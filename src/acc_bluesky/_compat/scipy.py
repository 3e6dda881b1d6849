"""scipy and OpenBLAS: tiny linear-algebra calls kept on one BLAS thread.

pyAT's linear optics (``linopt6``, hence ``get_optics``) call ``scipy.linalg.solve`` on a 4x4 or 6x6 matrix once per
reference point. scipy 1.17's batched ``solve`` hands even those to OpenBLAS's thread pool: on a quiet machine
a 4x4 solve costs ~0.5 ms instead of ~30 us, and on a loaded one (a control-room PC, two test workers on two cores)
1-20 ms, so one ``get_optics`` at the 224 BPMs of EBS took 1.2-2.9 s instead of ~0.15 s (measured with
``benchmarks/bench_twin.py`` and ``tests/test_compat.py``). :func:`single_thread_blas` limits OpenBLAS to one thread
for the duration of such calls through threadpoolctl's public API: each thread sets it in its outermost block and
restores what it found there. (Measured here, OpenBLAS 0.3.31: only calls from the main thread fan out, ~1.5 ms per
4x4 solve on a busy machine against ~50 us from another thread; OpenBLAS has one setting per process, so two
threads overlapping their blocks can leave one's limit to the other for a moment: only speed is at stake.)
Large matrix products elsewhere (the LOCO fit) keep their threads outside these sections.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["single_thread_blas"]

_local = threading.local()  # per thread: how deep in single_thread_blas blocks, and the limiter to restore
_lock = threading.Lock()
_state: dict = {"controller": None}


def _controller():
    with _lock:
        ctrl = _state["controller"]
        if ctrl is None:
            import scipy.linalg  # noqa: F401 - its own OpenBLAS is loaded before the libraries are looked up
            from threadpoolctl import ThreadpoolController

            ctrl = _state["controller"] = ThreadpoolController()
        return ctrl


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    """BLAS on one thread inside the block (re-entrant; the thread that set the limit restores it when its
    outermost block ends)."""
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.limiter = _controller().limit(limits=1, user_api="blas")
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0:
            limiter, _local.limiter = _local.limiter, None
            limiter.restore_original_limits()
