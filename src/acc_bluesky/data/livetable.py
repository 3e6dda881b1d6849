"""A live table of a run's scalar readings with their units, for interactive sessions.

bluesky's ``LiveTable`` (what the BestEffortCallback prints) shows the hinted fields without their units, and skips
arrays: an orbit read shows only ``seq_num`` and ``time``. :class:`LiveReadings` shows, for each event of the
primary stream, every hinted scalar field (``bpm-x_rms``, ``tune-x``, ``beam-current``, a tool's step variables)
with its unit in the heading: ``bpm-x_rms [m]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from bluesky.callbacks.core import CallbackBase

__all__ = ["LiveReadings"]

_NUMERIC = ("number", "integer", "boolean")


class LiveReadings(CallbackBase):
    """Print the scalar readings of each event with their units.

    Args:
        fields: data keys to show; default: the descriptor's hinted fields (every device's ``hints``) that are
            scalar numbers.
        stream: the event stream shown.
        out: where lines go (``print``).
        width: minimum column width.
    """

    def __init__(self, fields: Sequence[str] | None = None, *, stream: str = "primary",
                 out: Callable[[str], Any] = print, width: int = 12):
        super().__init__()
        self._want = list(fields) if fields is not None else None
        self._stream = stream
        self._out = out
        self._width = width
        self._descriptors: dict[str, list[tuple[str, int, str]]] = {}

    def start(self, doc):
        self._descriptors.clear()

    def descriptor(self, doc):
        if doc.get("name") != self._stream:
            return
        keys = doc.get("data_keys", {})
        if self._want is not None:
            names = [k for k in self._want if k in keys]
        else:
            names = [f for dev in (doc.get("hints") or {}).values() for f in dev.get("fields", [])]
        cols = []
        for k in names:
            dk = keys.get(k, {})
            if dk.get("dtype") not in _NUMERIC or dk.get("shape"):
                continue
            head = f"{k} [{dk['units']}]" if dk.get("units") else k
            cols.append((k, max(self._width, len(head) + 2), head))
        self._descriptors[doc["uid"]] = cols
        line = "+" + "+".join("-" * w for _, w, _ in [("seq", 6, ""), ("time", 10, ""), *cols]) + "+"
        self._out(line)
        self._out("|" + "|".join(h.rjust(w - 1) + " " for _, w, h in [("", 6, "seq"), ("", 10, "time"), *cols])
                  + "|")
        self._out(line)

    def event(self, doc):
        cols = self._descriptors.get(doc.get("descriptor"))
        if cols is None:
            return
        cells = [str(doc.get("seq_num", "")).rjust(5) + " ", time.strftime("%H:%M:%S", time.localtime(doc["time"]))
                 .rjust(9) + " "]
        for k, w, _ in cols:
            v = doc["data"].get(k)
            text = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            cells.append(text.rjust(w - 1) + " ")
        self._out("|" + "|".join(cells) + "|")
