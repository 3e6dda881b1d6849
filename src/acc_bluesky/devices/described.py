"""The base of every device: physics meaning on every data key, and the read format its backend asks for."""

from __future__ import annotations

from typing import Any, ClassVar

from ophyd_async.core import StandardReadable, StandardReadableFormat

__all__ = ["Described", "formats", "read_cached"]


def formats(backend) -> tuple[StandardReadableFormat, StandardReadableFormat]:
    """``(hinted, plain)`` read formats for the signals of a device on ``backend``.

    On the twin every read is an acquisition (:attr:`SimBackend.stage_signals` is False): signals are read
    uncached, never staged into a monitor cache. On EPICS they are staged (camonitor subscriptions).
    """
    if getattr(backend, "stage_signals", True):
        return StandardReadableFormat.HINTED_SIGNAL, StandardReadableFormat.CHILD
    return StandardReadableFormat.HINTED_UNCACHED_SIGNAL, StandardReadableFormat.UNCACHED_SIGNAL


def read_cached(backend) -> bool | None:
    """The ``cached`` argument of ``signal.read(cached=...)`` that reads a signal of a device on ``backend`` as the
    device itself does (:func:`formats`): ``False`` on the twin (every read an acquisition), else ``None`` (the
    monitor's cache when staged)."""
    return None if getattr(backend, "stage_signals", True) else False


class Described(StandardReadable):
    """A ``StandardReadable`` whose data keys carry a ``description``: ``DESCRIPTIONS`` maps a child signal's name
    (``"x"``, ``"setpoint"``) to its physics meaning; :meth:`describe_signal` may refine it per device.

    A data key equal to the device's own name (a movable's readback, named as its device) is the child
    ``"readback"``.
    """

    DESCRIPTIONS: ClassVar[dict[str, str]] = {}

    def describe_signal(self, child: str) -> str | None:
        return self.DESCRIPTIONS.get(child)

    def _add_descriptions(self, keys: dict[str, Any]) -> dict[str, Any]:
        prefix = f"{self.name}-" if self.name else ""
        for key, data_key in keys.items():
            if key == self.name:
                child = "readback"
            else:
                child = key[len(prefix):] if prefix and key.startswith(prefix) else key
            text = self.describe_signal(child)
            if text and "description" not in data_key:
                data_key["description"] = text
        return keys

    async def describe(self) -> dict[str, Any]:
        return self._add_descriptions(dict(await super().describe()))

    async def describe_configuration(self) -> dict[str, Any]:
        return self._add_descriptions(dict(await super().describe_configuration()))
