"""What recording a tool run costs in HTTP requests to the catalogue's Tiled server (counted: independent of the load
of the machine), and the time until it is written and read back.

Five tool runs on the small ring ``tests/profiles/hmba`` (``measure_orm``, ``correct_orbit``, ``measure_dispersion``,
``measure_tune``, ``save_config``) recorded in a catalogue folder (its local Tiled server): per run the requests
made while the plan runs, after it until the run is written (``RE(plan)`` waits for them), and to read the results
back (``read_results``). Old figures (one data key, so one Tiled node, per result array): 157 requests to write the
five runs, 34 to read their results.

    python benchmarks/bench_tool_runs.py
"""

from __future__ import annotations

import collections
import logging
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_WRITE, OLD_READ = 157, 34  # before the small result arrays were packed (same five runs)


def run() -> dict:
    from acc_bluesky import plans as P
    from acc_bluesky.data import make_run_engine, read_results
    from acc_bluesky.machine import connect

    m = connect(str(ROOT / "tests" / "profiles" / "hmba"), mode="sim", seed=1)
    RE = make_run_engine(catalog_dir=tempfile.mkdtemp(prefix="bench_tool_runs_"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orm = RE(P.measure_orm(m, figure_dir=False))
    counts: collections.Counter[str] = collections.Counter()
    phase = ["plan"]

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            counts[phase[0]] += 1

    log = logging.getLogger("httpx")
    handler, level = _Count(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    tools = {"measure_orm": lambda: P.measure_orm(m), "correct_orbit": lambda: P.correct_orbit(m, orm=orm),
             "measure_dispersion": lambda: P.measure_dispersion(m), "measure_tune": lambda: P.measure_tune(m),
             "save_config": lambda: P.save_config(m)}
    out: dict = {}
    total = collections.Counter()
    RE.wait_written = False
    try:
        for name, plan in tools.items():
            counts.clear()
            phase[0] = "plan"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                uid = RE(plan())
                t1 = time.perf_counter()
                phase[0] = "after"
                RE.wait_for_catalog()
                t2 = time.perf_counter()
                phase[0] = "read"
                read_results(RE.catalog[uid])
                t3 = time.perf_counter()
            print(f"  {name:20s} plan {t1 - t0:5.2f} s, written +{t2 - t1:5.2f} s, read {t3 - t2:5.2f} s; "
                  f"requests: {counts['plan']:3d} during the plan, {counts['after']:3d} after, {counts['read']:3d} "
                  "to read")
            total["write"] += counts["plan"] + counts["after"]
            total["read"] += counts["read"]
            out[f"{name}_requests"] = counts["plan"] + counts["after"]
            out[f"{name}_written_s"] = t2 - t1
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    print(f"five tool runs: {total['write']} requests to write (old {OLD_WRITE}), {total['read']} to read their "
          f"results (old {OLD_READ})")
    out.update(requests_write=total["write"], requests_read=total["read"],
               ratio_requests_write=total["write"] / OLD_WRITE, ratio_requests_read=total["read"] / OLD_READ,
               target="fewer requests than before: ratios < 1")
    return out


if __name__ == "__main__":
    run()
