"""Machine configurations (MML's ``getmachineconfig``/``setmachineconfig``): snapshots of every setpoint.

A configuration is ``{family: (n,) hardware setpoints, "RF:frequency": Hz, "RF:voltage": V}`` (the shape of
``Twin.snapshot()``); ``save_config`` stores it in a run, :func:`config_from_run` reads it back and
:func:`compare_config` lists what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import run_results, tool_run_start

__all__ = ["ConfigDifference", "compare_config", "config_from_run", "config_to_results", "format_differences",
           "split_setpoints", "RF_KEYS"]

RF_KEYS = ("RF:frequency", "RF:voltage")
_RF_RESULT = {"RF:frequency": "rf_frequency", "RF:voltage": "rf_voltage"}


def config_to_results(config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A configuration as run results and start-document layout.

    Returns ``(results, layout)``: results ``setpoints`` (every family's setpoints concatenated, hardware
    units), ``rf_frequency`` [Hz], ``rf_voltage`` [V]; layout ``{"config_families": [...],
    "config_sizes": [...]}`` (the order and sizes to split ``setpoints``). One array rather than one per family:
    each array is a node in Tiled, and a configuration is read and written as a whole.
    """
    fams = [k for k in config if k not in RF_KEYS]
    arrays = [np.asarray(config[f], dtype=float).reshape(-1) for f in fams]
    out: dict[str, np.ndarray] = {"setpoints": np.concatenate(arrays) if arrays else np.zeros(0)}
    for k, rk in _RF_RESULT.items():
        if k in config:
            out[rk] = np.asarray(float(config[k]))
    return out, {"config_families": fams, "config_sizes": [int(a.size) for a in arrays]}


def split_setpoints(vector: Any, families: Sequence[str], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Split a concatenated setpoint vector back into ``{family: array}``."""
    v = np.asarray(vector, dtype=float).reshape(-1)
    if sum(sizes) != v.size:
        raise ValueError(f"setpoint vector has {v.size} values, the layout says {sum(sizes)}")
    out, k = {}, 0
    for f, n in zip(families, sizes):
        out[str(f)] = v[k:k + int(n)].copy()
        k += int(n)
    return out


def config_from_run(run: Any) -> dict[str, Any]:
    """The configuration stored in a ``save_config`` run (``{family: array, "RF:frequency", "RF:voltage"}``), or a
    configuration mapping passed through.

    Args:
        run: a Tiled ``BlueskyRun``, or an already-made configuration mapping.
    """
    if isinstance(run, Mapping) and not hasattr(run, "metadata") and "start" not in run:
        return {k: (float(v) if k in RF_KEYS else np.asarray(v, dtype=float)) for k, v in run.items()}
    start = tool_run_start(run, "config", "config run")
    res = run_results(run)
    if "setpoints" not in res or "config_families" not in start:
        raise KeyError(f"run {start.get('uid', '?')[:8]} holds no configuration (results: {sorted(res)})")
    cfg: dict[str, Any] = split_setpoints(res["setpoints"], start["config_families"], start["config_sizes"])
    for key, rk in _RF_RESULT.items():
        if rk in res:
            cfg[key] = float(np.asarray(res[rk]).reshape(-1)[0])
    return cfg


@dataclass(frozen=True)
class ConfigDifference:
    """One setpoint that differs: device (``"HST_003"`` or ``"RF:frequency"``), values a and b, units."""

    device: str
    a: float
    b: float
    units: str = ""

    @property
    def delta(self) -> float:
        return self.b - self.a


def compare_config(a: Mapping[str, Any] | Any, b: Mapping[str, Any] | Any, *, atol: float = 0.0,
                   units: Mapping[str, str] | None = None,
                   names: Mapping[str, Sequence[str]] | Any = None) -> list[ConfigDifference]:
    """Every setpoint that differs between configurations ``a`` and ``b`` (mappings or config runs).

    Args:
        a, b: configurations (see module doc) or runs holding them.
        atol: differences up to this (hardware units) are ignored.
        units: family -> units (default ``A``; RF in Hz and V).
        names: family -> device names (or a profile), to name each difference by its device; default
            ``"<family>[<position>]"``.

    Returns:
        the differences in family order, then RF; a family present in only one side is reported per device with
        NaN on the missing side.
    """
    ca, cb = config_from_run(a), config_from_run(b)
    units = dict(units or {})
    if names is not None and hasattr(names, "families"):
        names = {f: fam.device_names for f, fam in names.families.items()}
    names = dict(names or {})
    out: list[ConfigDifference] = []
    fams = [k for k in ca if k not in RF_KEYS] + [k for k in cb if k not in RF_KEYS and k not in ca]
    for fam in fams:
        va = np.asarray(ca.get(fam, []), dtype=float).reshape(-1)
        vb = np.asarray(cb.get(fam, []), dtype=float).reshape(-1)
        n = max(va.size, vb.size)
        va = np.pad(va, (0, n - va.size), constant_values=np.nan)
        vb = np.pad(vb, (0, n - vb.size), constant_values=np.nan)
        diff = ~(np.abs(va - vb) <= atol)  # NaN counts as different
        for i in np.nonzero(diff)[0].tolist():
            dev = names[fam][i] if fam in names and i < len(names[fam]) else f"{fam}[{i}]"
            out.append(ConfigDifference(dev, float(va[i]), float(vb[i]), units.get(fam, "A")))
    for key, u in zip(RF_KEYS, ("Hz", "V")):
        if key in ca or key in cb:
            fa, fb = float(ca.get(key, np.nan)), float(cb.get(key, np.nan))
            if not abs(fa - fb) <= atol:
                out.append(ConfigDifference(key, fa, fb, u))
    return out


def format_differences(diffs: list[ConfigDifference], limit: int = 50) -> str:
    """A text table of differences (at most ``limit`` rows, then a count)."""
    if not diffs:
        return "no difference"
    lines = [f"{'device':<14}{'a':>16}{'b':>16}{'b - a':>14}  units"]
    for d in diffs[:limit]:
        lines.append(f"{d.device:<14}{d.a:>16.6g}{d.b:>16.6g}{d.delta:>14.4g}  {d.units}")
    if len(diffs) > limit:
        lines.append(f"... and {len(diffs) - limit} more ({len(diffs)} differences)")
    return "\n".join(lines)
