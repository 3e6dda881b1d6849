"""Commissioning campaign on Dask: the sequence through the real plans, 2 workers vs 1 on the same seeds
(DESIGN: >= 1.8x), and the time of each step (median over seeds) so the slowest step shows.

The ratio is measured on running clusters whose workers have imported the plans and parsed the lattice
(``warm_worker``), as with a cluster given by address or a second campaign on the same cluster. Every run goes to a
temporary catalogue folder (its Tiled server on loopback).

``python benchmarks/bench_campaign.py [PROFILE] [SEEDS] [ERROR_SCALE]`` (default: ``ebs 1-4 0.3``: at the full
EBS alignment errors about half of the seeds have no closed orbit until ``thread_first_turns`` lands).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

__all__ = ["run"]


def _campaign(profile, seeds, workers: int, catalog, sequence, error_scale):
    from distributed import Client, LocalCluster

    from acc_bluesky.commissioning import run_campaign, warm_worker

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        client.run(warm_worker, profile)
        t0 = time.perf_counter()
        res = run_campaign(profile, list(seeds), sequence, client=client, catalog=catalog, progress=False,
                           error_scale=error_scale)
        wall = time.perf_counter() - t0
    return res, wall


def run(profile: str = "ebs", seeds=(1, 2, 3, 4), error_scale: float | None = 0.3, sequence=None) -> dict:
    from acc_bluesky.data import close_catalog

    root = tempfile.mkdtemp(prefix="bench-campaign-")
    os.environ.setdefault("ACC_BLUESKY_BACKUP", os.path.join(root, "backup"))
    catalog = os.path.join(root, "catalog")
    wall, results = {}, {}
    try:
        for workers in (1, 2):
            results[workers], wall[workers] = _campaign(profile, seeds, workers, catalog, sequence, error_scale)
    finally:
        close_catalog(catalog)
    res = results[2]
    speedup = wall[1] / wall[2]
    print(res.table())
    print(f"\nper-step time [s], median over {len(seeds)} seeds (2-worker campaign):")
    per_step = {}
    for sid in res.step_ids:
        t = [r.step(sid).seconds for r in res.results.values() if r.step(sid).status not in ("skipped", "not run")]
        if t:
            per_step[sid] = float(np.median(t))
    for sid, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {sid:24s} {t:7.2f}")
    print(f"campaign of {len(seeds)} seeds on {profile} (error scale {error_scale}): 1 worker {wall[1]:.1f} s, "
          f"2 workers {wall[2]:.1f} s, speed-up {speedup:.2f}x (DESIGN >= 1.8x)")
    return {"one_worker_s": wall[1], "two_workers_s": wall[2], "speedup": speedup, "target": ">= 1.8",
            "per_step_s": per_step,
            "success_rate": {sid: res.success_rate(sid) for sid in res.step_ids}}


if __name__ == "__main__":
    from acc_bluesky.cli.commission import parse_seeds

    args = sys.argv[1:]
    run(args[0] if args else "ebs", parse_seeds(args[1]) if len(args) > 1 else (1, 2, 3, 4),
        float(args[2]) if len(args) > 2 else 0.3)
