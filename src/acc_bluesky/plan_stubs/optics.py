"""Plan stubs of the optics tools (tune, chromaticity): read averaged tunes, step families, snapshot/restore.

Stubs never open a run; the plans in :mod:`acc_bluesky.plans.optics` compose them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..profile import LimitError
from ..twin import BeamLost

__all__ = [
    "StepInfo",
    "read_tunes",
    "resolve_families",
    "family_setpoints",
    "snapshot_optics",
    "restore_optics",
    "check_family_step",
    "move_families",
]


class StepInfo:
    """A tiny readable that puts the plan's own step variables in the events (family index, step, dp, ...).

    Each field is a number with units and a description, so the event stream says what every row is.

    Args:
        name: prefix of the data keys (``"<name>-<field>"``).
        fields: ``{field: (units, description)}``.
    """

    parent = None

    def __init__(self, name: str, fields: Mapping[str, tuple[str, str]]):
        self.name = name
        self._fields = dict(fields)
        self._values: dict[str, float] = {k: float("nan") for k in self._fields}

    def update(self, **values: float) -> None:
        """Set the values the next read reports."""
        for k, v in values.items():
            if k not in self._fields:
                raise KeyError(f"{self.name}: unknown field {k!r}; fields: {sorted(self._fields)}")
            self._values[k] = float(v)

    def read(self) -> dict[str, dict[str, Any]]:
        t = time.time()
        return {f"{self.name}-{k}": {"value": v, "timestamp": t} for k, v in self._values.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        return {f"{self.name}-{k}": {"source": f"acc_bluesky:{self.name}", "dtype": "number", "shape": [],
                                     "dtype_numpy": "<f8", "units": u, "description": d}
                for k, (u, d) in self._fields.items()}


def read_tunes(machine, n_avg: int = 1, *, extra: Sequence[Any] = (), stream: str = "primary",
               where: str = "") -> MsgGenerator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read the tune monitor ``n_avg`` times (one event each, with the beam current and ``extra`` readables).

    Args:
        machine: the connected machine.
        n_avg: number of readings averaged.
        extra: more readables in the same events (e.g. a :class:`StepInfo`, the RF).
        stream: event stream name.
        where: what the plan was doing, for the error message.

    Returns:
        ``(mean (2,), std (2,), samples (n_avg, 2))`` of the fractional tunes.

    Raises:
        BeamLost: the tune monitor reads NaN (beam lost or no tune signal); the message names the step.
    """
    if int(n_avg) < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg!r}")
    kx, ky = machine.tune.x.name, machine.tune.y.name
    kc = machine.beam.current.name
    samples = np.zeros((int(n_avg), 2))
    for i in range(int(n_avg)):
        ret = yield from bps.trigger_and_read([machine.tune, machine.beam, *extra], name=stream)
        q = np.array([ret[kx]["value"], ret[ky]["value"]], dtype=float)
        if not np.all(np.isfinite(q)):
            cur = ret.get(kc, {}).get("value", float("nan"))
            raise BeamLost(
                f"beam lost{' ' + where if where else ''}: the tune monitor reads ({q[0]}, {q[1]}) and the "
                f"beam current is {cur:.3g} A. The plan stopped and restored the settings it changed; "
                "the data taken so far are in the run. Refill (on the twin: machine.twin.inject()) and retry.")
        samples[i] = q
    return samples.mean(axis=0), samples.std(axis=0), samples


def resolve_families(machine, families: str | Iterable[str] | None, kind: str) -> list[str]:
    """Family names to use: ``None`` -> every family of ``kind`` ("quadrupole" or "sextupole") of the machine."""
    pool = machine.quad if kind == "quadrupole" else machine.sext if kind == "sextupole" else machine.families
    if families is None:
        names = list(pool)
        if not names:
            raise ValueError(f"the machine {machine.profile.name!r} has no {kind} family; pass families=[...]")
        return names
    if isinstance(families, str):
        families = [families]
    names = [str(f) for f in families]
    for n in names:
        if n not in machine.families:
            raise KeyError(f"unknown family {n!r}; {kind} families of {machine.profile.name!r}: {sorted(pool)}")
    if len(set(names)) != len(names):
        raise ValueError(f"families listed twice: {names}")
    if not names:
        raise ValueError("families is empty")
    return names


def family_setpoints(machine, families: Iterable[str]) -> MsgGenerator[dict[str, np.ndarray]]:
    """Current hardware setpoints [A] of families, ``{name: array}``."""
    out = {}
    for n in families:
        v = yield from bps.rd(machine.families[n].setpoints)
        out[n] = np.array(v, dtype=float)
    return out


def snapshot_optics(machine, families: Iterable[str], rf: bool = False) -> MsgGenerator[dict[str, Any]]:
    """What an optics plan may change: setpoints of ``families`` [A] and (``rf``) the RF frequency [Hz]."""
    snap: dict[str, Any] = {"families": (yield from family_setpoints(machine, families))}
    if rf:
        snap["rf"] = float((yield from bps.rd(machine.rf.frequency)))
    return snap


def restore_optics(machine, snapshot: Mapping[str, Any]) -> MsgGenerator[None]:
    """Put back exactly what :func:`snapshot_optics` saved (all families and the RF in one parallel move)."""
    args: list[Any] = []
    for n, v in snapshot.get("families", {}).items():
        args += [machine.families[n], np.array(v, dtype=float)]
    if snapshot.get("rf") is not None:
        args += [machine.rf, float(snapshot["rf"])]
    if args:
        yield from bps.mv(*args)


def check_family_step(machine, name: str, new: np.ndarray, what: str) -> None:
    """Refuse (``LimitError``) a family setting past its limits before anything moves."""
    fam = machine.families[name]
    try:
        fam.limits.check(name, new, fam.units)
    except LimitError as err:
        raise LimitError(f"{what}: {err}") from None


def move_families(machine, setpoints: Mapping[str, np.ndarray]) -> MsgGenerator[None]:
    """Move several families at once (``{name: setpoints [A]}``), limits checked by the devices."""
    args: list[Any] = []
    for n, v in setpoints.items():
        args += [machine.families[n], np.array(v, dtype=float)]
    if args:
        yield from bps.mv(*args)
