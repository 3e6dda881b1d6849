"""Anomalies that can be switched on while plans run: stuck/dead correctors, dead BPMs, trips, beam loss."""

from __future__ import annotations

from typing import Any

import numpy as np


__all__ = ["Anomalies"]


class Anomalies:
    """Faults of one twin. Every switch takes effect at once (the twin recomputes on the next read).

    >>> twin.anomalies.stuck("HST", 3)      # setpoint changes are ignored by the power supply
    >>> twin.anomalies.dead("VST", 10)      # output 0 A, readback 0
    >>> twin.anomalies.dead_bpm(42)         # BPM 43 reads NaN
    >>> twin.anomalies.noisy_bpm(7, 5e-6)   # BPM 8 reads with 5 um rms more noise
    >>> twin.anomalies.frozen_bpm(9)        # BPM 10 repeats its last reading
    >>> twin.anomalies.trip("QF2")          # whole family's supply trips to 0
    >>> twin.anomalies.lose_beam()          # beam gone until twin.inject()
    >>> twin.anomalies.clear()
    """

    def __init__(self, twin: Any):
        self._twin = twin
        self._stuck: set[tuple[str, int]] = set()
        self._dead: set[tuple[str, int]] = set()
        self._tripped: set[str] = set()
        self.dead_bpms: set[int] = set()
        self.noisy_bpms: dict[int, float] = {}
        self.frozen_bpms: dict[int, tuple[float, float] | None] = {}
        self.beam_lost = False

    def _check(self, family: str, index: int | None = None) -> None:
        st = self._twin.family(family)
        if index is not None and not 0 <= index < len(st.refpts):
            raise IndexError(f"{family}: index {index} out of range 0..{len(st.refpts) - 1}")

    def stuck(self, family: str, index: int, on: bool = True) -> None:
        """The supply of ``family[index]`` stops following its setpoint."""
        with self._twin._lock:
            self._check(family, index)
            (self._stuck.add if on else self._stuck.discard)((family, index))
            if not on:
                st = self._twin.family(family)
                st.applied[index] = st.setpoint[index]
                self._twin._write(st, index)
            self._twin._touch()

    def dead(self, family: str, index: int, on: bool = True) -> None:
        """``family[index]`` delivers no field (readback 0) whatever its setpoint."""
        with self._twin._lock:
            self._check(family, index)
            (self._dead.add if on else self._dead.discard)((family, index))
            self._twin._write(self._twin.family(family), index)
            self._twin._touch()

    def trip(self, family: str, on: bool = True) -> None:
        """The whole family's power supply trips (field and readback 0) until ``trip(family, False)``."""
        with self._twin._lock:
            self._check(family)
            (self._tripped.add if on else self._tripped.discard)(family)
            self._twin._rewrite_family(family)

    def dead_bpm(self, index: int, on: bool = True) -> None:
        """BPM ``index`` reads NaN."""
        with self._twin._lock:
            self._check_bpm(index)
            (self.dead_bpms.add if on else self.dead_bpms.discard)(index)
            self._twin._touch()

    def _check_bpm(self, index: int) -> None:
        if not 0 <= index < self._twin.nbpm:
            raise IndexError(f"BPM index {index} out of range 0..{self._twin.nbpm - 1}")

    def noisy_bpm(self, index: int, rms: float = 5e-6, on: bool = True) -> None:
        """BPM ``index`` reads with ``rms`` [m] more noise in both planes (failing electronics), drawn from the
        twin's seeded noise generator."""
        rms = float(rms)
        if on and not (np.isfinite(rms) and rms > 0):
            raise ValueError(f"the extra noise of a noisy BPM must be > 0 m rms, got {rms!r}")
        with self._twin._lock:
            self._check_bpm(index)
            if on:
                self.noisy_bpms[index] = rms
            else:
                self.noisy_bpms.pop(index, None)
            self._twin._touch()

    def frozen_bpm(self, index: int, on: bool = True) -> None:
        """BPM ``index`` repeats its next reading from then on (a stalled acquisition) until ``on=False``."""
        with self._twin._lock:
            self._check_bpm(index)
            if on:
                self.frozen_bpms.setdefault(index, None)
            else:
                self.frozen_bpms.pop(index, None)
            self._twin._touch()

    def lose_beam(self) -> None:
        """The beam is lost (current 0, NaN orbit) until ``twin.inject()``."""
        with self._twin._lock:
            self.beam_lost = True
            self._twin._touch()

    def is_stuck(self, family: str, index: int) -> bool:
        return (family, index) in self._stuck

    def is_dead(self, family: str, index: int) -> bool:
        return (family, index) in self._dead

    def is_tripped(self, family: str) -> bool:
        return family in self._tripped

    def active(self) -> dict[str, list]:
        return {"stuck": sorted(self._stuck), "dead": sorted(self._dead), "tripped": sorted(self._tripped),
                "dead_bpms": sorted(self.dead_bpms), "noisy_bpms": sorted(self.noisy_bpms),
                "frozen_bpms": sorted(self.frozen_bpms), "beam_lost": self.beam_lost}

    def clear(self) -> None:
        """Remove every anomaly (stuck supplies jump to their setpoints)."""
        with self._twin._lock:
            stuck, dead, tripped = list(self._stuck), list(self._dead), list(self._tripped)
            self._stuck.clear()
            self._dead.clear()
            self._tripped.clear()
            self.dead_bpms.clear()
            self.noisy_bpms.clear()
            self.frozen_bpms.clear()
            self.beam_lost = False
            for fam, i in stuck + dead:
                st = self._twin.family(fam)
                st.applied[i] = st.setpoint[i]
                self._twin._write(st, i)
            for fam in tripped:
                self._twin._rewrite_family(fam)
            self._twin._touch()
