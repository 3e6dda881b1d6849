"""RunEngine + TiledWriter overhead per event on a catalogue folder (its local Tiled server), against a RunEngine
without writer.

The RunEngines run the same ``bluesky.plans.count`` over an ophyd-async device with a 224-value orbit [m] and a
beam current [A] (soft signals), side by side in one process:

- ``plain``: bluesky's RunEngine, no writer;
- ``writer``: ``make_run_engine()`` with ``RE.wait_written = False``: ``RE`` returns when the plan ends (every
  document in the write-ahead log, the public TiledWriter writing in its thread);
- ``written``: ``make_run_engine()``'s default: ``RE`` returns once the run is written in the catalogue;
- ``live``: the default with ``batch_size=1`` (every event written at once).

Old figures (printed beside): the writer process 7.5 ms/run and 0.95x marginal (RE returning when handed over),
the inline TiledWriter on the in-process catalogue 290 ms/run.

Printed: time per event for short and long runs, the fixed cost of a run (fit t = t_run + n * t_event), and the
ratios to no writer.

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


def _time_runs(RE, bpm, n: int, wait: bool = False) -> float:
    """Median wall time of one run of n events [s] (with ``wait``: until it is written in the catalogue)."""
    import bluesky.plans as bp

    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        RE(bp.count([bpm], n, md=_md()))
        if wait:
            RE.wait_for_catalog()
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
    kw: dict[str, Any] = {"catalog_dir": directory / "catalog", "backup_dir": directory / "backup", "progress": False}
    writer = make_run_engine(**kw)
    writer.wait_written = False
    inline = make_run_engine(**kw)  # (the default: RE returns with the run written)
    live = make_run_engine(**kw, batch_size=1)
    bpm = _device()
    for RE in (plain, writer, inline, live):  # warm-up: imports, server, first table creation
        RE(bp.count([bpm], 2, md=_md()))
    writer.wait_for_catalog()

    figures: dict[str, float] = {}
    for label, RE, wait in (("plain", plain, False), ("writer", writer, False), ("written", inline, False)):
        t_short, t_long = _time_runs(RE, bpm, SHORT, wait), _time_runs(RE, bpm, LONG, wait)
        per_event = (t_long - t_short) / (LONG - SHORT)
        figures[f"{label}_ms_per_event_{SHORT}"] = 1e3 * t_short / SHORT
        figures[f"{label}_ms_per_event_{LONG}"] = 1e3 * t_long / LONG
        figures[f"{label}_marginal_ms_per_event"] = 1e3 * per_event
        figures[f"{label}_ms_per_run_fixed"] = 1e3 * (t_short - SHORT * per_event)
        writer.wait_for_catalog()
    figures[f"live_ms_per_event_{SHORT}"] = 1e3 * _time_runs(live, bpm, SHORT) / SHORT

    for label in ("writer", "written"):
        for n in (SHORT, LONG):
            figures[f"ratio_{label}_per_event_{n}"] = (
                figures[f"{label}_ms_per_event_{n}"] / figures[f"plain_ms_per_event_{n}"])
        figures[f"ratio_{label}_marginal"] = (
            figures[f"{label}_marginal_ms_per_event"] / figures["plain_marginal_ms_per_event"])
    figures["ratio"] = figures[f"ratio_writer_per_event_{LONG}"]  # the headline: the default, runs of LONG events
    figures["reference_ratio"] = REFERENCE_RATIO
    figures[f"ratio_live_per_event_{SHORT}"] = (
        figures[f"live_ms_per_event_{SHORT}"] / figures[f"plain_ms_per_event_{SHORT}"])

    print(f"RunEngine + TiledWriter (local server) vs RunEngine alone; {N_BPM}-value orbit + 1 scalar")
    print(f"{'':30}{'no writer':>10}{'returns':>9}{'ratio':>7}{'written':>9}{'ratio':>7}")
    rows = [(f"ms/event, runs of {n} events", f"ms_per_event_{n}") for n in (SHORT, LONG)]
    rows.append(("ms/event, marginal", "marginal_ms_per_event"))
    for title, key in rows:
        a = figures[f"plain_{key}"]
        cells = "".join(f"{figures[f'{lab}_{key}']:9.2f}{figures[f'{lab}_{key}'] / a:7.2f}"
                        for lab in ("writer", "written"))
        print(f"{title:30}{a:10.2f}{cells}")
    print(f"{'ms/run, fixed':30}{figures['plain_ms_per_run_fixed']:10.1f}"
          + "".join(f"{figures[f'{lab}_ms_per_run_fixed']:9.1f}{'':7}" for lab in ("writer", "written")))
    print("old path: writer process 7.5 ms/run fixed, 0.95x marginal per event; inline in-process TiledWriter "
          "290 ms/run")
    print(f"{f'ms/event, live (batch_size=1), {SHORT} events':30} "
          f"{figures[f'live_ms_per_event_{SHORT}']:.2f} (ratio {figures[f'ratio_live_per_event_{SHORT}']:.2f})")
    return figures


if __name__ == "__main__":
    run()
