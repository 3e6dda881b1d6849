"""User-group permissions for the RE Manager: who may run which queue plans.

Groups (names matched with the queue server's ``allowed_plans``/``forbidden_plans`` syntax: a plain name is an
exact match, ``":regex"`` a regular expression searched in the plan name):

- ``primary`` (the API's default group) and ``admin``: every plan, and the simulator's fault injection
  (``sim_*`` functions).
- ``operator``: measurements (``measure_*``, ``count``, ``save_config``) and corrections (``correct_*``,
  ``orbit_bump``); not ``restore_config``, nor any function.
- ``guest``: measurements only (``measure_*``, ``count``).

Measurements move correctors, quadrupoles or the RF frequency while they run but restore them at the end, also on
failure or abort; corrections leave the machine changed on purpose.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_PERMISSIONS", "GROUPS", "write_permissions", "validate_permissions", "plan_allowed"]

#: Plans a guest may run (read-only or self-restoring measurements).
_MEASURE = [":^measure_", "count"]
#: Plans an operator may run in addition: corrections and configuration snapshots.
_CORRECT = [":^correct_", "orbit_bump", "save_config"]

DEFAULT_PERMISSIONS: dict[str, Any] = {
    "user_groups": {
        "root": {
            "allowed_plans": [None],
            "forbidden_plans": [":^_"],
            "allowed_devices": [None],
            "forbidden_devices": [":^_:?.*"],
            "allowed_functions": [None],
            "forbidden_functions": [":^_"],
        },
        "primary": {
            "allowed_plans": [":.*"],
            "forbidden_plans": [None],
            "allowed_devices": [":?.*:depth=5"],
            "forbidden_devices": [None],
            "allowed_functions": [":^sim_"],
            "forbidden_functions": [None],
        },
        "admin": {
            "allowed_plans": [":.*"],
            "forbidden_plans": [None],
            "allowed_devices": [":?.*:depth=5"],
            "forbidden_devices": [None],
            "allowed_functions": [":^sim_"],
            "forbidden_functions": [None],
        },
        "operator": {
            "allowed_plans": [*_MEASURE, *_CORRECT],
            "forbidden_plans": [None],
            "allowed_devices": [":?.*:depth=5"],
            "forbidden_devices": [None],
            "allowed_functions": [],
            "forbidden_functions": [None],
        },
        "guest": {
            "allowed_plans": list(_MEASURE),
            "forbidden_plans": [None],
            "allowed_devices": [":?.*:depth=5"],
            "forbidden_devices": [None],
            "allowed_functions": [],
            "forbidden_functions": [None],
        },
    }
}

GROUPS = ("primary", "admin", "operator", "guest")

_HEADER = """\
# User-group permissions of the RE Manager for this profile (bluesky-queueserver syntax).
# A plain name is an exact match; ":regex" is a regular expression searched in the name; null = everything.
#   primary, admin: every plan, and the simulator's fault injection (sim_* functions).
#   operator: measurements (measure_*, count, save_config) and corrections (correct_*, orbit_bump).
#   guest: measurements only (measure_*, count).
# Submit as a group with `acc-bluesky queue submit PLAN --group operator` (the API's default group is primary).
"""


def validate_permissions(permissions: dict[str, Any]) -> dict[str, Any]:
    """Check ``permissions`` against the queue server's schema; returns it or raises ``ValueError``."""
    from bluesky_queueserver.manager.profile_ops import validate_user_group_permissions

    try:
        validate_user_group_permissions(permissions)
    except Exception as err:
        raise ValueError(f"invalid user-group permissions: {err}") from err
    return permissions


def write_permissions(path: str | Path, permissions: dict[str, Any] | None = None) -> Path:
    """Write the permissions (default :data:`DEFAULT_PERMISSIONS`) as YAML to ``path``; returns the path."""
    perms = validate_permissions(copy.deepcopy(permissions or DEFAULT_PERMISSIONS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_HEADER + yaml.safe_dump(perms, sort_keys=False, default_flow_style=None))
    return path


def plan_allowed(plan: str, group: str, permissions: dict[str, Any] | None = None) -> bool:
    """Whether ``group`` may run ``plan`` under ``permissions`` (the RE Manager's own rule: root, then group)."""
    from .._compat.queueserver import plan_allowed_by_rules

    groups = (permissions or DEFAULT_PERMISSIONS)["user_groups"]
    if group not in groups:
        raise KeyError(f"unknown user group {group!r}; groups: {sorted(g for g in groups if g != 'root')}")
    for g in ("root", group):
        rules = groups[g]
        if not plan_allowed_by_rules(plan, rules.get("allowed_plans", []), rules.get("forbidden_plans", [])):
            return False
    return True
