"""Beam-based alignment on EBS (profile errors, seed 1), both methods side by side, against the twin's truth.

DESIGN / issue 14 acceptance:
- quadcenter (serial), 20 BPMs both planes: offsets within 2 um rms per plane of the truth, the uncertainty
  consistent with the error within a factor 2;
- parallel, every BPM both planes: accuracy within 1.5x of the serial's, >= 8x fewer magnet moves per BPM,
  <= 10 min wall on 2 cores;
- apply_bba + correct_orbit(target=...): the true orbit at the quadrupoles >= 3x smaller than after a correction to
  zero readings (the same correction, from the same machine state).

The truth (``analysis.true_offset``): the BPM's noise-free reading when the beam passes through its quadrupole's
magnetic centre with the angle it has there on the orbit the measurement started from. For information the
"geometric" offset is printed too (the reading of a beam at the magnet's centre at the BPM: the BPM offset and the
magnet offset alone), which differs by the beam angle times the BPM-quadrupole distance.

Run: ``python benchmarks/bench_bba.py`` (or ``python benchmarks/run.py bba``).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

__all__ = ["run"]

OPERATING = dict(orm="model", figure_dir=False)
CORRECT = dict(orm="model", fit_rf=True, tikhonov=1e-4, max_iter=15, figure_dir=False)


def _rms(v) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.mean(v * v))) if v.size else float("nan")


def _compare(m, r, only=None):
    """Per plane: rms error vs the truth, rms uncertainty, rms error vs the geometric offset (``only``: BPMs)."""
    from acc_bluesky.analysis import bba_model, true_offset

    model = bba_model(m.profile)
    out = {}
    for k, p in enumerate("xy"):
        rows = [i for i in range(len(r.bpm_names)) if np.isfinite(r.offset[i, k])
                and (only is None or r.bpm_names[i] in only)]
        bpms = [r.bpm_names[i] for i in rows]
        quads = [r.quad_names[i][k] for i in rows]
        truth = true_offset(m.twin, bpms, quads, [p] * len(rows))
        err = r.offset[rows, k] - truth
        # geometric: the reading of a beam at the magnet's centre, at the BPM (BPM offset, gain, roll; magnet offset)
        em = m.twin.errors
        geo = []
        for b, q in zip(bpms, quads):
            bi, refpt = m.bpm.index_of(b), model.quads[model.quad_index(q)].refpt
            xs, ys = np.zeros(len(m.bpm.names)), np.zeros(len(m.bpm.names))
            xs[bi], ys[bi] = em.dx.get(refpt, 0.0), em.dy.get(refpt, 0.0)
            geo.append(em.bpm_transform(xs, ys)[k][bi])
        out[p] = {"n": len(rows), "rms_err": _rms(err), "max_err": float(np.max(np.abs(err))),
                  "rms_unc": _rms(r.uncertainty[rows, k]), "rms_geo": _rms(r.offset[rows, k] - np.array(geo))}
    return out


def run(n_serial: int = 20, seed: int = 1) -> dict:
    import acc_bluesky as ab
    from acc_bluesky import plans as ap
    from acc_bluesky.analysis import true_orbit_at_quads
    from acc_bluesky.plan_stubs.machine import restore_setpoints, snapshot_setpoints
    from acc_bluesky.plan_stubs.tool import remembered

    warnings.simplefilter("ignore")
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench_bba_")
    m = ab.connect("ebs", mode="sim", seed=seed)
    RE = ab.make_run_engine(catalog_dir=f"{tmp}/catalog", progress=False)
    RE(ap.correct_orbit(m, **OPERATING))
    x, y = m.twin.orbit()
    names = m.bpm.names
    serial_bpms = [names[i] for i in np.linspace(0, len(names) - 1, n_serial).round().astype(int)]
    t0 = time.perf_counter()
    us = RE(ap.measure_bba(m, bpms=serial_bpms, figure_dir=False)).plan_result
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    up = RE(ap.measure_bba(m, method="parallel", figure_dir=False)).plan_result
    t_parallel = time.perf_counter() - t0
    rs, rp = remembered(us)[1], remembered(up)[1]
    cs, cp, cp20 = _compare(m, rs), _compare(m, rp), _compare(m, rp, set(serial_bpms))
    ms, mp = rs.moves / len(rs.bpm_names), rp.moves / len(rp.bpm_names)
    # the golden orbit against zero readings: the same correction from the same state
    quads = sorted({q for qq in rp.quad_names for q in qq if q})
    at_quads_before = _rms(true_orbit_at_quads(m.twin, quads))
    snap = RE(snapshot_setpoints(m)).plan_result
    RE(ap.correct_orbit(m, **CORRECT))
    zero = true_orbit_at_quads(m.twin, quads)
    RE(restore_setpoints(m, snap))
    golden = RE(ap.apply_bba(m, bba=up)).plan_result
    RE(ap.correct_orbit(m, target=golden, **CORRECT))
    gold = true_orbit_at_quads(m.twin, quads)

    print(f"EBS seed {seed}: operating orbit (default correct_orbit) true rms x {_rms(x) * 1e6:.1f} um, "
          f"y {_rms(y) * 1e6:.1f} um; beam at the BBA quadrupoles {at_quads_before * 1e6:.1f} um rms from their centres")
    print(f"{'':34s}{'quadcenter (serial)':>22s}{'parallel':>16s}")
    print(f"{'BPMs measured (both planes)':34s}{len(rs.bpm_names):>22d}{len(rp.bpm_names):>16d}")
    print(f"{'magnet moves':34s}{rs.moves:>22d}{rp.moves:>16d}")
    print(f"{'magnet moves per BPM':34s}{ms:>22.2f}{mp:>16.2f}")
    print(f"{'wall time [s] (RunEngine + Tiled)':34s}{t_serial:>22.1f}{t_parallel:>16.1f}")
    for p in "xy":
        print(f"{f'rms error vs truth {p} [um]':34s}{cs[p]['rms_err'] * 1e6:>22.2f}{cp[p]['rms_err'] * 1e6:>16.2f}"
              f"   (parallel at the serial's {n_serial} BPMs: {cp20[p]['rms_err'] * 1e6:.2f})")
        print(f"{f'max |error| {p} [um]':34s}{cs[p]['max_err'] * 1e6:>22.2f}{cp[p]['max_err'] * 1e6:>16.2f}")
        print(f"{f'rms uncertainty {p} [um]':34s}{cs[p]['rms_unc'] * 1e6:>22.2f}{cp[p]['rms_unc'] * 1e6:>16.2f}")
        print(f"{f'rms vs geometric offset {p} [um]':34s}{cs[p]['rms_geo'] * 1e6:>22.1f}{cp[p]['rms_geo'] * 1e6:>16.1f}")
    print(f"moves per BPM serial / parallel: {ms / mp:.1f}x (target >= 8x); full-ring serial would make "
          f"{int(round(ms * len(names)))} moves")
    acc = {p: cp20[p]["rms_err"] / cs[p]["rms_err"] for p in "xy"}
    full = {p: cp[p]["rms_err"] / cs[p]["rms_err"] for p in "xy"}
    print(f"accuracy parallel / serial at the same {n_serial} BPMs: x {acc['x']:.2f}, y {acc['y']:.2f} (target <= 1.5); "
          f"parallel over the ring / serial's {n_serial}: x {full['x']:.2f}, y {full['y']:.2f}")
    print(f"error / uncertainty (rms): serial x {cs['x']['rms_err'] / cs['x']['rms_unc']:.2f} "
          f"y {cs['y']['rms_err'] / cs['y']['rms_unc']:.2f}; parallel x {cp['x']['rms_err'] / cp['x']['rms_unc']:.2f} "
          f"y {cp['y']['rms_err'] / cp['y']['rms_unc']:.2f} (target within 0.5 .. 2)")
    ratio_golden = _rms(zero) / _rms(gold)
    print(f"true orbit at the {len(quads)} BBA quadrupoles after correct_orbit(tikhonov=1e-4, fit_rf): to zero readings "
          f"x {_rms(zero[:, 0]) * 1e6:.1f} y {_rms(zero[:, 1]) * 1e6:.1f} um; to the golden orbit "
          f"x {_rms(gold[:, 0]) * 1e6:.1f} y {_rms(gold[:, 1]) * 1e6:.1f} um: {ratio_golden:.1f}x (target >= 3)")
    return {"serial_rms_x_um": cs["x"]["rms_err"] * 1e6, "serial_rms_y_um": cs["y"]["rms_err"] * 1e6,
            "parallel_rms_x_um": cp["x"]["rms_err"] * 1e6, "parallel_rms_y_um": cp["y"]["rms_err"] * 1e6,
            "accuracy_ratio_x": acc["x"], "accuracy_ratio_y": acc["y"], "moves_ratio": ms / mp,
            "golden_ratio": ratio_golden, "parallel_wall_s": t_parallel, "serial_wall_s": t_serial,
            "target": "serial <= 2 um; parallel/serial <= 1.5; moves >= 8x; wall <= 600 s; golden >= 3x"}


if __name__ == "__main__":
    run()
