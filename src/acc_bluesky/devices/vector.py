"""A ``DeviceVector`` indexed by position or by device name, whose bad keys say what the valid ones are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ophyd_async.core import DeviceVector

__all__ = ["NamedVector"]


class NamedVector(DeviceVector):
    """Devices ``0..n-1`` (a family's magnets, the BPMs); ``v[i]`` or ``v["HST:003"]`` by device name.

    ``what`` (e.g. ``"HST"``, ``"BPM"``) and ``device_names`` (one per device) make the messages of bad keys.
    """

    def __init__(self, children: dict[int, Any], what: str, device_names: Sequence[str], name: str = "") -> None:
        self._what = what
        self._device_names = list(device_names)
        super().__init__(children, name=name)

    def index_of(self, device: str | int) -> int:
        """Index of a device by name (``"HST:003"``) or int; unknown names list valid ones."""
        if isinstance(device, (int, np.integer)):
            if not 0 <= int(device) < len(self._device_names):
                raise KeyError(f"{self._what}: index {device} out of range 0..{len(self._device_names) - 1}")
            return int(device)
        if device in self._device_names:
            return self._device_names.index(device)
        raise KeyError(f"{self._what}: unknown device {device!r}; valid names: "
                       f"{self._device_names[:4]} ... {self._device_names[-1]}")

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(self.index_of(key) if isinstance(key, str) else key)
        except (KeyError, TypeError):
            n = len(self._device_names)
            raise KeyError(
                f"{self._what}: no device {key!r}; give an index 0..{n - 1} or a name "
                f"{self._device_names[0]} ... {self._device_names[-1]}") from None
