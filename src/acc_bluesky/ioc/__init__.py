"""The twin served as a live EPICS IOC, and the digital shadow that follows a live machine with a model.

- :class:`TwinIoc` (:mod:`.server`): a :class:`~acc_bluesky.twin.Twin` as EPICS records named by the profile's
  templates; ``acc-bluesky ioc PROFILE`` or ``python -m acc_bluesky.ioc serve PROFILE`` runs it.
- :class:`Shadow` (:mod:`.shadow`): follows the live setpoints through EPICS monitors into its own twin and
  publishes model predictions, residuals and an anomaly flag; ``acc-bluesky shadow PROFILE``.
- :func:`twin_pv_names`, :func:`orbit_rms_pv_names`, :func:`shadow_pv_names`: the extra PVs; :func:`magnet_pv`,
  :func:`bpm_pv`: one device's PV in the table of :func:`acc_bluesky.devices.pv_names`; :mod:`.commands`: the
  anomaly commands; :mod:`.autosave`: setpoint autosave and the PV list.

pythonSoftIOC is imported only by the processes that serve records, never by importing this package; nothing is
imported until a name is used (``acc-bluesky`` builds its parser from :mod:`.app`, which needs neither the twin nor
pyAT: every command line would otherwise pay their import).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "COMMAND_HELP",
    "FAULT_KEYS",
    "Command",
    "CommandError",
    "Observation",
    "Observer",
    "READY_MESSAGE",
    "Shadow",
    "ShadowConfig",
    "TwinIoc",
    "apply_command",
    "bpm_pv",
    "default_shadow_prefix",
    "magnet_pv",
    "one_turn_tunes",
    "orbit_rms_pv_names",
    "parse_command",
    "shadow_pv_names",
    "twin_pv_names",
]

#: name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("COMMAND_HELP", "Command", "CommandError", "apply_command", "parse_command"), "commands"),
    **dict.fromkeys(("FAULT_KEYS", "bpm_pv", "default_shadow_prefix", "magnet_pv", "orbit_rms_pv_names",
                     "shadow_pv_names", "twin_pv_names"), "names"),
    **dict.fromkeys(("Observation", "Observer", "one_turn_tunes"), "observe"),
    "TwinIoc": "server", "READY_MESSAGE": "server", "Shadow": "shadow", "ShadowConfig": "shadow",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
