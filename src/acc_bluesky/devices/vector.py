"""A ``DeviceVector`` indexed by position or by device name, whose devices are named by their device names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ophyd_async.core import DeviceVector

__all__ = ["NamedVector"]


class NamedVector(DeviceVector):
    """Devices ``0..n-1`` (a family's magnets, the BPMs): ``v[i]`` by position (the order of the family's arrays)
    or ``v["HST_004"]`` by device name.

    Every device is named by its device name (``HST_004``, data keys ``HST_004-setpoint``...), whatever the
    vector's own name: one name per device everywhere (profile, PV templates, data keys, lookups).
    ``what`` (e.g. ``"HST"``, ``"BPM"``) makes the messages of bad keys.
    """

    def __init__(self, children: dict[int, Any], what: str, device_names: Sequence[str], name: str = "") -> None:
        self._what = what
        self._device_names = list(device_names)
        self._by_name = {n: i for i, n in enumerate(self._device_names)}
        super().__init__(children, name=name)

    @property
    def names(self) -> list[str]:
        """Device names, in position order."""
        return list(self._device_names)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        for i, child in self.items():
            child.set_name(self._device_names[i])

    def index_of(self, device: str | int) -> int:
        """Position of a device given by name (``"HST_004"``) or position; unknown ones list the valid ones."""
        if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
            if not 0 <= int(device) < len(self._device_names):
                raise KeyError(f"{self._what}: position {device} out of range 0..{len(self._device_names) - 1} "
                               f"(or give a device name {self._device_names[0]} ... {self._device_names[-1]})")
            return int(device)
        i = self._by_name.get(device) if isinstance(device, str) else None
        if i is None:
            close = [n for n in self._device_names if str(device).lower() in n.lower()][:5]
            raise KeyError(f"{self._what}: unknown device {device!r}; valid names: {self._device_names[0]} ... "
                           f"{self._device_names[-1]}" + (f" (did you mean {close}?)" if close else ""))
        return i

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self.index_of(key))

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return key in self._by_name
        return super().__contains__(key)
