"""orbit_bump on the errored EBS twin: closure judged by the truth, amplitude as the BPM at the bump reads it.

Acceptance: the true orbit outside the correctors' span moves by < 1 um rms (both planes); the amplitude at the
BPM is within 2 % of the request in the BPM's own frame (truth transformed by that BPM's gain and roll, as the
BPM shows it); in the raw truth it is off by that BPM's gain error (2 % rms, at most 5 %), which no tool can know
without a beam-based calibration (LOCO).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import at
import numpy as np
import pytest

from acc_bluesky.analysis import bump as B
from acc_bluesky.data import read_results, read_stream
from acc_bluesky.plans import measure_orm, orbit_bump
from acc_bluesky.profile import LimitError


def rms(v) -> float:
    v = np.asarray(v, dtype=float)
    return float(np.sqrt(np.mean(v * v)))


def true_state(twin) -> np.ndarray:
    """(nbpm, 4) true (x, px, y, py) at the BPMs (pyAT on a copy of the errored lattice, the twin's path)."""
    f0, df = twin.rf_nominal_frequency, twin.df
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, o = at.find_orbit4(twin.ring.deepcopy(), dct=-twin.ring.circumference * df / (f0 + df),
                              refpts=twin.profile.bpm_refpts)
    return o[:, :4]


def check_bump(machine, catalog, uid, b, plane, amplitude, before):
    twin = machine.twin
    after = true_state(twin)
    d = after - before
    n = twin.nbpm
    res = read_results(catalog[uid])
    inside = res["inside"].astype(bool)
    assert 2 <= inside.sum() <= 12  # a local bump
    out = ~inside
    closure = np.sqrt(np.mean(np.concatenate([d[out, 0], d[out, 2]]) ** 2))
    assert closure < 1e-6, f"bump leaks {closure * 1e6:.2f} um rms outside its span"
    seen = twin.errors.bpm_linear() @ np.concatenate([d[:, 0], d[:, 2]])  # what perfect BPMs would show
    k = 0 if plane == "x" else n
    assert abs(seen[k + b] / amplitude - 1) < 0.02
    gain = twin.errors.bpm_gain[b, 0 if plane == "x" else 1]
    assert abs(d[b, 0 if plane == "x" else 2] / amplitude - 1) < 0.02 + abs(gain)
    return d, res


def test_three_corrector_bumps_are_closed(machine, RE, catalog):
    twin = machine.twin
    for b, plane, amp in ((10, "x", 1e-3), (57, "y", 0.5e-3)):  # far apart: each judged from its own start
        before = true_state(twin)
        f0 = twin.rf_frequency_setpoint
        uid = RE(orbit_bump(machine, f"BPM_{b + 1:03d}", amp, plane=plane))
        d, res = check_bump(machine, catalog, uid, b, plane, amp, before)
        start = catalog[uid].metadata["start"]
        assert start["tool"] == "orbit_bump" and len(start["bump_correctors"]) == 6  # 3 + 3 for the coupling
        assert Path(start["figures"]["bump"]).stat().st_size > 20_000  # the change along the ring, span, correctors
        if plane == "x":
            # a horizontal 3-bump through dispersive sextupoles needs the RF to keep the path length
            assert start["bump_rf"] is True and abs(twin.rf_frequency_setpoint - f0) > 1.0
            np.testing.assert_allclose(float(res["rf_step"]), twin.rf_frequency_setpoint - f0)
        else:
            assert twin.rf_frequency_setpoint == f0
        prim = read_stream(catalog[uid])
        assert prim["bump-closure_rms"][-1] < prim["bump-closure_rms"][0]  # measured refinements
        assert np.all(np.abs(twin.get_setpoint("HST")) <= 8) and np.all(np.abs(twin.get_setpoint("VST")) <= 8)


def test_four_corrector_position_bump_without_rf(machine, RE, catalog):
    twin = machine.twin
    # impossible requests first: refused before anything moves
    before = machine.twin.snapshot()
    with pytest.raises(LimitError, match="does not fit in the corrector limits.*allows about"):
        RE(orbit_bump(machine, 10, 20e-3, plane="x"))
    with pytest.raises(ValueError, match="angle bump needs n_correctors=4"):
        RE(orbit_bump(machine, 10, 1e-3, angle=1e-5, plane="x"))
    with pytest.raises(KeyError, match="unknown device 'BPM_999'"):
        RE(orbit_bump(machine, "BPM_999", 1e-3))
    after = machine.twin.snapshot()
    assert all(np.array_equal(np.asarray(after[k]), np.asarray(before[k])) for k in before)
    assert len(list(catalog)) == 0
    before = true_state(twin)
    f0 = twin.rf_frequency_setpoint
    uid = RE(orbit_bump(machine, 100, 1e-3, plane="x", n_correctors=4))
    check_bump(machine, catalog, uid, 100, "x", 1e-3, before)
    assert twin.rf_frequency_setpoint == f0  # the 4th corrector keeps the path length


def test_position_and_angle_bumps(machine, RE, catalog):
    twin = machine.twin
    for b, plane, amp, angle in ((13, "x", 0.5e-3, 50e-6), (150, "y", 0.3e-3, -20e-6)):
        before = true_state(twin)
        uid = RE(orbit_bump(machine, b, amp, angle=angle, plane=plane, n_correctors=4))
        d, _ = check_bump(machine, catalog, uid, b, plane, amp, before)
        # the angle: from the readings of the free segment around the BPM when it has 2 BPMs (BPM 14 with 13),
        # else from the model; the truth is off by the BPM gain errors / model errors: 15 % here
        k = 1 if plane == "x" else 3
        assert abs(d[b, k] / angle - 1) < 0.15
        prim = read_stream(catalog[uid])
        measured = prim[f"bump-angle_{plane}"][-1]
        geo = B.bump_geometry(machine.profile)
        seg = B.free_segment(geo, b, catalog[uid].metadata["start"]["bump_correctors"][:4])
        if len(seg) >= 2:
            assert abs(measured / angle - 1) < 0.005  # the BPMs see the requested angle
            seen = twin.errors.bpm_linear() @ np.concatenate([d[:, 0], d[:, 2]])
            assert abs(B.angle_from_orbit(machine.profile, b, plane, seen, seg) / angle - 1) < 0.01
        else:
            assert np.isnan(measured)


def test_bump_with_a_measured_orm(machine, RE, catalog):
    names = [f"VST_{i:03d}" for i in range(55, 63)] + [f"HST_{i:03d}" for i in range(55, 63)]
    orm_uid = RE(measure_orm(machine, correctors=names))
    before = true_state(machine.twin)
    uid = RE(orbit_bump(machine, 57, 0.5e-3, plane="y", orm=orm_uid))
    check_bump(machine, catalog, uid, 57, "y", 0.5e-3, before)
    assert catalog[uid].metadata["start"]["parameters"]["orm"] == orm_uid
    used = catalog[uid].metadata["start"]["bump_correctors"]
    assert set(used) <= set(names)
