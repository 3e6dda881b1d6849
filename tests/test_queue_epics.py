"""The queue server in epics mode: its worker drives the twin IOC on loopback (PV prefix passed to the worker),
and the ORM it measures equals the one measured on the sim twin of the same seed, within the BPM noise."""

from __future__ import annotations

import numpy as np
from ioc_fixtures import *  # noqa: F403
from queue_fixtures import needs_redis

CORRECTORS = ["HST_010", "HST_011", "VST_010"]


@needs_redis
def test_queue_in_epics_mode_measures_on_the_ioc(reset_ioc, tmp_path, session_catalog_dir, machine):
    from acc_bluesky.analysis import OrbitResponse
    from acc_bluesky.data import make_run_engine, open_catalog
    from acc_bluesky.plans import measure_orm
    from acc_bluesky.queue import run_queue, start_queue_server, submit

    qs = start_queue_server("ebs", mode="epics", prefix=reset_ioc.prefix, catalog_dir=session_catalog_dir,
                            run_dir=tmp_path / "run", timeout=200.0)
    try:
        api = qs.api(timeout=10.0)
        try:
            uid = submit(api, "measure_orm", {"correctors": CORRECTORS, "delta": 0.5})
            (item,) = run_queue(api, [uid], timeout=180)
        finally:
            api.close()
    finally:
        qs.stop()
    assert item["result"]["exit_status"] == "completed", item["result"]["msg"]
    run = open_catalog(catalog_dir=session_catalog_dir)[item["result"]["run_uids"][0]]
    start = run.metadata["start"]
    assert start["mode"] == "epics" and "seed" not in start and start["tool"] == "orbit_response"
    live = OrbitResponse.from_run(run)

    sim = machine  # the IOC serves the seed-1 twin (the session's sim machine, reset: connecting again costs seconds)
    RE = make_run_engine(catalog_dir=session_catalog_dir, progress=False)  # noqa: N806 - bluesky's name
    ref = OrbitResponse.from_run(open_catalog(catalog_dir=session_catalog_dir)[RE(measure_orm(
        sim, correctors=CORRECTORS, delta=0.5))])
    # BPM noise 0.1 um on orbit changes of ~100 um per 1 A (bipolar): 1e-3 relative per reading at most
    diff = np.sqrt(np.mean((live.matrix_hw - ref.matrix_hw) ** 2)) / np.sqrt(np.mean(ref.matrix_hw ** 2))
    assert diff < 5e-3, diff
