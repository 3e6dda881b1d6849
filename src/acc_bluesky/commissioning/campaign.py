"""Virtual commissioning of many error seeds on Dask (one machine by default, a cluster by address).

Each seed runs on a worker with only the twin and the analysis layer (no RunEngine): the twin with that seed's
errors, an orbit response measured on it as the control room would (bipolar corrector steps, BPM readings with
their errors and noise), then iterations of SVD orbit correction from the BPM readings. The result per seed is
the truth the twin knows before and after, so a campaign gives the statistics of what the correction chain
achieves over many machines (pySC-style).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["SeedResult", "commission_seed", "run_campaign", "measure_orm_on_twin", "warm_worker"]


@dataclass
class SeedResult:
    """Truth before and after the correction chain of one seed."""

    seed: int
    orbit_x_before: float  # m rms (truth at the BPMs)
    orbit_y_before: float
    orbit_x_after: float
    orbit_y_after: float
    iterations: int
    n_sv: int
    max_corrector: float  # A, largest |setpoint| after correction
    beam_lost: bool
    seconds: float
    worker: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def measure_orm_on_twin(twin, delta: float = 0.2, correctors: Sequence[str] | None = None):
    """Measure the orbit response on a twin like the control room: bipolar steps of ``delta`` [A], BPM readings.

    Returns an :class:`~acc_bluesky.analysis.OrbitResponse` (m/A and m/rad, both planes, every corrector).
    """
    from ..analysis.orm import OrbitResponse, model_orm

    model = model_orm(twin.profile, correctors)  # names, planes, refpts and calibration slopes of the layout
    n = twin.nbpm
    resp = np.zeros((2 * n, len(model.corrector_names)))
    slope = np.zeros(len(model.corrector_names))  # rad/A at the working point (nominal calibration)
    for j, name in enumerate(model.corrector_names):
        fam, _, num = name.rpartition(":")
        i = int(num) - 1
        v0 = float(twin.get_setpoint(fam, i))
        slope[j] = twin.profile.families[fam].spec.calibration.slope(v0, twin.energy, twin.energy)
        twin.set_setpoint(fam, v0 + delta, index=i)
        xp, yp = twin.read_bpms()
        twin.set_setpoint(fam, v0 - delta, index=i)
        xm, ym = twin.read_bpms()
        twin.set_setpoint(fam, v0, index=i)
        resp[:, j] = np.concatenate([xp - xm, yp - ym]) / (2 * delta)
    return OrbitResponse(
        matrix=resp / slope, matrix_hw=resp, bpm_names=model.bpm_names, corrector_names=model.corrector_names,
        planes=model.planes, rf=None, delta=delta, delta_physics=None, kind="measured",
        bpm_refpts=model.bpm_refpts, corrector_refpts=model.corrector_refpts, metadata={"source": "campaign"})


def commission_seed(profile: str, seed: int, *, n_sv: int | None = None, max_iter: int = 3,
                    delta: float = 0.2, error_scale: float | None = None) -> dict:
    """The correction chain for one seed (runs anywhere: a Dask worker, a notebook). Returns a dict."""
    from ..analysis.correction import CorrectionSystem, limit_step
    from ..twin import Twin

    t0 = time.perf_counter()
    twin = Twin(profile, seed=seed, error_scale=error_scale)
    xb, yb = twin.orbit()
    before = (float(np.sqrt(np.mean(xb**2))), float(np.sqrt(np.mean(yb**2))))
    lost = bool(twin.beam_lost)
    it = 0
    nsv = 0
    if not lost:
        orm = measure_orm_on_twin(twin, delta=delta)
        system = CorrectionSystem.build(orm)
        nsv = n_sv or int(0.75 * min(system.response.shape))
        fams = {}
        for name in orm.corrector_names:
            fam, _, num = name.rpartition(":")
            fams.setdefault(fam, []).append(int(num) - 1)
        for it in range(1, max_iter + 1):  # noqa: B007 - reported
            x, y = twin.read_bpms()
            if not np.all(np.isfinite(x)):
                lost = True
                break
            dk, _ = system.step(np.concatenate([x, y]), n_sv=nsv)
            k = 0
            for fam, idx in fams.items():
                spec = twin.profile.families[fam].spec
                cur = twin.get_setpoint(fam)[idx]
                safe, _ = limit_step(dk[k:k + len(idx)], cur, spec.limits.low, spec.limits.high)
                twin.set_setpoint(fam, cur + safe, index=np.asarray(idx))
                k += len(idx)
    xa, ya = twin.orbit()
    worst = max(float(np.max(np.abs(twin.get_setpoint(f)))) for f, fm in twin.profile.families.items()
                if fm.spec.type in ("hcor", "vcor"))
    try:
        from distributed import get_worker

        worker = get_worker().address
    except Exception:  # noqa: BLE001 - not on a Dask worker
        worker = "local"
    return SeedResult(seed, *before, float(np.sqrt(np.nanmean(xa**2))), float(np.sqrt(np.nanmean(ya**2))), it,
                      nsv, worst, lost or bool(twin.beam_lost), time.perf_counter() - t0, worker).as_dict()


def warm_worker(profile: str) -> str:
    """Import the twin and parse the profile's lattice once in this process (run on each worker before a campaign)."""
    from ..twin import Twin

    Twin(profile)
    return profile


def run_campaign(profile: str, seeds: Sequence[int], *, address: str | None = None, n_workers: int = 2,
                 threads_per_worker: int = 1, progress: bool = False, client=None, **kwargs) -> list[dict]:
    """Commission every seed on Dask: a ``LocalCluster`` of ``n_workers`` processes, or the cluster at ``address``,
    or an open ``distributed.Client`` (kept open: many campaigns on one cluster pay its start-up once).

    Returns one dict per seed (see :class:`SeedResult`), in the order of ``seeds``.
    """
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    own_client = client is None
    if own_client and address is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    elif own_client:
        client = Client(address)
    try:
        futures = [client.submit(commission_seed, profile, int(s), pure=False, **kwargs) for s in seeds]
        done = 0
        for _ in as_completed(futures):
            done += 1
            if progress:
                print(f"  {done}/{len(futures)} seeds done", flush=True)
        return client.gather(futures)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
