"""RunEngine + TiledWriter overhead per event on the embedded catalogue, against a RunEngine without writer.

Both RunEngines run the same ``bluesky.plans.count`` over an ophyd-async device with a 224-value orbit [m]
and a beam current [A] (soft signals), side by side in one process. Printed: time per event for short and long
runs, the fixed cost of a run (fit t = t_run + n * t_event), and the ratios writer / no writer.

    python benchmarks/bench_tiled_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

N_BPM = 224
SHORT, LONG = 20, 500  # events per run
REPEAT = 3
# The project's reference figures, measured before this package: 5.2 ms/point alone, 8.5 ms with a TiledWriter.
REFERENCE_RATIO = 8.5 / 5.2


def _device():
    from ophyd_async.core import StandardReadable, init_devices, soft_signal_rw

    class Bpms(StandardReadable):
        def __init__(self, name: str = "") -> None:
            with self.add_children_as_readables():
                self.x = soft_signal_rw(np.ndarray, np.linspace(-1e-4, 1e-4, N_BPM), units="m")
                self.current = soft_signal_rw(float, 0.2, units="A")
            super().__init__(name=name)

    with init_devices():
        bpm = Bpms()
    return bpm


def _md() -> dict[str, Any]:
    return {
        "facility": "bench", "accelerator": "bench", "profile": {"name": "bench", "sha256": "0" * 64},
        "lattice": {"file": "none", "sha256": "0" * 64}, "mode": "sim", "seed": 0, "tool": "benchmark",
    }


def _time_runs(RE, bpm, n: int) -> float:
    """Median wall time of one run of n events [s]."""
    import bluesky.plans as bp

    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        RE(bp.count([bpm], n, md=_md()))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(directory: str | Path | None = None) -> dict[str, float]:
    """Measure and return the figures (times in ms; ``ratio``: writer / no writer per event in runs of
    LONG events, fixed per-run cost included); also prints them. Catalogue in ``directory`` (default: a
    temporary folder)."""
    import bluesky
    import bluesky.plans as bp

    from acc_bluesky.data import make_run_engine

    if directory is None:
        with tempfile.TemporaryDirectory(prefix="acc-bluesky-bench-", ignore_cleanup_errors=True) as tmp:
            return run(tmp)
    directory = Path(directory)
    plain = bluesky.RunEngine(context_managers=[])
    writer = make_run_engine(catalog_dir=directory / "catalog", backup_dir=directory / "backup", progress=False)
    live = make_run_engine(catalog_dir=directory / "catalog", backup_dir=directory / "backup", progress=False,
                           batch_size=1)
    bpm = _device()
    for RE in (plain, writer, live):  # warm-up: imports, first table creation
        RE(bp.count([bpm], 2, md=_md()))

    figures: dict[str, float] = {}
    for label, RE in (("plain", plain), ("writer", writer)):
        t_short, t_long = _time_runs(RE, bpm, SHORT), _time_runs(RE, bpm, LONG)
        per_event = (t_long - t_short) / (LONG - SHORT)
        figures[f"{label}_ms_per_event_{SHORT}"] = 1e3 * t_short / SHORT
        figures[f"{label}_ms_per_event_{LONG}"] = 1e3 * t_long / LONG
        figures[f"{label}_marginal_ms_per_event"] = 1e3 * per_event
        figures[f"{label}_ms_per_run_fixed"] = 1e3 * (t_short - SHORT * per_event)
    t_live = _time_runs(live, bpm, SHORT)
    figures[f"live_ms_per_event_{SHORT}"] = 1e3 * t_live / SHORT

    figures[f"ratio_per_event_{LONG}"] = figures[f"writer_ms_per_event_{LONG}"] / figures[f"plain_ms_per_event_{LONG}"]
    figures[f"ratio_per_event_{SHORT}"] = (
        figures[f"writer_ms_per_event_{SHORT}"] / figures[f"plain_ms_per_event_{SHORT}"]
    )
    figures["ratio"] = figures[f"ratio_per_event_{LONG}"]  # the headline: per event, runs of LONG events
    figures["reference_ratio"] = REFERENCE_RATIO
    figures["ratio_marginal"] = figures["writer_marginal_ms_per_event"] / figures["plain_marginal_ms_per_event"]
    figures[f"ratio_live_per_event_{SHORT}"] = (
        figures[f"live_ms_per_event_{SHORT}"] / figures[f"plain_ms_per_event_{SHORT}"]
    )

    print(f"RunEngine + TiledWriter (embedded catalogue) vs RunEngine alone; {N_BPM}-value orbit + 1 scalar")
    print(f"{'':32}{'no writer':>12}{'TiledWriter':>14}{'ratio':>8}")
    for n in (SHORT, LONG):
        a, b = figures[f"plain_ms_per_event_{n}"], figures[f"writer_ms_per_event_{n}"]
        print(f"{f'ms/event, runs of {n} events':32}{a:12.2f}{b:14.2f}{b / a:8.2f}")
    a, b = figures["plain_marginal_ms_per_event"], figures["writer_marginal_ms_per_event"]
    print(f"{'ms/event, marginal':32}{a:12.2f}{b:14.2f}{b / a:8.2f}")
    a, b = figures["plain_ms_per_run_fixed"], figures["writer_ms_per_run_fixed"]
    print(f"{'ms/run, fixed':32}{a:12.1f}{b:14.1f}")
    print(f"{f'ms/event, live (batch_size=1), {SHORT} events':32}{figures[f'plain_ms_per_event_{SHORT}']:12.2f}"
          f"{figures[f'live_ms_per_event_{SHORT}']:14.2f}{figures[f'ratio_live_per_event_{SHORT}']:8.2f}")
    return figures


if __name__ == "__main__":
    run()
