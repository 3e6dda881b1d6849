"""Figures drawn off the RunEngine's path: one worker thread draws the PNGs of the tools' runs after their results are
stored, while the run closes and the catalogue writer writes it.

:func:`submit` queues a drawing (``fn(*args)``) and returns at once; the worker (one thread, started when work
comes and ended when there is none, not a daemon: the interpreter finishes the queue before it exits) draws them
in order. :func:`wait` waits until every drawing queued so far is done and warns, in the calling thread, about those
that failed (a figure never loses a run: the run is complete whatever its figure does).
:meth:`acc_bluesky.data.RunEngine.wait_for_catalog` calls it, so ``RE(plan)`` returns once its figures exist, and
``RE.wait_for_catalog()`` after ``RE.wait_written = False`` waits for them too.

Only thread-safe drawings go here: matplotlib's object API (``matplotlib.figure.Figure``, ``fig.savefig``), never
pyplot's global state.
"""

from __future__ import annotations

import collections
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["pending", "submit", "wait"]

logger = logging.getLogger(__name__)

_cond = threading.Condition()
_jobs: collections.deque[tuple[Callable[..., Any], tuple[Any, ...], str]] = collections.deque()
_queued = 0
_done = 0
_failures: list[str] = []
_worker: threading.Thread | None = None


def submit(fn: Callable[..., Any], *args: Any, what: str = "figure") -> None:
    """Draw ``fn(*args)`` in the figure worker; ``what`` names it in the warning if it fails."""
    global _queued, _worker
    with _cond:
        _jobs.append((fn, args, what))
        _queued += 1
        if _worker is None or not _worker.is_alive():
            # daemon=False said, not inherited from the thread that submits (the RunEngine's loop thread is a daemon):
            # a daemon thread stopped at the interpreter's exit inside matplotlib's C++ aborts the whole process
            _worker = threading.Thread(target=_loop, name="acc-bluesky-figures", daemon=False)
            _worker.start()


def pending() -> int:
    """Drawings queued and not done yet."""
    with _cond:
        return _queued - _done


def wait(timeout: float | None = None) -> bool:
    """Wait until every drawing queued so far is done; warn (``UserWarning``, in this thread) about those that
    failed. Returns False on timeout."""
    with _cond:
        target = _queued
        ok = _cond.wait_for(lambda: _done >= target, timeout)
        failed = _failures[:]
        del _failures[:]
    for message in failed:
        warnings.warn(message, UserWarning, stacklevel=3)
    return ok


def _loop() -> None:
    global _done, _worker
    while True:
        with _cond:
            if not _jobs:
                _worker = None
                return
            fn, args, what = _jobs.popleft()
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a figure never loses a measurement: reported at the wait
            logger.warning("%s not written (%s)", what, err)
            with _cond:
                _failures.append(f"{what} not written ({err})")
        finally:
            with _cond:
                _done += 1
                _cond.notify_all()
