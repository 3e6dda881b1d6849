"""bluesky-queueserver internals used by acc_bluesky (0.0.25).

``plan_allowed_by_rules(name, allowed, forbidden)``: the RE Manager's own rule deciding whether a user group's
``allowed_plans``/``forbidden_plans`` patterns admit a plan (``profile_ops._check_if_plan_or_func_allowed``); the
queue server exposes no public function for one plan, and re-implementing its pattern syntax would drift from
it. ``tests/test_compat.py`` checks it.
"""

from __future__ import annotations

from bluesky_queueserver.manager.profile_ops import _check_if_plan_or_func_allowed

__all__ = ["plan_allowed_by_rules"]


def plan_allowed_by_rules(name: str, allowed: list, forbidden: list) -> bool:
    return bool(_check_if_plan_or_func_allowed(name, allowed, forbidden))
