"""Commissioning campaign on Dask: 2 workers vs 1 worker on the same seeds (DESIGN: >= 1.7x faster)."""

from __future__ import annotations

import time

__all__ = ["run"]


def run(seeds=(1, 2, 3, 4), profile: str = "ebs") -> dict:
    from acc_bluesky.commissioning import run_campaign

    times = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        res = run_campaign(profile, list(seeds), n_workers=workers)
        times[workers] = time.perf_counter() - t0
        assert len(res) == len(seeds)
    speedup = times[1] / times[2]
    print(f"campaign of {len(seeds)} seeds on {profile}: 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s, "
          f"speed-up {speedup:.2f}x (DESIGN >= 1.7x)")
    return {"one_worker_s": times[1], "two_workers_s": times[2], "speedup": speedup, "target": ">= 1.7"}


if __name__ == "__main__":
    run()
