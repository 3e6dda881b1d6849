"""Beam plan stubs (never open a run): the BPM acquisition mode, pinger and injection shots, trajectory readings,
corrector vectors moved family by family, and the snapshot/restore of the beam devices' settings.

Units: positions [m], kicks [rad], injection trims m / rad (energy dp/p), correctors [A].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import Msg, MsgGenerator

from ..analysis._common import corrector_table
from .machine import move

__all__ = [
    "BeamDevicesMissing",
    "CorrectorVector",
    "beam_settings",
    "need_beam_devices",
    "read_shots",
    "restore_beam_settings",
    "set_acquisition",
    "shot",
]

_GROUP = iter(range(1 << 62))


class BeamDevicesMissing(RuntimeError):
    """The machine has no BPM acquisition modes, pinger or injection devices (an EPICS profile without
    ``controls.beam_pvs``, Tango)."""


def need_beam_devices(machine, tool: str) -> None:
    """Refuse a tool on a machine without beam devices, saying why."""
    if getattr(machine, "tbt", None) is None or getattr(machine, "injection", None) is None:
        raise BeamDevicesMissing(
            f"{tool}: {machine.profile.name} ({machine.mode}) has no turn-by-turn BPM acquisition, pinger or "
            "injection devices: the profile has no controls.beam_pvs (PVs of the BPM mode, TbT waveforms, pinger, "
            "injection and loss monitor). Nothing was moved.")


def beam_settings(machine) -> MsgGenerator[dict[str, Any]]:
    """The settings of the beam devices: BPM mode and turns, pinger kicks, injection trims (a snapshot)."""
    out: dict[str, Any] = {}
    out["mode"] = str((yield from _rd(machine.tbt.mode)))
    out["turns"] = int((yield from _rd(machine.tbt.turns)))
    if machine.pinger is not None:
        out["kick"] = [float((yield from _rd(machine.pinger.kick_x))), float((yield from _rd(machine.pinger.kick_y)))]
    out["injection"] = yield from injection_trims(machine)
    return out


def injection_trims(machine) -> MsgGenerator[list[float]]:
    """The present values of the injection knobs (``machine.injection.knobs()``: x, px, y, py first)."""
    trims = []
    for s in machine.injection.knobs():
        trims.append(float((yield from _rd(s))))
    return trims


def _rd(signal) -> MsgGenerator[Any]:
    ret = yield from bps.rd(signal)
    return 0 if ret is None else ret


def restore_beam_settings(machine, snap: Mapping[str, Any], *, injection: bool = True, acquisition: bool = True,
                          kick: bool = True) -> MsgGenerator[None]:
    """Put back the settings of a :func:`beam_settings` snapshot (those asked for)."""
    pairs: list[Any] = []
    if kick and "kick" in snap and machine.pinger is not None:
        pairs += [machine.pinger.kick_x, snap["kick"][0], machine.pinger.kick_y, snap["kick"][1]]
    if injection and "injection" in snap:
        for sig, v in zip(machine.injection.knobs(), snap["injection"]):
            pairs += [sig, v]
    if pairs:
        yield from move(*pairs)
    if acquisition and "mode" in snap:
        yield from move(machine.tbt.mode, snap["mode"])
        if snap["mode"] != "orbit":
            yield from move(machine.tbt.turns, int(snap["turns"]))


def set_acquisition(machine, mode: str, turns: int | None = None) -> MsgGenerator[None]:
    """Put the BPM system in ``mode`` (``orbit``, ``trajectory``, ``tbt``), with ``turns`` for the last two."""
    yield from move(machine.tbt.mode, mode)
    if turns is not None:
        yield from move(machine.tbt.turns, int(turns))


def shot(machine, trigger) -> MsgGenerator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Fire ``trigger`` (``machine.pinger`` or ``machine.injection``) and read what the BPMs recorded.

    Returns:
        ``(x, y, losses)``: (n_bpm, turns) readings [m] (NaN where no beam) and the loss monitor's reading
        ``{field: value}`` (``turns_reached``, ``bpms_reached``, ``lost_turn``, ...).
    """
    group = f"acc-shot-{next(_GROUP)}"
    yield Msg("trigger", trigger, group=group)
    yield Msg("wait", None, group=group)
    ret = yield Msg("read", machine.tbt)
    n = len(machine.bpm)
    if ret is None:  # iterated without a RunEngine
        return np.zeros((n, 1)), np.zeros((n, 1)), {}
    x = np.asarray(ret[machine.tbt.x.name]["value"], dtype=float).reshape(n, -1)
    y = np.asarray(ret[machine.tbt.y.name]["value"], dtype=float).reshape(n, -1)
    loss = yield Msg("read", machine.losses)
    prefix = f"{machine.losses.name}-"
    losses = {k.removeprefix(prefix): v["value"] for k, v in (loss or {}).items()}
    return x, y, losses


def read_shots(machine, trigger, n_avg: int = 1) -> MsgGenerator[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """``n_avg`` shots averaged: (n_bpm, turns) x, y [m] (NaN where any shot had no beam) and each shot's losses."""
    sx = sy = None
    losses = []
    for _ in range(int(n_avg)):
        x, y, lo = yield from shot(machine, trigger)
        sx = x if sx is None else sx + x
        sy = y if sy is None else sy + y
        losses.append(lo)
    return sx / n_avg, sy / n_avg, losses


class CorrectorVector:
    """Correctors as one vector [A] (the columns of a trajectory response), read and moved family by family.

    Args:
        machine: the connected machine.
        names: corrector device names (default every in-service corrector, h then v).
    """

    def __init__(self, machine, names: Sequence[str] | None = None):
        self.machine = machine
        self.rows = corrector_table(machine.profile, None if names is None else list(names))
        self.names = [r[0] for r in self.rows]
        self.families = list(dict.fromkeys(r[1] for r in self.rows))
        self._cols = {f: np.array([j for j, r in enumerate(self.rows) if r[1] == f]) for f in self.families}
        self._idx = {f: np.array([r[2] for r in self.rows if r[1] == f]) for f in self.families}
        self.low = np.array([machine.family(r[1]).limits.low for r in self.rows], dtype=float)
        self.high = np.array([machine.family(r[1]).limits.high for r in self.rows], dtype=float)
        self._full: dict[str, np.ndarray] = {}

    def read(self) -> MsgGenerator[np.ndarray]:
        """Present setpoints (m,) [A]."""
        sp = np.zeros(len(self.rows))
        for f in self.families:
            v = yield from _rd(self.machine.family(f).setpoints)
            full = np.asarray(v, dtype=float) if np.ndim(v) else np.zeros(len(self.machine.family(f).refpts))
            self._full[f] = full.copy()
            sp[self._cols[f]] = full[self._idx[f]]
        return sp

    def set(self, values: np.ndarray) -> MsgGenerator[None]:
        """Move to the absolute setpoints ``values`` (m,) [A]: one move of each family whose setpoints change."""
        v = np.asarray(values, dtype=float).reshape(len(self.rows))
        if not self._full:
            yield from self.read()
        pairs: list[Any] = []
        for f in self.families:
            full = self._full[f].copy()
            full[self._idx[f]] = v[self._cols[f]]
            if not np.array_equal(full, self._full[f]):
                pairs += [self.machine.family(f), full]
                self._full[f] = full
        if pairs:
            yield from move(*pairs)
