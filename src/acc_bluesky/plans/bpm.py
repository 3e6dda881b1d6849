"""BPM monitoring (MML's ``monbpm``): repeated orbit readings, each BPM's mean and noise, dead / frozen / noisy BPMs.

The analysis is :func:`acc_bluesky.analysis.bpm_statistics`; read a run back with
``BpmStatistics.from_run(cat[uid])``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis.bpm import NOISY_FACTOR, BpmStatistics, bpm_statistics, check_noisy_factor
from ..machine import Machine
from ..plan_stubs.machine import BeamLostError, Record, emit, read_orbit
from ..plan_stubs.tool import open_tool_run, thread_safe_figure, tool

__all__ = ["monitor_bpms"]


@thread_safe_figure
def _noise_figure(result: BpmStatistics, path: Path) -> None:
    result.plot(path)


@tool("bpm_statistics", needs_beam=False, figures={"bpm_noise": _noise_figure})
def monitor_bpms(machine: Machine, n_readings: int = 100, period: float | None = None,
                 noisy_factor: float = NOISY_FACTOR, figure_dir: str | Path | bool | None = None,
                 md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Read the orbit ``n_readings`` times and give every BPM its mean, its noise and a verdict (MML's ``monbpm``).

    Nothing moves. Each reading is one event in ``primary`` (``x``, ``y`` at every BPM [m]). Per BPM and plane the
    mean and the standard deviation of the readings are stored; the noise floor of a plane is the median standard
    deviation of the in-service BPMs; in-service BPMs are flagged **dead** (a reading not a number), **frozen**
    (exactly the same reading every time while the floor is above zero: a stalled acquisition) or **noisy**
    (standard deviation above ``noisy_factor`` times the floor). A dead BPM does not stop the plan (finding it is
    the point); no BPM reading at all does (the beam is gone: :class:`BeamLostError`, the readings taken so far
    stay in the run). Figure ``bpm_noise``: the noise of every BPM along the ring, the floor and the flagged BPMs.

    Args:
        machine: the connected machine.
        n_readings: orbit readings (>= 2; the relative error of one BPM's noise is about ``1/sqrt(2 n_readings)``:
            7 % at 100).
        period: wait before each reading [s]; default ``1 / profile.bpm.rate`` when the BPMs acquire at a rate
            (every reading a fresh acquisition), else 0.
        noisy_factor: threshold of a noisy BPM, in units of its plane's noise floor (> 1).
        figure_dir: folder of the figure; ``False``: none.
        md: metadata merged into the start document.

    Returns:
        the run uid; ``BpmStatistics.from_run(cat[uid])`` gives ``mean``, ``std`` (n, 2) [m], ``noise`` (2,) [m],
        the flags and ``suspect`` (the names of the flagged in-service BPMs).
    """
    n = int(n_readings)
    if n != n_readings or n < 2:
        raise ValueError(f"n_readings must be an integer >= 2 (a noise needs two readings), got {n_readings!r}")
    factor = check_noisy_factor(noisy_factor)  # (refused before the run opens)
    if period is not None and not (np.isfinite(float(period)) and float(period) >= 0):
        raise ValueError(f"period must be a time >= 0 s, got {period!r}")
    current = float((yield from bps.rd(machine.beam.current)))
    if not current > 0:
        raise BeamLostError(f"no beam to monitor the BPMs with: the beam current reads {current:g} A. Nothing was "
                            "read; inject (on the twin: machine.twin.inject()) and retry.", [])
    bpm = machine.bpm
    names, good = list(bpm.names), np.asarray(bpm.good, dtype=bool)
    nb = len(names)
    yield from open_tool_run(bpm_names=names, bpm_s=np.asarray(bpm.s, dtype=float).tolist(), num_points=n)
    rec = Record("bpm_reading", {
        "reading": ("", (), "reading number (1-based)"),
        "x": ("m", (nb,), "horizontal reading of every BPM"), "y": ("m", (nb,), "vertical reading of every BPM"),
    }, hinted=("reading",), dtypes={"reading": "integer"})
    xs, ys = np.empty((n, nb)), np.empty((n, nb))
    for k in range(n):
        x, y = yield from read_orbit(machine, 1, check=False, period=period)
        if good.any() and not (np.isfinite(x[good]).any() or np.isfinite(y[good]).any()):
            raise BeamLostError(f"beam lost while monitoring the BPMs: every in-service BPM reads NaN at reading "
                                f"{k + 1} of {n}. The {k} readings taken so far are in the run; inject (on the twin: "
                                "machine.twin.inject()) and retry.", names)
        xs[k], ys[k] = x, y
        rec.update(reading=k + 1, x=x, y=y)
        yield from emit(rec)
    return bpm_statistics(xs, ys, names, in_service=good, noisy_factor=factor, s=bpm.s)
