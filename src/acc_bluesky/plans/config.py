"""Machine configurations as runs (MML's ``getmachineconfig`` / ``setmachineconfig``).

``save_config`` records every setpoint (all magnet families, RF frequency and voltage) and the orbit in one run;
``restore_config`` puts a saved configuration back and records what changed; ``compare_config`` lists the
differences between two saved configurations or between one and the machine now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis.config import (
    RF_KEYS,
    ConfigDifference,
    config_from_run,
    config_to_results,
    format_differences,
)
from ..analysis.config import compare_config as _compare
from ..plan_stubs.machine import (
    Record,
    emit,
    read_orbit,
    restore_setpoints,
    restoring,
    snapshot_setpoints,
)
from ..plan_stubs.results import store_result
from .orbit import _catalog_run, _metadata

__all__ = ["save_config", "restore_config", "compare_config", "machine_config", "ConfigDifferences"]


class ConfigDifferences(list):
    """A list of :class:`~acc_bluesky.analysis.ConfigDifference` that prints as a table."""

    def table(self, limit: int = 50) -> str:
        return format_differences(list(self), limit)

    def __str__(self) -> str:
        return self.table()


def _units(machine) -> dict[str, str]:
    return {n: f.units for n, f in machine.families.items()}


def save_config(machine, name: str = "", md: dict | None = None) -> MsgGenerator[str]:
    """Save every setpoint of the machine as a run: all magnet families [A], RF frequency [Hz] and voltage [V].

    One event in the ``primary`` stream reads the family setpoint waveforms, the RF and the orbit; the results
    hold the configuration (``sp_<family>``, ``rf_frequency``, ``rf_voltage``) and the orbit (``orbit_x``,
    ``orbit_y`` [m]: usable as a golden orbit, ``correct_orbit(target=uid)``). Nothing moves.

    Args:
        machine: the connected machine.
        name: a label (``"golden"``, ``"injection"``, ...), searchable in the catalogue (``config_name``).
        md: metadata merged into the start document.

    Returns:
        the run uid; restore it with ``restore_config(machine, uid)``.
    """
    fams = list(machine.families)
    _md = _metadata("config", machine, {"name": name}, {"config_name": name, "families": fams,
                                                         "bpm_names": list(machine.bpm.names), "num_points": 1},
                    md, "save_config")

    def inner() -> MsgGenerator[None]:
        yield from bps.create("primary")
        for f in fams:
            yield from bps.read(machine.families[f].setpoints)
        yield from bps.read(machine.rf)
        yield from bps.read(machine.bpm)
        yield from bps.save()
        snap = yield from snapshot_setpoints(machine, fams, rf=True)
        x, y = yield from read_orbit(machine, 1, check=False)
        res = config_to_results(snap)
        res["orbit_x"], res["orbit_y"] = x, y
        units = {f"sp_{f}": machine.families[f].units for f in fams} | {
            "rf_frequency": "Hz", "rf_voltage": "V", "orbit_x": "m", "orbit_y": "m"}
        desc = {f"sp_{f}": f"{f} setpoints" for f in fams} | {
            "rf_frequency": "RF frequency setpoint", "rf_voltage": "RF voltage setpoint",
            "orbit_x": "horizontal orbit when saved", "orbit_y": "vertical orbit when saved"}
        yield from store_result(res, units=units, descriptions=desc)

    return (yield from bpp.run_wrapper(inner(), md=_md))


def _load_config(machine, config: Any) -> tuple[dict[str, Any], str | None]:
    uid = None
    if isinstance(config, str):
        uid = config
        config = _catalog_run(config)
    elif hasattr(config, "metadata"):
        uid = config.metadata.get("start", {}).get("uid")
    cfg = config_from_run(config)
    for k, v in cfg.items():
        if k in RF_KEYS:
            continue
        if k not in machine.families:
            raise KeyError(f"the configuration has family {k!r} which this machine does not have "
                           f"(families: {sorted(machine.families)}); was it saved on another profile?")
        n = len(machine.families[k])
        if np.asarray(v).shape != (n,):
            raise ValueError(f"configuration family {k!r} has {np.asarray(v).size} setpoints, the machine {n}")
        machine.families[k].limits.check(k, v, machine.families[k].units)
    if "RF:frequency" in cfg:
        machine.rf.frequency_limits.check("RF frequency", cfg["RF:frequency"], "Hz")
    if "RF:voltage" in cfg:
        machine.rf.voltage_limits.check("RF voltage", cfg["RF:voltage"], "V")
    return cfg, uid


def restore_config(machine, uid_or_run: Any, md: dict | None = None) -> MsgGenerator[str]:
    """Put back a configuration saved by :func:`save_config` (by uid, Tiled run, or a mapping).

    Every family and the RF are validated first (names, sizes, limits: nothing moves on a bad configuration),
    then only the setpoints that differ are moved, all in parallel. Events: the setpoints before (``before``
    stream) and after (``primary``); results: the number of setpoints changed and, per family, the change [A].
    If interrupted or failing it puts the machine back as it was before the restore.

    Args:
        machine: the connected machine.
        uid_or_run: uid of a ``save_config`` run, the run itself, or ``{family: array, "RF:frequency": Hz, ...}``.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    cfg, src_uid = _load_config(machine, uid_or_run)
    fams = [k for k in cfg if k not in RF_KEYS]
    _md = _metadata("config_restore", machine, {"source": src_uid or "mapping"},
                    {"config_source": src_uid, "families": fams, "num_points": 1}, md,
                    "restore_config")

    def readables():
        return [machine.families[f].setpoints for f in fams] + [machine.rf]

    def inner() -> MsgGenerator[None]:
        before = yield from snapshot_setpoints(machine, fams, rf=True)
        yield from emit(*readables(), stream="before")
        moved = yield from restore_setpoints(machine, cfg)
        yield from emit(*readables(), stream="primary")
        diffs = _compare(before, cfg, units=_units(machine))
        res: dict[str, Any] = {"n_changed": np.asarray(len(diffs))}
        units = {"n_changed": ""}
        desc = {"n_changed": "number of setpoints changed"}
        for f in fams:
            res[f"delta_{f}"] = np.asarray(cfg[f], dtype=float) - before[f]
            units[f"delta_{f}"] = machine.families[f].units
            desc[f"delta_{f}"] = f"{f} change (restored - before)"
        for key, rk, u in (("RF:frequency", "delta_rf_frequency", "Hz"), ("RF:voltage", "delta_rf_voltage", "V")):
            if key in cfg:
                res[rk] = np.asarray(float(cfg[key]) - float(before[key]))
                units[rk] = u
                desc[rk] = f"{key} change"
        del moved
        yield from store_result(res, units=units, descriptions=desc)

    return (yield from restoring(machine, bpp.run_wrapper(inner(), md=_md), families=fams, rf=True,
                                 on_success=False))


def machine_config(machine) -> dict[str, Any]:
    """The machine's setpoints now, read outside any plan (on the bluesky event loop): ``{family: array, RF}``."""
    from bluesky.run_engine import call_in_bluesky_event_loop

    async def read():
        out: dict[str, Any] = {}
        for n, f in machine.families.items():
            out[n] = np.array(await f.setpoints.get_value(), dtype=float)
        out["RF:frequency"] = float(await machine.rf.frequency.get_value())
        out["RF:voltage"] = float(await machine.rf.voltage.get_value())
        return out

    return call_in_bluesky_event_loop(read())


def compare_config(a: Any, b: Any, *, atol: float = 0.0) -> ConfigDifferences:
    """The setpoints that differ between two configurations: runs (uid or Tiled run), mappings, or a Machine
    (its setpoints now). Prints as a table; each row is a :class:`~acc_bluesky.analysis.ConfigDifference`.

    Args:
        a, b: uid / run / mapping / machine.
        atol: ignore differences up to this (hardware units).
    """
    def resolve(v):
        if hasattr(v, "families") and hasattr(v, "rf") and hasattr(v, "bpm"):
            return machine_config(v)
        if isinstance(v, str):
            return config_from_run(_catalog_run(v))
        if isinstance(v, Mapping) and not hasattr(v, "metadata"):
            return v
        return config_from_run(v)

    units = None
    for v in (a, b):
        if hasattr(v, "families") and hasattr(v, "bpm"):
            units = _units(v)
    diffs: list[ConfigDifference] = _compare(resolve(a), resolve(b), atol=atol, units=units)
    return ConfigDifferences(diffs)
