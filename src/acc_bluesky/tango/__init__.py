"""The twin served as Tango devices, without a Tango database.

- :class:`TwinTangoServer` (:mod:`.server`): a :class:`~acc_bluesky.twin.Twin` as Tango devices (power supplies,
  families, BPMs, orbit, RF, tune monitor, beam current, the twin control device) named by the profile's Tango
  templates; ``acc-bluesky tango-server PROFILE`` or ``python -m acc_bluesky.tango PROFILE`` runs it, and
  ``connect(profile, mode="tango", address="127.0.0.1:PORT")`` reaches it.
- :func:`twin_device_name`, :func:`orbit_rms_names`, :func:`served_names`: the names only the twin's server has
  (the machine's are :func:`acc_bluesky.devices.backends.tango_names`).

pytango's server side is imported only by the process that serves, never by importing this package.
"""

from __future__ import annotations

from typing import Any

from .names import TWIN_ATTRIBUTES, orbit_rms_names, served_names, twin_device_name

__all__ = ["READY_MESSAGE", "TWIN_ATTRIBUTES", "TwinTangoServer", "orbit_rms_names", "served_names",
           "twin_device_name"]

_LAZY = {"TwinTangoServer": "server", "READY_MESSAGE": "server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
