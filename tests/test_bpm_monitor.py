"""monitor_bpms (MML's ``monbpm``) against the twin's truth: the injected BPM noise, the readings the BPM errors
make of the true orbit, and the BPMs the anomalies broke (noisy, frozen, dead).

Tolerances: one BPM's noise from k readings has a relative error of 1/sqrt(2(k-1)) (5 % at k = 200); the floor is
a median over 224 BPMs (0.4 %), so it is within 3 % of the injected 0.1 um; a noisy BPM's noise within 20 %
(4 sigma) of its truth; each BPM's mean within 5 sigma of the mean the BPM errors make of the true orbit.
"""

from __future__ import annotations

import numpy as np
import pytest

from acc_bluesky.analysis import BpmStatistics, bpm_statistics
from acc_bluesky.data import read_stream
from acc_bluesky.plan_stubs import BeamLostError
from acc_bluesky.plans import monitor_bpms


def test_monitor_bpms_measures_the_noise_and_flags_the_broken_bpms(machine, RE, catalog, tmp_path):
    twin = machine.twin
    noise = twin.errors.bpm_noise
    assert noise == pytest.approx(1e-7)
    twin.anomalies.noisy_bpm(7, 20 * noise)  # failing electronics
    twin.anomalies.frozen_bpm(30)  # a stalled acquisition
    twin.anomalies.dead_bpm(101)  # no signal, yet in service in the profile
    before = twin.snapshot()
    truth = np.concatenate(twin.errors.bpm_transform(*twin.orbit()))  # the noise-free readings
    k = 200
    uid = RE(monitor_bpms(machine, n_readings=k, figure_dir=tmp_path))
    st = BpmStatistics.from_run(catalog[uid])
    names = machine.bpm.names
    assert st.n_readings == k and st.bpm_names == names and st.uid == uid
    # the floor is the injected noise; the noisy BPM reads sqrt(noise^2 + (20 noise)^2)
    np.testing.assert_allclose(st.noise, [noise, noise], rtol=0.03)
    np.testing.assert_allclose(st.std[7], np.hypot(noise, 20 * noise), rtol=0.2)
    assert np.all(st.std[30] == 0.0) and np.all(np.isnan(st.std[101]))
    # exactly the broken BPMs are flagged, each for its fault
    assert st.flags() == {"dead": [names[101]], "frozen": [names[30]], "noisy": [names[7]]}
    assert st.suspect == [names[7], names[30], names[101]]
    assert "dead: BPM_102 (1)" in st.summary() and f"noise floor x {st.noise[0] * 1e6:.3g} um" in st.summary()
    # the means are the readings of the true orbit, to the noise of a mean
    ok = np.ones(len(names), dtype=bool)
    ok[[7, 30, 101]] = False
    mean = np.concatenate([st.mean[:, 0], st.mean[:, 1]])
    assert np.max(np.abs(mean - truth)[np.concatenate([ok, ok])]) < 5 * noise / np.sqrt(k)
    # every reading is an event; nothing moved
    prim = read_stream(catalog[uid])
    assert len(prim["time"]) == k and prim["bpm_reading-x"].shape == (k, len(names))
    after = twin.snapshot()
    assert all(np.array_equal(before[f], after[f]) for f in before)
    md = catalog[uid].metadata["start"]
    assert md["tool"] == "bpm_statistics" and md["num_points"] == k and md["bpm_names"] == names
    assert catalog[uid].metadata["stop"]["exit_status"] == "success"
    (png,) = tmp_path.glob("monitor_bpms_*_bpm_noise.png")
    assert png.stat().st_size > 20_000


def test_monitor_bpms_refuses_bad_input_and_keeps_the_readings_of_a_lost_beam(machine, RE, catalog):
    with pytest.raises(ValueError, match="n_readings must be an integer >= 2"):
        RE(monitor_bpms(machine, n_readings=1))
    with pytest.raises(ValueError, match="noisy_factor must be a number > 1"):
        RE(monitor_bpms(machine, noisy_factor=1.0))
    with pytest.raises(ValueError, match="period must be a time >= 0 s"):
        RE(monitor_bpms(machine, period=-1.0))
    with pytest.raises(ValueError, match="period must be a finite number, got nan; nothing was moved"):
        RE(monitor_bpms(machine, period=float("nan")))
    machine.twin.anomalies.lose_beam()
    with pytest.raises(BeamLostError, match="no beam to monitor the BPMs with"):
        RE(monitor_bpms(machine))
    assert len(list(catalog)) == 0  # refused before a run opened
    machine.twin.inject()

    seen = []

    def lose_at_the_fifth(name, doc):  # the beam dies while the plan reads
        if name == "event":
            seen.append(doc["seq_num"])
            if doc["seq_num"] == 5:
                machine.twin.anomalies.lose_beam()

    token = RE.subscribe(lose_at_the_fifth)
    try:
        with pytest.raises(BeamLostError, match="every in-service BPM reads NaN at reading 6 of 20"):
            RE(monitor_bpms(machine, n_readings=20, figure_dir=False))
    finally:
        RE.unsubscribe(token)
    (uid,) = list(catalog)
    run = catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "fail" and "beam lost" in run.metadata["stop"]["reason"]
    assert len(read_stream(run)["time"]) == 5 == len(seen)  # the readings taken are kept


def test_bpm_statistics_of_known_readings():
    rng = np.random.default_rng(3)
    k, n = 400, 40
    x = rng.normal(1e-4, 1e-6, (k, n))
    y = rng.normal(-2e-4, 2e-6, (k, n))
    x[:, 4] = x[0, 4]  # frozen in both planes
    y[:, 4] = y[0, 4]
    x[:, 9] = rng.normal(0, 1e-5, k)  # 10x the floor in x only
    y[17, 12] = np.nan  # one missed reading: dead
    names = [f"B{i}" for i in range(n)]
    good = np.ones(n, dtype=bool)
    good[33] = False
    x[:, 33] = np.nan  # out of service: not flagged
    st = bpm_statistics(x, y, names, in_service=good)
    np.testing.assert_allclose(st.std[:, 0][good & ~st.dead & ~st.frozen & ~st.noisy], 1e-6, rtol=0.15)
    np.testing.assert_allclose(st.noise, [1e-6, 2e-6], rtol=0.05)
    np.testing.assert_allclose(st.std[0], [np.std(x[:, 0], ddof=1), np.std(y[:, 0], ddof=1)], rtol=1e-12)
    assert st.flags() == {"dead": ["B12"], "frozen": ["B4"], "noisy": ["B9"]} and st.dead[33]
    np.testing.assert_allclose(st.mean[12], [np.mean(x[:, 12]), np.nanmean(y[:, 12])], rtol=1e-12)
    # a noise-free system cannot tell frozen from quiet: nothing flagged
    quiet = bpm_statistics(np.ones((5, 3)), np.zeros((5, 3)), ["a", "b", "c"])
    assert quiet.suspect == [] and np.all(quiet.std == 0) and np.all(quiet.noise == 0)
    # the results round trip
    back = BpmStatistics.from_results(st.to_results(), {"bpm_names": names})
    assert back.flags() == st.flags() and np.array_equal(back.std, st.std, equal_nan=True)
    with pytest.raises(ValueError, match="at least 2 readings"):
        bpm_statistics(x[:1], y[:1], names)
    with pytest.raises(ValueError, match=r"readings must be \(k, 40\)"):
        bpm_statistics(x[:, :5], y[:, :5], names)
    with pytest.raises(ValueError, match="noisy_factor must be a number > 1"):
        bpm_statistics(x, y, names, noisy_factor=0.5)
