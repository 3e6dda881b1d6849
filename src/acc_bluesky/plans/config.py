"""Machine configurations as runs (MML's ``getmachineconfig`` / ``setmachineconfig``).

``save_config`` records every setpoint (all magnet families, RF frequency and voltage) and the orbit in one run;
``restore_config`` puts a saved configuration back and records what changed; ``compare_config`` lists the
differences between two saved configurations or between one and the machine now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
from ..machine import Machine
from ..plan_stubs.machine import Record, emit, restore_setpoints, snapshot_setpoints
from ..plan_stubs.runs import find_run
from ..plan_stubs.tool import ToolResult, all_settings, open_tool_run, tool

__all__ = ["save_config", "restore_config", "compare_config", "machine_config", "ConfigDifferences"]


class ConfigDifferences(list):
    """A list of :class:`~acc_bluesky.analysis.ConfigDifference` that prints as a table."""

    def table(self, limit: int = 50) -> str:
        return format_differences(list(self), limit)

    def __str__(self) -> str:
        return self.table()


def _units(machine) -> dict[str, str]:
    return {n: f.units for n, f in machine.families.items()}


def _setpoint_record(name: str, total: int) -> Record:
    return Record(name, {
        "setpoints": ("A", (total,), "every family's setpoints, concatenated (start document: config_families, "
                                     "config_sizes)"),
        "rf_frequency": ("Hz", (), "RF frequency setpoint"),
        "rf_voltage": ("V", (), "RF voltage setpoint"),
    })


@tool("config", needs_beam=False)
def save_config(machine: Machine, name: str = "", md: dict | None = None) -> MsgGenerator[str]:
    """Save every setpoint of the machine as a run: all magnet families [A], RF frequency [Hz] and voltage [V].

    One event in the ``primary`` stream records the setpoints (all families concatenated: ``config-setpoints``,
    layout ``config_families``/``config_sizes`` in the start document), the RF and the orbit [m]; the results
    hold the configuration (``setpoints``, ``rf_frequency``, ``rf_voltage``) and the orbit (``orbit_x``,
    ``orbit_y``: usable as a golden orbit, ``correct_orbit(target=uid)``). Nothing moves.

    Args:
        machine: the connected machine.
        name: a label (``"golden"``, ``"injection"``, ...), searchable in the catalogue (``config_name``).
        md: metadata merged into the start document.

    Returns:
        the run uid; restore it with ``restore_config(machine, uid)``.
    """
    fams = list(machine.families)
    snap = yield from snapshot_setpoints(machine, fams, rf=True)
    res, layout = config_to_results(snap)
    yield from open_tool_run(config_name=name, **layout, bpm_names=machine.bpm.names, num_points=1)
    rec = _setpoint_record("config", int(res["setpoints"].size))
    rec.update(setpoints=res["setpoints"], rf_frequency=snap["RF:frequency"], rf_voltage=snap["RF:voltage"])
    ret = yield from emit(rec, machine.bpm)
    res["orbit_x"] = np.asarray(ret[machine.bpm.x.name]["value"], dtype=float)
    res["orbit_y"] = np.asarray(ret[machine.bpm.y.name]["value"], dtype=float)
    units = {"setpoints": "A", "rf_frequency": "Hz", "rf_voltage": "V", "orbit_x": "m", "orbit_y": "m"}
    desc = {"setpoints": "every family's setpoints, concatenated (start document: config_families, config_sizes)",
            "rf_frequency": "RF frequency setpoint", "rf_voltage": "RF voltage setpoint",
            "orbit_x": "horizontal orbit when saved", "orbit_y": "vertical orbit when saved"}
    return ToolResult(res, units, desc, value={**snap, "orbit_x": res["orbit_x"], "orbit_y": res["orbit_y"]})


def _load_config(machine: Machine, config: Any) -> MsgGenerator[tuple[dict[str, Any], str | None]]:
    """A configuration (``{family: array, "RF:frequency": Hz, "RF:voltage": V}``) from a run or a mapping,
    checked against the machine (families, sizes, limits) before anything moves."""
    uid = None
    if not (isinstance(config, Mapping) and not hasattr(config, "metadata")):
        uid = getattr(config, "uid", None) if not isinstance(config, str) else str.__str__(config)
        config = yield from find_run(config, tools=("config",), what="config")
        if isinstance(config, Mapping):
            config = {k: v for k, v in config.items() if k not in ("orbit_x", "orbit_y")}
    cfg = config_from_run(config)
    uid = uid or (config.metadata["start"]["uid"] if hasattr(config, "metadata") else None)
    for k, v in cfg.items():
        if k in RF_KEYS:
            continue
        if k not in machine.families:
            raise KeyError(f"the configuration has family {k!r} which this machine does not have "
                           f"(families: {sorted(machine.families)}); was it saved on another profile?")
        n = len(machine.families[k])
        if np.asarray(v).shape != (n,):
            raise ValueError(f"configuration family {k!r} has {np.asarray(v).size} setpoints, the machine {n}")
        machine.families[k].limits.check(k, v, machine.families[k].units, names=machine.families[k].names)
    if "RF:frequency" in cfg:
        machine.rf.frequency_limits.check("RF frequency", cfg["RF:frequency"], "Hz")
    if "RF:voltage" in cfg:
        machine.rf.voltage_limits.check("RF voltage", cfg["RF:voltage"], "V")
    return cfg, uid


_RESTORE_UNITS = {"n_changed": "", "delta_setpoints": "A", "delta_rf_frequency": "Hz", "delta_rf_voltage": "V"}
_RESTORE_DESCRIPTIONS = {
    "n_changed": "number of setpoints changed",
    "delta_setpoints": "change of every setpoint, restored - before (layout: config_families, config_sizes)",
    "delta_rf_frequency": "RF frequency change", "delta_rf_voltage": "RF voltage change"}


@tool("config_restore", restore=all_settings, keep=True, needs_beam=False)
def restore_config(machine: Machine, config: Any, md: dict | None = None) -> MsgGenerator[str]:
    """Put back a configuration saved by :func:`save_config`.

    Every family and the RF are validated first (names, sizes, limits: nothing moves on a bad configuration),
    then only the setpoints that differ are moved, all in parallel. Events: the setpoints before (``before``
    stream) and after (``primary``); results: the number of setpoints changed, the change of every setpoint
    (``delta_setpoints`` [A], layout in the start document) and of the RF. If interrupted or failing it puts the
    machine back as it was before the restore.

    Args:
        machine: the connected machine.
        config: a ``save_config`` run (uid, ``RE(...)``'s result, Tiled run) or
            ``{family: array, "RF:frequency": Hz, ...}``.
        md: metadata merged into the start document.

    Returns:
        the run uid.
    """
    cfg, src_uid = yield from _load_config(machine, config)
    fams = [k for k in cfg if k not in RF_KEYS]
    sizes = [len(machine.families[f]) for f in fams]
    yield from open_tool_run(config_source=src_uid, config_families=fams, config_sizes=sizes, num_points=1)
    rec = _setpoint_record("config", sum(sizes))

    def record(snap: dict[str, Any], stream: str) -> MsgGenerator[None]:
        res, _ = config_to_results({f: snap[f] for f in fams})
        rec.update(setpoints=res["setpoints"], rf_frequency=snap["RF:frequency"], rf_voltage=snap["RF:voltage"])
        yield from emit(rec, stream=stream)

    before = yield from snapshot_setpoints(machine, fams, rf=True)
    yield from record(before, "before")
    yield from restore_setpoints(machine, cfg)
    after = yield from snapshot_setpoints(machine, fams, rf=True)
    yield from record(after, "primary")
    diffs = _compare(before, after, units=_units(machine), names=machine.profile)
    res: dict[str, Any] = {
        "n_changed": np.asarray(len(diffs)),
        "delta_setpoints": np.concatenate([after[f] - before[f] for f in fams]) if fams else np.zeros(0),
        "delta_rf_frequency": np.asarray(after["RF:frequency"] - before["RF:frequency"]),
        "delta_rf_voltage": np.asarray(after["RF:voltage"] - before["RF:voltage"])}
    return ToolResult(res, _RESTORE_UNITS, _RESTORE_DESCRIPTIONS)


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


def compare_config(a: Any, b: Any, *, atol: float = 0.0, catalog: Any = None) -> ConfigDifferences:
    """The setpoints that differ between two configurations: runs (a Tiled run, ``RE(...)``'s result, or a uid of
    ``catalog``, default the default catalogue), mappings, or a Machine (its setpoints now). Prints as a table;
    each row is a :class:`~acc_bluesky.analysis.ConfigDifference` named by its device.

    Args:
        a, b: run / uid / mapping / machine.
        atol: ignore differences up to this (hardware units).
        catalog: where uids are looked up.
    """
    names = None
    units = None

    def resolve(v):
        nonlocal names, units
        if isinstance(v, Machine):
            names, units = v.profile, _units(v)
            return machine_config(v)
        run = getattr(v, "run", None)
        if run is not None and not callable(run):
            return config_from_run(run)
        if isinstance(v, str):
            from ..data import open_catalog
            from ..plan_stubs.tool import remembered

            hit = remembered(v)
            if hit is not None and hit[0] == "config":
                return {k: x for k, x in hit[1].items() if k not in ("orbit_x", "orbit_y")}

            return config_from_run((catalog if catalog is not None else open_catalog())[v])
        return config_from_run(v)

    ca, cb = resolve(a), resolve(b)
    diffs: list[ConfigDifference] = _compare(ca, cb, atol=atol, units=units, names=names)
    return ConfigDifferences(diffs)


