"""Physics meaning on every data key a device describes (DESIGN: units and meaning on every data key)."""

from __future__ import annotations

from typing import Any, ClassVar

from ophyd_async.core import StandardReadable

__all__ = ["Described"]


class Described(StandardReadable):
    """A ``StandardReadable`` whose data keys carry a ``description``: ``DESCRIPTIONS`` maps a child signal's name
    (``"x"``, ``"setpoint"``) to its physics meaning; :meth:`describe_signal` may refine it per device."""

    DESCRIPTIONS: ClassVar[dict[str, str]] = {}

    def describe_signal(self, child: str) -> str | None:
        return self.DESCRIPTIONS.get(child)

    def _add_descriptions(self, keys: dict[str, Any]) -> dict[str, Any]:
        prefix = f"{self.name}-" if self.name else ""
        for key, data_key in keys.items():
            child = key[len(prefix):] if prefix and key.startswith(prefix) else key
            text = self.describe_signal(child)
            if text and "description" not in data_key:
                data_key["description"] = text
        return keys

    async def describe(self) -> dict[str, Any]:
        return self._add_descriptions(dict(await super().describe()))

    async def describe_configuration(self) -> dict[str, Any]:
        return self._add_descriptions(dict(await super().describe_configuration()))
