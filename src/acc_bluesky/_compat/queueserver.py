"""bluesky-queueserver internals used by acc_bluesky (0.0.25).

``plan_allowed_by_rules(name, allowed, forbidden)``: the RE Manager's own rule deciding whether a user group's
``allowed_plans``/``forbidden_plans`` patterns admit a plan (``profile_ops._check_if_plan_or_func_allowed``); the
queue server exposes no public function for one plan, and re-implementing its pattern syntax would drift from
it. ``tests/test_compat.py`` checks it.
"""

from __future__ import annotations

from bluesky_queueserver.manager.profile_ops import _check_if_plan_or_func_allowed

__all__ = ["plan_allowed_by_rules", "running_item"]


def plan_allowed_by_rules(name: str, allowed: list, forbidden: list) -> bool:
    return bool(_check_if_plan_or_func_allowed(name, allowed, forbidden))


def running_item() -> dict | None:
    """In an RE Manager's worker process: ``{"user", "user_group", "item_uid", "name"}`` of the queue item being
    executed, else None. The worker (a ``multiprocessing.Process``) holds it as ``_running_plan_info``; the queue
    server passes the submitting user to the worker but not into the run's metadata."""
    import multiprocessing

    proc = multiprocessing.current_process()
    info = getattr(proc, "_running_plan_info", None)
    if not isinstance(info, dict):
        return None
    return {k: info.get(k) for k in ("user", "user_group", "item_uid", "name")}
