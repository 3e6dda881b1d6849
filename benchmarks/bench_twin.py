"""Twin latency: set one corrector then read the orbit, against one cold pyAT ``find_orbit4`` (same run).

DESIGN: median <= 0.5x. The twin keeps pyAT's converted lattice and starts from the last orbit (chord Newton),
so it pays only the single-particle tracking.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

__all__ = ["run"]


def run(n: int = 60, profile: str = "ebs") -> dict:
    import at

    from acc_bluesky.twin import Twin

    warnings.simplefilter("ignore")
    twin = Twin(profile, seed=1)
    twin.read_bpms()
    ring = twin.ring
    refs = twin.bpm_refpts
    fam = next(n for n, f in twin.profile.families.items() if f.spec.type == "hcor")
    ncor = len(twin.family(fam).refpts)
    lat_twin, lat_cold = [], []
    other = ring.deepcopy()
    for block in range(4):  # alternate blocks so both see the same machine load
        twin.read_bpms()  # back on the fast path after pyAT converted its own copy
        for k in range(block * n // 4, (block + 1) * n // 4):
            t0 = time.perf_counter()
            twin.set_setpoint(fam, 0.05 * ((k % 9) - 4), index=k % ncor)
            twin.read_bpms()
            lat_twin.append(time.perf_counter() - t0)
        for _ in range(n // 4):
            t0 = time.perf_counter()
            at.find_orbit4(other, refpts=refs, df=twin.df)
            lat_cold.append(time.perf_counter() - t0)
    mt, mc = float(np.median(lat_twin)), float(np.median(lat_cold))
    out = {
        "twin_set_read_median_ms": 1e3 * mt,
        "pyat_cold_find_orbit4_median_ms": 1e3 * mc,
        "ratio": mt / mc,
        "target": 0.5,
    }
    print(f"twin latency (set 1 corrector + read orbit, {profile}): median {1e3 * mt:.2f} ms; "
          f"cold pyAT find_orbit4 {1e3 * mc:.2f} ms; ratio {mt / mc:.2f} (DESIGN <= 0.5)")
    out.update(_optics_blas(twin))
    return out


def _optics_blas(twin, n: int = 6) -> dict:
    """pyAT ``get_optics`` at the BPMs (what ``Twin.tunes``/``beta``/``dispersion`` compute after a change) with
    OpenBLAS on one thread (``acc_bluesky._compat.scipy.single_thread_blas``, as the twin calls it) against the
    process default, interleaved: scipy's ``solve`` of one 4x4 matrix per BPM threads otherwise."""
    import at

    from acc_bluesky._compat.scipy import single_thread_blas

    ring, refs, orbit = twin.ring, twin.bpm_refpts, twin.observables().orbit0
    one, default = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        with single_thread_blas():
            at.get_optics(ring, refpts=refs, orbit=orbit)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        at.get_optics(ring, refpts=refs, orbit=orbit)
        default.append(time.perf_counter() - t0)
    m1, md = float(np.median(one)), float(np.median(default))
    print(f"get_optics at {len(refs)} BPMs: one BLAS thread {1e3 * m1:.0f} ms, default threads {1e3 * md:.0f} ms "
          f"(ratio {m1 / md:.2f}; the default's cost grows with the machine's load)")
    return {"get_optics_one_thread_ms": 1e3 * m1, "get_optics_default_ms": 1e3 * md, "get_optics_ratio": m1 / md}


if __name__ == "__main__":
    run()
