"""Beam-based alignment against the twin's truth.

The truth of an offset is the reading of the BPM (its offset, gain and roll applied, no noise) when the beam passes
through its quadrupole's magnetic centre (the magnet's own offset) with the angle it has there on the orbit the
measurement started from: ``analysis.true_offset`` computes it by tracking the errored lattice split at the
magnet's centre. Logic on one EBS cell (``tests/profiles/hmba``); accuracy, parallel against serial and the golden
orbit on EBS with the profile's errors (seed 1), after a correction to zero readings.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import (  # noqa: F401 - module fixtures
    Interrupt,
    draw_step,
    events,
    module_catalog,
    module_run_engine,
    run_documents,
    run_interrupted,
    same,
)

import acc_bluesky as ab
from acc_bluesky import plans as ap
from acc_bluesky.plans import bba as ab_bba
from acc_bluesky.analysis import (
    BBAResult,
    bba_model,
    bba_pairs,
    bowtie_fit,
    true_offset,
    true_orbit_at_quads,
)
from acc_bluesky.plan_stubs.checks import ParameterError
from acc_bluesky.plan_stubs.machine import (
    BeamLostError,
    restore_setpoints,
    snapshot_setpoints,
)
from acc_bluesky.plan_stubs.tool import ToolError, remembered

HMBA = "tests/profiles/hmba/profile.yaml"
# the operating orbit BBA is measured on: the default correction to zero readings
OPERATING = dict(orm="model", figure_dir=False)
# a correction that reaches its target (the zero and the golden one alike), so the comparison is about the target
CORRECT = dict(orm="model", fit_rf=True, tikhonov=1e-4, max_iter=15, figure_dir=False)


def _corrected(name: str, RE):
    m = ab.connect(name, mode="sim", seed=1)
    RE(ap.correct_orbit(m, **OPERATING))
    return m


@pytest.fixture(scope="module")
def hmba(RE):
    return _corrected(HMBA, RE)


@pytest.fixture(scope="module")
def ebs(RE):
    return _corrected("ebs", RE)


def _errors(m, r: BBAResult):
    """(measured - truth, uncertainty) per measured BPM and plane, and the planes."""
    bpms, quads, planes, off, unc = [], [], [], [], []
    for i, b in enumerate(r.bpm_names):
        for k, p in enumerate("xy"):
            if np.isfinite(r.offset[i, k]):
                bpms.append(b), quads.append(r.quad_names[i][k]), planes.append(p)
                off.append(r.offset[i, k]), unc.append(r.uncertainty[i, k])
    truth = true_offset(m.twin, bpms, quads, planes)
    return np.array(off) - truth, np.array(unc), np.array(planes)


def _rms(v):
    return float(np.sqrt(np.mean(np.square(v))))


# ------------------------------------------------------------------------------------------------------------
# the model and the pairs
def test_model_responses_and_transfer_match_tracking():
    """Responses at the quadrupole centres (position and angle) and transfer matrices, against pyAT tracking of the
    design lattice split at the same points."""
    import at

    prof = ab.load_profile(HMBA)
    model = bba_model(prof)
    ring = prof.load_lattice()
    order = np.argsort(model.quad.s)
    split = ring.sbreak(model.quad.s[order], at.Marker("QC"))
    qc = np.array([i for i, e in enumerate(split) if e.FamName == "QC"], dtype=np.uint32)
    sp = split.get_s_pos(range(len(split)))
    for c in list(model.correctors)[::3]:
        _, _, r, plane, _ = model.correctors[c]
        j = next(k for k, e in enumerate(split) if abs(sp[k] - ring.get_s_pos(r)[0]) < 1e-9
                 and e.FamName == ring[r].FamName)
        col = 0 if plane == "x" else 2
        orbits = []
        for d in (1e-6, -1e-6):
            split[j].KickAngle = np.array([d, 0.0]) if plane == "x" else np.array([0.0, d])
            orbits.append(at.find_orbit4(split, refpts=qc, dct=0.0)[1])
        split[j].KickAngle = np.zeros(2)
        pos = np.empty(len(qc)), np.empty(len(qc))
        pos[0][order] = (orbits[0][:, col] - orbits[1][:, col]) / 2e-6
        pos[1][order] = (orbits[0][:, col + 1] - orbits[1][:, col + 1]) / 2e-6
        r_q = model.quad_response(range(len(qc)), [c], plane)[:, 0]
        rp_q = model.quad_response(range(len(qc)), [c], plane, angle=True)[:, 0]
        assert np.allclose(r_q, pos[0], rtol=0, atol=2e-3 * np.abs(pos[0]).max())
        assert np.allclose(rp_q, pos[1], rtol=0, atol=2e-3 * np.abs(pos[1]).max())
    m44 = at.find_m44(split, refpts=range(len(split) + 1))[1]
    mons = [i for i, e in enumerate(split) if isinstance(e, at.Monitor)]
    qc_of = np.empty_like(qc)
    qc_of[order] = qc
    for q in range(0, len(qc), 3):
        for b in range(0, len(mons), 3):
            t = m44[mons[b]] @ np.linalg.inv(m44[qc_of[q]])
            assert np.allclose(model.transfer_matrix(("q", q), ("b", b), "x"), t[:2, :2], atol=1e-9)
            assert np.allclose(model.transfer_matrix(("q", q), ("b", b), "y"), t[2:, 2:], atol=1e-9)


def test_pairs_nearest_quadrupole_corrector_choice_and_bad_input():
    prof = ab.load_profile(HMBA)
    model = bba_model(prof)
    pairs, skipped = bba_pairs(prof)
    assert not skipped and len(pairs) == 2 * len(prof.bpm_names)
    for p in pairs:  # the nearest quadrupole centre; every quadrupole device is its own power supply
        assert p.distance == pytest.approx(min(model.distance(p.bpm_index, k) for k in range(len(model.quads))))
        assert model.corrector_plane(p.corrector) == p.plane and abs(p.r_quad) > 0
    # a BPM farther than max_distance from any quadrupole is skipped, saying why
    pairs, skipped = bba_pairs(prof, bpms=[prof.bpm_names[4]], max_distance=0.1)
    assert not pairs and len(skipped) == 2 and "no quadrupole within 0.1 m" in skipped[0][2]
    # a given quadrupole per BPM, a corrector pool
    near = np.argsort([model.distance(0, k) for k in range(len(model.quads))])
    q = model.quads[int(near[1])].name  # the second nearest
    pool = [prof.families["HST"].device_names[1], prof.families["VST"].device_names[2]]
    pairs, _ = bba_pairs(prof, bpms=[prof.bpm_names[0]], quads=[q], correctors=pool)
    assert [p.quad for p in pairs] == [q, q] and [p.corrector for p in pairs] == pool


def test_bowtie_fit_recovers_a_known_crossing_with_consistent_uncertainty():
    """Synthetic bow-ties (rank 1, noisy): the crossing within its uncertainty, the pulls of unit width."""
    rng = np.random.default_rng(7)
    shape = rng.normal(0, 1, 40)
    pulls = []
    for _ in range(300):
        z = np.linspace(-100e-6, 100e-6, 5) + 30e-6
        d = np.outer(0.05 * (z - 12e-6), shape) + rng.normal(0, 0.1e-6, (5, 40))
        zn = z + rng.normal(0, 0.1e-6 / np.sqrt(2), 5)
        f = bowtie_fit(zn, d)
        pulls.append((f.offset - 12e-6) / f.uncertainty)
    assert abs(np.mean(pulls)) < 0.2 and 0.8 < np.std(pulls) < 1.25
    # an outlier point is rejected
    z = np.linspace(-100e-6, 100e-6, 7)
    d = np.outer(0.05 * (z - 12e-6), shape) + rng.normal(0, 0.1e-6, (7, 40))
    d[2] += 5e-6 * shape
    f = bowtie_fit(z, d)
    assert f.rejected.tolist() == [False, False, True, False, False, False, False]
    assert f.offset == pytest.approx(12e-6, abs=0.2e-6)


# ------------------------------------------------------------------------------------------------------------
# the truth
def test_truth_is_the_reading_of_the_beam_through_the_magnetic_centre(hmba):
    """``true_offset`` against the linear optics: the present reading plus ``m11`` times the distance of the beam
    from the magnetic centre at the quadrupole (noise-free reading; the BPM's gain applied)."""
    twin, prof = hmba.twin, hmba.profile
    model = bba_model(prof)
    pairs, _ = bba_pairs(prof)
    truth = true_offset(twin, [p.bpm for p in pairs], [p.quad for p in pairs], [p.plane for p in pairs])
    x, y = twin.orbit()
    xm, ym = twin.errors.bpm_transform(x, y)
    u = true_orbit_at_quads(twin, [p.quad for p in pairs])
    for p, t, uq in zip(pairs, truth, u):
        k = "xy".index(p.plane)
        gain = 1.0 + twin.errors.bpm_gain[p.bpm_index, k]
        linear = (xm, ym)[k][p.bpm_index] - gain * p.m11 * uq[k]
        assert t == pytest.approx(linear, abs=0.02 * abs(uq[k]) + 20e-9)
    # the magnet's frame: the orbit at the centre in lattice coordinates (mean of the magnet's ends) minus its offset
    import at

    for p, uq in zip(pairs[:6], u[:6]):
        r = model.quads[p.quad_index].refpt
        ends = at.lattice_pass(twin.ring, np.asfortranarray(twin.observables().orbit0.reshape(6, 1)),
                               refpts=np.array([r, r + 1], dtype=np.uint32))[[0, 2], 0, :, 0].mean(axis=1)
        shift = np.array([twin.errors.dx.get(r, 0.0), twin.errors.dy.get(r, 0.0)])
        assert np.allclose(uq, ends - shift, atol=0.1 * np.abs(uq).max() + 0.2e-6)
    # with the BPM offset and the magnet's own offset in it: far from the BPM offset alone
    assert _rms(truth + twin.errors.bpm_offset[[p.bpm_index for p in pairs], [("xy".index(p.plane)) for p in pairs]]) \
        > 10e-6
    assert model.quads[pairs[0].quad_index].name == pairs[0].quad


# ------------------------------------------------------------------------------------------------------------
# measurements on one cell
def test_run_holds_one_event_per_read_and_the_result(hmba, RE, catalog, docs):
    uid = RE(ap.measure_bba(hmba, bpms=hmba.bpm.names[3:4], planes=("y",), n_steps=1, figure_dir=False)).plan_result
    start = catalog[uid].metadata["start"]
    assert len(events(docs)) == start["num_points"] == 2 + 2 * 3
    assert start["tool"] == "bba" and start["bba_measurements"][0][:2] == [hmba.bpm.names[3], "y"]
    back, r = BBAResult.from_run(catalog[uid]), remembered(uid)[1]
    assert back.bpm_names == r.bpm_names and np.allclose(back.offset, r.offset, equal_nan=True)
    assert back.quad_names == r.quad_names and back.corrector_names == r.corrector_names
    assert back.moves == r.moves and np.isnan(back.offset[0, 0]) and np.isfinite(back.offset[0, 1])
    assert np.allclose(back.bowtie_z, r.bowtie_z, equal_nan=True)


def test_quadcenter_recovers_the_offsets_and_restores(hmba, RE, tmp_path):
    before = hmba.twin.snapshot()
    uid = RE(ap.measure_bba(hmba, figure_dir=tmp_path)).plan_result
    assert same(hmba.twin.snapshot(), before)
    r = remembered(uid)[1]
    err, unc, planes = _errors(hmba, r)
    assert err.size == 2 * len(hmba.bpm.names)
    for p in "xy":  # one cell: 0.1 um BPM noise, a few per cent model error of the angle correction
        assert _rms(err[planes == p]) < 2e-6
        assert 0.4 < _rms(err[planes == p]) / _rms(unc[planes == p]) < 2.5
    assert r.moves == int(np.sum(r.moves_per_bpm)) == 26 * len(r.bpm_names)  # 2 x (2 x 5) + 6 per BPM
    assert list(tmp_path.glob("measure_bba_*_bba.png"))


def test_bad_input_refused_nothing_moved(hmba, RE):
    before = hmba.twin.snapshot()
    with pytest.raises(ToolError, match="method must be one of"):
        RE(ap.measure_bba(hmba, method="fast"))
    with pytest.raises(ToolError, match="planes must be among"):
        RE(ap.measure_bba(hmba, planes=("z",)))
    with pytest.raises(ToolError, match="is a quadrupole family"):
        RE(ap.measure_bba(hmba, bpms=hmba.bpm.names[:1], quads=["QF1"]))
    with pytest.raises(ToolError, match="no quadrupole within 0.01 m"):
        RE(ap.measure_bba(hmba, bpms=hmba.bpm.names[:2], max_distance=0.01))
    with pytest.raises(ParameterError, match=r"n_steps .* must be >= 1"):
        RE(ap.measure_bba(hmba, n_steps=0))
    assert same(hmba.twin.snapshot(), before)


def test_dead_corrector_skips_that_bpm_only(RE):
    """A corrector that does not move (its supply dead): that BPM is reported and skipped, the others measured."""
    m = _corrected(HMBA, RE)
    auto = {p.corrector for p in bba_pairs(m.profile, bpms=m.bpm.names[1:3], planes=("x",))[0]}
    other = next(c for c in m.profile.families["HST"].device_names if c not in auto)
    dev = m.device(other)
    m.twin.anomalies.dead(dev.family_name, dev.index)
    with pytest.warns(UserWarning, match="dead or disconnected"):
        uid = RE(ap.measure_bba(m, bpms=m.bpm.names[:3], planes=("x",), correctors={m.bpm.names[0]: other},
                                figure_dir=False)).plan_result
    r = remembered(uid)[1]
    assert r.corrector_names[0][0] == other and np.isnan(r.offset[0, 0]) and np.all(np.isfinite(r.offset[1:, 0]))
    assert any(s.startswith(f"{m.bpm.names[0]} x: no lever arm") and "dead or disconnected" in s for s in r.messages)


def test_beam_lost_midway_stops_and_restores(RE, catalog):
    m = _corrected(HMBA, RE)
    before = m.twin.snapshot()
    hook = Interrupt(m, 9, m.twin.anomalies.lose_beam)
    with pytest.raises(BeamLostError, match="beam lost while BBA of"):
        RE(hook(ap.measure_bba(m, figure_dir=False)))
    assert same(m.twin.snapshot(), before)


@pytest.mark.parametrize("method", ["quadcenter", "parallel"])
def test_interrupted_bba_restores_every_setpoint(method, hmba, RE):
    before = hmba.twin.snapshot()
    stops = []
    token = RE.subscribe(lambda n, d: stops.append(d) if n == "stop" else None)
    for mode in ("exception", "abort", "stop"):
        k = draw_step(f"bba-{method}", mode, 4, 40)
        hook = Interrupt(hmba, k, RuntimeError("injected fault") if mode == "exception" else "pause")
        run_interrupted(RE, hook, ap.measure_bba(hmba, method=method, figure_dir=False), mode, lambda: stops)
        assert hook.fired and hook.changed, f"{method}: nothing had moved before step {k}"
        assert same(hmba.twin.snapshot(), before), f"{method}: not restored after {mode} at step {k}"
    RE.unsubscribe(token)


# ------------------------------------------------------------------------------------------------------------
# EBS: parallel against serial, the golden orbit
def test_ebs_parallel_against_serial_and_golden_orbit(ebs, RE):
    names = ebs.bpm.names
    serial_bpms = [names[i] for i in range(3, len(names), 45)]
    us = RE(ap.measure_bba(ebs, bpms=serial_bpms, figure_dir=False)).plan_result
    up = RE(ap.measure_bba(ebs, method="parallel", figure_dir=False)).plan_result
    rs, rp = remembered(us)[1], remembered(up)[1]
    es, _, _ = _errors(ebs, rs)
    ep, unp, pp = _errors(ebs, rp)
    assert ep.size == 2 * len(names) and rp.method == "parallel"
    assert _rms(es) < 1.5e-6 and _rms(ep) < 1.5e-6
    for p in "xy":
        assert 0.5 < _rms(ep[pp == p]) / _rms(unp[pp == p]) < 2.0
    assert rs.moves / len(rs.bpm_names) >= 8 * rp.moves / len(rp.bpm_names)
    # the golden orbit: the true orbit at the quadrupoles after correcting to it, against correcting to zero readings
    # (the same correction from the same machine state)
    quads = sorted({q for qq in rp.quad_names for q in qq})
    snap = RE(snapshot_setpoints(ebs)).plan_result
    RE(ap.correct_orbit(ebs, **CORRECT))
    zero = _rms(true_orbit_at_quads(ebs.twin, quads))
    RE(restore_setpoints(ebs, snap))
    golden = RE(ap.apply_bba(ebs, bba=up)).plan_result
    RE(ap.correct_orbit(ebs, target=golden, **CORRECT))
    assert zero / _rms(true_orbit_at_quads(ebs.twin, quads)) >= 3.0
    gx, _, meas = rp.golden_orbit(names)
    assert meas.all() and np.allclose(remembered(golden)[1]["golden_x"], gx)


def test_an_uncorrected_orbit_is_named_and_the_offsets_are_worse(RE, catalog):
    """BBA on an orbit far from a corrected one: the quadrupole steps change the optics through the sextupoles and
    the offsets are off by microns (EBS, parallel: 32 um rms at 1 mm against 0.6 um at 50 um). The plan says so (a
    warning and the run's messages, the start orbit's rms in the start document); on the corrected orbit it does
    not."""
    m = _corrected(HMBA, RE)
    bpms = m.bpm.names[1:3]
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        ok = remembered(RE(ap.measure_bba(m, bpms=bpms, figure_dir=False)).plan_result)[1]
    assert not [w for w in quiet if "max_orbit_rms" in str(w.message)]
    e_ok, _, _ = _errors(m, ok)  # (the truth is of the orbit the measurement started from)
    for fam in ("HST", "VST"):  # an orbit of ~1 mm: every corrector of the cell at a random kick
        k = len(m.families[fam])
        m.twin.set_setpoint(fam, np.asarray(m.twin.get_setpoint(fam)) + np.random.default_rng(3).normal(0, 2.0, k))
    x, y = m.twin.errors.bpm_transform(*m.twin.orbit())
    want = [_rms(x), _rms(y)]
    assert max(want) > 3 * ab_bba.MAX_ORBIT_RMS
    with pytest.warns(UserWarning, match=r"the orbit it starts from is \d+ / \d+ um rms .* Correct the orbit first"):
        uid = RE(ap.measure_bba(m, bpms=bpms, figure_dir=False)).plan_result
    bad = remembered(uid)[1]
    start = catalog[uid].metadata["start"]
    assert np.allclose(start["start_orbit_rms"], want, rtol=0.02) and start["max_orbit_rms"] == ab_bba.MAX_ORBIT_RMS
    assert any("Correct the orbit first" in s for s in bad.messages)
    e_bad, _, _ = _errors(m, bad)
    assert _rms(e_ok) < 1e-6 and _rms(e_bad) > 20e-6  # measured 0.38 um at 0.1 mm, 53 um at 0.48 / 1.18 mm
