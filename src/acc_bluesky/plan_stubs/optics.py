"""Plan stubs of the optics tools (tune, chromaticity): averaged tune readings, family selection and moves.

Stubs never open a run; the plans in :mod:`acc_bluesky.plans.optics` compose them with the machine stubs of
:mod:`acc_bluesky.plan_stubs.machine` (snapshot/restore, limits, ``Record``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from .machine import BeamLostError

__all__ = ["TuneReading", "read_tunes", "resolve_families", "family_setpoints", "move_families"]


class TuneReading(NamedTuple):
    """What :func:`read_tunes` returns."""

    mean: np.ndarray  #: (2,) mean fractional tunes (qx, qy)
    std: np.ndarray  #: (2,) standard deviation of the readings
    samples: np.ndarray  #: (n_avg, 2) every reading
    readings: list[dict[str, Any]]  #: the raw bluesky readings of each event (all readables)


def read_tunes(machine, n_avg: int = 1, *, extra: Sequence[Any] = (), stream: str = "primary",
               where: str = "") -> MsgGenerator[TuneReading]:
    """Read the tune monitor ``n_avg`` times: one event each in ``stream`` with the beam current and ``extra``.

    Args:
        machine: the connected machine.
        n_avg: number of readings averaged.
        extra: more readables in the same events (a ``Record`` with the plan's step variables, the RF, ...).
        stream: event stream name.
        where: what the plan was doing, for the error message.

    Raises:
        BeamLostError: the tune monitor reads NaN (beam lost or no tune signal); the message says where.
    """
    n_avg = int(n_avg)
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg!r}")
    kx, ky = machine.tune.x.name, machine.tune.y.name
    kc = machine.beam.current.name
    samples = np.zeros((n_avg, 2))
    readings = []
    for i in range(n_avg):
        ret = yield from bps.trigger_and_read([machine.tune, machine.beam, *extra], name=stream)
        if ret is None:  # iterated without a RunEngine (list(plan))
            ret = {kx: {"value": 0.0}, ky: {"value": 0.0}, kc: {"value": 0.0}}
        q = np.array([ret[kx]["value"], ret[ky]["value"]], dtype=float)
        if not np.all(np.isfinite(q)):
            cur = float(ret.get(kc, {}).get("value", float("nan")))
            raise BeamLostError(
                f"beam lost{' ' + where if where else ''}: the tune monitor reads ({q[0]}, {q[1]}) and the beam "
                f"current is {cur:.3g} A. The plan stops and restores every setpoint it changed (and the RF "
                "frequency); the data taken so far are in the run. Refill (on the twin: machine.twin.inject()) "
                "and retry.")
        samples[i] = q
        readings.append(ret)
    return TuneReading(samples.mean(axis=0), samples.std(axis=0), samples, readings)


def resolve_families(machine, families: str | Iterable[str] | None, kind: str) -> list[str]:
    """Family names to use: ``None`` -> every family of ``kind`` (``"quadrupole"`` or ``"sextupole"``).

    Unknown names raise a ``KeyError`` listing the machine's families of that kind.
    """
    pool = machine.quad if kind == "quadrupole" else machine.sext if kind == "sextupole" else machine.families
    if families is None:
        names = list(pool)
        if not names:
            raise ValueError(f"the machine {machine.profile.name!r} has no {kind} family; pass families=[...]")
        return names
    if isinstance(families, str):
        families = [families]
    names = [str(f) for f in families]
    if not names:
        raise ValueError("families is empty")
    for n in names:
        if n not in machine.families:
            raise KeyError(f"unknown family {n!r}; {kind} families of {machine.profile.name!r}: {sorted(pool)}")
        if kind in ("quadrupole", "sextupole") and n not in pool:
            raise ValueError(f"family {n!r} is a {machine.families[n].type} family, not a {kind} family: this tool "
                             f"moves {kind}s ({kind} families of {machine.profile.name!r}: {sorted(pool)})")
    if len(set(names)) != len(names):
        raise ValueError(f"families listed twice: {names}")
    return names


def family_setpoints(machine, families: Iterable[str]) -> MsgGenerator[dict[str, np.ndarray]]:
    """Current hardware setpoints [A] of families, ``{name: array}``."""
    out = {}
    for n in families:
        v = yield from bps.rd(machine.families[n].setpoints)
        out[n] = np.array(v, dtype=float)
    return out


def move_families(machine, setpoints: Mapping[str, np.ndarray]) -> MsgGenerator[None]:
    """Move several families at once (``{name: setpoints [A]}``, one parallel move); the devices check limits."""
    args: list[Any] = []
    for n, v in setpoints.items():
        args += [machine.families[n], np.array(v, dtype=float)]
    if args:
        yield from bps.mv(*args)
