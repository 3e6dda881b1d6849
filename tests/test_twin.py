"""The twin against pyAT's own answers (the truth), errors, anomalies, LUME interface."""

from __future__ import annotations

import threading

import at
import numpy as np
import pytest

from acc_bluesky.profile import LimitError
from acc_bluesky.twin import ErrorModel, Twin, UnknownDevice


def test_ideal_machine_equals_pyat(ebs, twin_ideal):
    ring = ebs.load_lattice()
    _, orbit = at.find_orbit4(ring, refpts=ebs.bpm_refpts, df=0.0)
    x, y = twin_ideal.read_bpms()
    assert np.array_equal(x, orbit[:, 0]) and np.array_equal(y, orbit[:, 2])  # no errors, no noise: exact
    _, ringdata, _ = at.get_optics(ring)
    assert np.allclose(twin_ideal.tunes(), ringdata.tune[:2] % 1, atol=1e-12)
    assert np.allclose(twin_ideal.chromaticity(), at.get_chrom(ring), atol=1e-9)


def test_ideal_machine_kick_matches_pyat(ebs, twin_ideal):
    ring = ebs.load_lattice()
    sext = ebs.families["HST"].refpts
    twin_ideal.set_setpoint("HST", 2.0, index=10)  # 2 A * 5e-5 rad/A = 100 urad
    ring[int(sext[10])].KickAngle = np.array([1e-4, 0.0])
    _, orbit = at.find_orbit4(ring, refpts=ebs.bpm_refpts, df=0.0)
    x, y = twin_ideal.read_bpms()
    assert np.max(np.abs(x - orbit[:, 0])) < 1e-10
    assert np.max(np.abs(orbit[:, 0])) > 1e-4  # the kick did something


def test_errored_orbit_equals_pyat_on_errored_lattice(twin_errors):
    t = twin_errors
    t.set_setpoint("VST", -1.5, index=3)
    t.set_rf_frequency(t.rf_frequency + 30.0)
    x, y = t.orbit()
    frf = t.rf_nominal_frequency
    _, orbit = at.find_orbit4(t.ring, refpts=t.bpm_refpts, df=t.df)
    assert np.max(np.abs(x - orbit[:, 0])) < 1e-9 and np.max(np.abs(y - orbit[:, 2])) < 1e-9
    assert frf > 0


def test_bpm_readings_are_truth_transformed_by_declared_errors(ebs):
    t = Twin(ebs, seed=4)
    t.noise_on = False
    x, y = t.orbit()
    xm, ym = t.read_bpms()
    em = t.errors
    c, s = np.cos(em.bpm_roll), np.sin(em.bpm_roll)
    u, v = x - em.bpm_offset[:, 0], y - em.bpm_offset[:, 1]
    assert np.allclose(xm, (1 + em.bpm_gain[:, 0]) * (c * u + s * v), rtol=0, atol=1e-15)
    assert np.allclose(ym, (1 + em.bpm_gain[:, 1]) * (-s * u + c * v), rtol=0, atol=1e-15)
    assert np.std(em.bpm_offset) == pytest.approx(50e-6, rel=0.25)


def test_noise_is_seeded_and_of_declared_size(ebs):
    a, b = Twin(ebs, seed=7), Twin(ebs, seed=7)
    ra = np.array([a.read_bpms()[0] for _ in range(30)])
    rb = np.array([b.read_bpms()[0] for _ in range(30)])
    assert np.array_equal(ra, rb)
    assert np.std(ra - ra.mean(axis=0)) == pytest.approx(1e-7, rel=0.1)


def test_errors_are_truncated_and_scaled(ebs):
    em = ErrorModel.generate(ebs, seed=3)
    quads = ebs.select(ebs.spec.errors.magnets[0].select)
    dx = np.array([em.dx[int(r)] for r in quads])
    sigma = 100e-6 * ebs.spec.errors.scale
    assert np.max(np.abs(dx)) <= 2.5 * sigma + 1e-15
    assert np.std(dx) == pytest.approx(sigma, rel=0.2)


def test_corrector_calibration_error_changes_the_true_kick(ebs):
    t = Twin(ebs, seed=2)
    err = t.errors.corrector_calibration["HST"][5]
    t.set_setpoint("HST", 3.0, index=5)
    e = t.ring[int(ebs.families["HST"].refpts[5])]
    assert e.KickAngle[0] == pytest.approx(3.0 * 5e-5 * (1 + err), rel=1e-12)
    assert t.get_strength("HST", 5) == pytest.approx(3.0 * 5e-5)  # nominal: what the device reports


def test_lazy_cache_one_solve_per_state(twin_errors):
    t = twin_errors
    t.orbit()
    n0 = t.stats["solves"]
    for i in range(20):
        t.set_setpoint("HST", 0.01 * i, index=i)
    t.read_bpms(), t.read_bpms(), t.orbit()
    assert t.stats["solves"] == n0 + 1


def test_limits_refused_before_anything_moves(twin_errors):
    t = twin_errors
    before = t.snapshot()
    with pytest.raises(LimitError, match=r"HST_004.*outside the limits"):
        t.set_setpoint("HST", 9.0, index=3)
    with pytest.raises(LimitError):
        t.set({"HST_001": 1.0, "VST_002": 99.0})  # all-or-nothing
    after = t.snapshot()
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)


def test_unknown_family_lists_valid_names(twin_errors):
    with pytest.raises(UnknownDevice, match=r"unknown family 'QF9'; valid families: \[.*'QD3'"):
        twin_errors.set_setpoint("QF9", 1.0)
    with pytest.raises(UnknownDevice, match="unknown variable"):
        twin_errors.get(["HST_999"])


def test_beam_loss_gives_nan_and_zero_current(twin_errors):
    t = twin_errors
    assert t.beam_current() > 0.19
    t.anomalies.lose_beam()
    x, y = t.read_bpms()
    assert np.all(np.isnan(x)) and np.all(np.isnan(y))
    assert t.beam_current() == 0.0 and t.beam_lost and "anomaly" in t.loss_reason
    t.inject()
    assert not t.beam_lost and np.all(np.isfinite(t.read_bpms()[0]))


def test_unstable_lattice_loses_beam_without_exception(ebs):
    t = Twin(ebs, seed=None)
    t.set_setpoint("QF2", 140.0)  # far too strong: no stable optics / closed orbit
    t.set_setpoint("QD3", -140.0)
    t.set_setpoint("QF5", 140.0)
    x, _ = t.read_bpms()
    assert np.all(np.isnan(x)) and np.all(np.isnan(t.tunes()))
    assert t.beam_lost and t.beam_current() == 0.0
    t.reset()
    assert np.all(np.isfinite(t.read_bpms()[0])) and np.all(np.isfinite(t.tunes()))


def test_closed_orbit_on_unstable_optics_is_a_lost_beam(ebs):
    """QF2 10 % too strong: a closed orbit still exists (the ideal machine's is zero) but the one-turn map is
    unstable: no beam survives, so the BPMs read NaN and the current is 0, with the reason; restored, it is back."""
    t = Twin(ebs, seed=None)
    sp = t.get_setpoint("QF2")
    t.set_setpoint("QF2", sp * 1.1)
    x, y = t.read_bpms()
    assert np.all(np.isnan(x)) and np.all(np.isnan(y)) and t.beam_lost and t.beam_current() == 0.0
    assert "unstable optics" in t.observables().reason
    t.set_setpoint("QF2", sp * 1.005)  # a small step stays stable
    assert not t.beam_lost and np.all(np.isfinite(t.read_bpms()[0])) and t.beam_current() > 0.19


@pytest.fixture
def tbt_hmba_profile():
    """A fresh HMBA test profile (the test changes a limit in it)."""
    from pathlib import Path

    from acc_bluesky.profile import load_profile

    return load_profile(Path(__file__).parent / "profiles" / "tbt_hmba" / "profile.yaml")


def _ramp_until_lost(profile, q0, scale: float, pattern, step: float, mode: str, n: int = 400):
    """QD2 at ``scale`` of its setpoints (just stable), then every VST corrector ramped by ``step * pattern`` per
    move: the first move [count] at which the beam is lost, the reason, the stability maps computed."""
    t = Twin(profile, seed=1)
    if mode == "every solve":
        t.STABILITY_ORBIT_TOLERANCE = t.STABILITY_ORBIT_TOLERANCE_MAX = 0.0
    elif mode == "fixed":
        t.STABILITY_ORBIT_TOLERANCE_MAX = 0.0  # the fixed 0.2 mm of before the feed-down rate was measured
    t.set_setpoint("QD2", q0 * scale)
    assert not t.observables().lost
    s0, m0 = t.get_setpoint("VST"), t.stats["stability_maps"]
    for k in range(1, n):
        t.set_setpoint("VST", s0 + k * step * pattern)
        if t.observables().lost:
            return k, t.loss_reason, t.stats["stability_maps"] - m0
    raise AssertionError(f"the ramp never lost the beam ({mode})")


def test_stability_verdict_follows_the_feed_down_of_a_corrector_ramp(tbt_hmba_profile):
    """HMBA with errors, QD2 strengthened to 0.2 % below the edge of its half-integer stop band: ramping the
    vertical correctors (a random pattern, 5 mA per move) moves the orbit through the sextupoles until their
    feed-down makes the one-turn map unstable. The twin renews its verdict every 0.2 mm of orbit, or over a longer
    distance once two verdicts measured how fast the map's half-traces move with the orbit (a quarter of the way
    to a resonance at the fastest rate seen, up to 2 mm): it sees the loss within 5 moves of a twin that checks at
    every solve (202 / 207 here), never later than the fixed 0.2 mm, with fewer one-turn maps (8 / 14 / 202)."""
    prof = tbt_hmba_profile
    t = Twin(prof, seed=1)
    q0 = t.get_setpoint("QD2").copy()
    lo, hi = 1.0, 1.05  # the stop band's edge, by bisection on the QD2 scale
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        t.set_setpoint("QD2", q0 * mid)
        lo, hi = (lo, mid) if t.observables().lost else (mid, hi)
    t.set_setpoint("QD2", q0 * hi)
    assert "unstable optics" in t.loss_reason
    pattern = np.random.default_rng(1).normal(0.0, 1.0, len(t.family("VST").refpts))
    runs = {mode: _ramp_until_lost(prof, q0, lo * (1 - 2e-3), pattern, 0.005, mode)
            for mode in ("every solve", "fixed", "adaptive")}
    (k_all, why_all, maps_all), (k_fixed, _, maps_fixed), (k_new, why_new, maps_new) = runs.values()
    assert "unstable optics" in why_all and "unstable optics" in why_new
    assert k_all <= k_new <= k_all + 5 and k_new <= k_fixed
    assert maps_new < maps_fixed < maps_all


def test_anomalies(ebs):
    t = Twin(ebs, seed=None)
    t.anomalies.stuck("HST", 0)
    t.set_setpoint("HST", 2.0, index=0)
    assert t.get_setpoint("HST", 0) == 2.0 and t.get_readback("HST", 0) == 0.0
    assert np.allclose(t.orbit()[0], 0.0)
    t.anomalies.stuck("HST", 0, on=False)
    assert t.get_readback("HST", 0) == 2.0 and np.max(np.abs(t.orbit()[0])) > 1e-5
    t.anomalies.dead("HST", 0)
    assert t.get_readback("HST", 0) == 0.0 and np.allclose(t.orbit()[0], 0.0, atol=1e-10)  # solver tolerance 1e-11
    t.anomalies.clear()
    t.anomalies.dead_bpm(5)
    x, _ = t.read_bpms()
    assert np.isnan(x[5]) and np.isfinite(np.delete(x, 5)).all()
    q0 = t.tunes()
    t.anomalies.trip("QF2")
    assert np.all(t.get_readback("QF2") == 0.0)
    assert not np.allclose(t.tunes(), q0, atol=1e-3) or t.beam_lost
    t.anomalies.clear()
    assert np.allclose(t.tunes(), q0, atol=1e-12)


def _realistic_profile(ebs, tmp_path):
    """The EBS profile with a 10 A/s ramp on QF2 and BPMs acquiring at 10 Hz (set in the YAML, as a site would)."""
    import yaml

    spec = yaml.safe_load(ebs.path.read_text())
    spec["families"]["QF2"]["ramp_rate"] = 10.0
    spec["bpm"]["rate"] = 10.0
    path = tmp_path / "ebs_real" / "profile.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_ramp_rate_readback_lags(ebs, tmp_path):
    now = [0.0]
    t = Twin(_realistic_profile(ebs, tmp_path), seed=None, clock=lambda: now[0])
    start = float(t.get_readback("QF2", 0))
    t.set_setpoint("QF2", start + 5.0, index=0)
    assert t.get_setpoint("QF2", 0) == start + 5.0 and t.get_readback("QF2", 0) == start
    now[0] = 0.2
    assert t.get_readback("QF2", 0) == pytest.approx(start + 2.0)
    now[0] = 1.0
    assert t.get_readback("QF2", 0) == pytest.approx(start + 5.0)


def test_bpm_acquisition_rate_holds_each_acquisition(ebs, tmp_path):
    """At 10 Hz a read returns the acquisition of its 100 ms period: a corrector move shows from the next one."""
    now = [0.0]
    t = Twin(_realistic_profile(ebs, tmp_path), seed=None, clock=lambda: now[0])
    x0, _ = t.read_bpms()
    t.set_setpoint("HST", 2.0, index=5)
    now[0] = 0.05
    assert np.array_equal(t.read_bpms()[0], x0)  # same acquisition: the move is not seen yet
    now[0] = 0.1
    x1, _ = t.read_bpms()
    assert np.array_equal(x1, t.orbit()[0]) and np.max(np.abs(x1 - x0)) > 1e-5  # next acquisition: seen


def test_lume_interface(twin_errors):
    t = twin_errors
    v = t.supported_variables
    assert v["HST_001"]["units"] == "A" and v["HST_001"]["limits"] == [-8.0, 8.0]
    assert v["orbit:x"]["type"] == "output" and v["orbit:x"]["shape"] == [224]
    t.set({"HST_001": 1.0, "RF:frequency": t.rf_frequency + 10.0})
    out = t.get(["HST_001", "RF:frequency", "orbit:x", "tune:x", "beam:current"])
    assert out["HST_001"] == 1.0 and out["orbit:x"].shape == (224,) and 0 < out["tune:x"] < 1
    t.reset()
    assert t.get("HST_001")["HST_001"] == 0.0


def test_thread_safe_concurrent_sets_and_reads(ebs):
    t = Twin(ebs, seed=None)
    errors = []

    def writer(k):
        try:
            for i in range(20):
                t.set_setpoint("VST", 0.05 * ((i + k) % 5), index=(k * 20 + i) % 224)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    def reader():
        try:
            for _ in range(20):
                assert np.all(np.isfinite(t.read_bpms()[1]))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ths = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=reader)]
    [th.start() for th in ths]
    [th.join() for th in ths]
    assert not errors
    _, orbit = at.find_orbit4(t.ring, refpts=t.bpm_refpts, df=t.df)
    assert np.max(np.abs(t.orbit()[1] - orbit[:, 2])) < 1e-10


def test_foreign_pyat_call_does_not_corrupt_fast_path(ebs):
    """pyAT's converted lattice is global: another lattice tracked in between must not be mistaken for ours."""
    t = Twin(ebs, seed=1)
    t.orbit()
    other = ebs.load_lattice()
    at.find_orbit4(other)  # converts another lattice in the C engine
    t.set_setpoint("HST", 1.0, index=7)
    _, orbit = at.find_orbit4(t.ring, refpts=t.bpm_refpts, df=t.df)
    assert np.max(np.abs(t.orbit()[0] - orbit[:, 0])) < 1e-10


def test_trajectory_first_turns(ebs):
    t = Twin(ebs, seed=None)
    x, y = t.trajectory(nturns=3)
    assert x.shape == (3, 224) and np.allclose(x, 0.0)
    t.set_setpoint("HST", 2.0, index=0)
    x, _ = t.trajectory(nturns=1)
    sref = ebs.families["HST"].refpts[0]
    after = ebs.bpm_refpts > sref
    assert np.allclose(x[0, ~after], 0.0) and np.max(np.abs(x[0, after])) > 1e-5


def test_6d_profile_orbit_equals_pyat_and_follows_the_rf(ebs, tmp_path):
    """A profile asking for the 6D orbit (radiation, cavities): the twin's orbit is pyAT's find_orbit6 of the same
    lattice, with a corrector kick and after an RF step (the energy offset moves the orbit along the dispersion)."""
    import warnings

    import yaml

    spec = yaml.safe_load(ebs.path.read_text())
    spec["orbit_model"] = "6d"
    path = tmp_path / "ebs6d" / "profile.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    t = Twin(str(path), seed=None)
    assert t.is_6d
    ring = t.ring.deepcopy()
    bpms = t.profile.bpm_refpts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.set_setpoint("HST", 2.0, index=7)
        el = ring[int(t.profile.families["HST"].refpts[7])]
        el.KickAngle = [2.0 * 5e-5, 0.0]
        _, o = at.find_orbit6(ring, refpts=bpms)
        x, y = t.read_bpms()
        np.testing.assert_allclose(x, o[:, 0], rtol=0, atol=1e-9)
        f0 = t.rf_frequency_setpoint
        t.set_rf_frequency(f0 + 50.0)
        ring.set_rf_frequency(f0 + 50.0)
        _, o2 = at.find_orbit6(ring, refpts=bpms)
        x2, _ = t.read_bpms()
    np.testing.assert_allclose(x2, o2[:, 0], rtol=0, atol=1e-9)
    assert np.max(np.abs(x2 - x)) > 1e-5  # 50 Hz: a dispersive orbit of tens of um
    assert np.all(o2[:, 4] < 0) and np.all(np.isfinite(t.tunes()))  # higher frequency: lower energy
