"""Turn-by-turn optics: the twin's beam (pinger, BPM acquisitions, losses) and the analysis, against the truth.

Truth: the same kicked particle tracked without BPM errors or noise (``Acquisition.x_true``), pyAT's linear optics
of the twin's errored lattice, and pyAT's optics of the design lattice on the ideal twin. Logic on a small ring
(six HMBA cells, ``tests/profiles/tbt_hmba``); the acceptance figures on the EBS twin.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from acc_bluesky.analysis import CorrectionSystem, model_orm
from acc_bluesky.analysis.tbt import (
    TbtResult,
    analyse_tbt,
    bpm_tunes,
    kick_for_amplitude,
    model_optics,
)
from acc_bluesky.profile import load_profile
from acc_bluesky.twin import Twin

HMBA = Path(__file__).parent / "profiles" / "tbt_hmba" / "profile.yaml"


@pytest.fixture(scope="module")
def hmba():
    return load_profile(HMBA)


def _true_phase(twin: Twin) -> np.ndarray:
    """Linear betatron phase [2 pi] at the BPMs of the twin's errored lattice, from BPM 0."""
    import at

    bpms = np.asarray(twin.bpm_refpts, dtype=int)
    pts = np.union1d(np.union1d(bpms, np.arange(0, len(twin.ring), 10)), [len(twin.ring)])  # no gap of a turn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ed = at.get_optics(twin.ring, refpts=pts, orbit=twin.observables().orbit0)
    twin._engine_gen = -1  # we converted the twin's lattice ourselves
    mu = ed.mu[np.searchsorted(pts, bpms), :2] / (2 * np.pi)
    return mu - mu[0]


def _correct_orbit(twin: Twin, iterations: int = 4) -> None:
    """Orbit correction with the RF frequency, straight on the twin (analysis.correction, model ORM)."""
    orm = model_orm(twin.profile, rf=True)
    system = CorrectionSystem.build(orm, fit_rf=True)
    s = system.solver.used_singular_values()
    nsv = int(np.sum(s >= 1e-3 * s[0]))
    cols: dict[str, list[tuple[int, int]]] = {}
    for j, name in enumerate(orm.corrector_names):
        fam = next(f for f in twin.family_names if name in twin.profile.families[f].device_names)
        cols.setdefault(fam, []).append((j, twin.profile.families[fam].device_names.index(name)))
    for _ in range(iterations):
        x, y = twin.read_bpms()
        dk, drf = system.step(np.concatenate([x, y]), n_sv=nsv)
        for fam, lst in cols.items():
            j = np.array([a for a, _ in lst])
            i = np.array([b for _, b in lst])
            lim = twin.family(fam).spec.limits
            twin.set_setpoint(fam, np.clip(twin.get_setpoint(fam)[i] + dk[j], lim.low, lim.high), index=i)
        twin.set_rf_frequency(twin.rf_frequency + drf)


# ------------------------------------------------------------------------------------------------------------
# acceptance on EBS
@pytest.fixture(scope="module")
def ebs_tbt():
    """EBS, profile errors, orbit corrected (with the RF), 10 um TbT noise, 1024 turns, a ~0.1 mm kick."""
    twin = Twin("ebs", seed=1)
    _correct_orbit(twin)
    kick = kick_for_amplitude(twin.profile, 1e-4)  # ~0.1 mm mean amplitude over the BPMs
    acq = twin.beam.kick_stored(kick, turns=1024)
    res = analyse_tbt(acq.x, acq.y, twin.profile, kick=acq.kick)
    truth = analyse_tbt(acq.x_true, acq.y_true, twin.profile, kick=acq.kick)
    twin.true_phase = _true_phase(twin)
    return twin, acq, res, truth


def test_ebs_tunes_within_1e5_of_the_noise_free_particle(ebs_tbt):
    twin, acq, res, truth = ebs_tbt
    assert twin.errors.tbt_noise == pytest.approx(10e-6)
    amp = np.sqrt(2) * np.std(acq.x_true, axis=0).mean(), np.sqrt(2) * np.std(acq.y_true, axis=0).mean()
    assert 0.08e-3 < amp[0] < 0.13e-3 and 0.08e-3 < amp[1] < 0.13e-3  # a ~0.1 mm kick
    assert np.all(np.abs(res.tunes - truth.tunes) < 1e-5)
    assert np.all(np.abs(res.tunes - twin.tunes()) < 1e-4)  # pyAT's linear tunes of the errored lattice
    assert not res.bad.any()


def test_ebs_phase_advance_within_1e3_rms(ebs_tbt):
    twin, _, res, _ = ebs_tbt
    true = twin.true_phase
    err = res.phase - true
    err -= err.mean(axis=0)  # the absolute phase is not observable
    rms = np.sqrt(np.mean(err**2, axis=0))
    assert rms.max() < 1e-3  # [2 pi]: the phase advance at every BPM
    assert np.abs(np.sqrt(np.mean(res.phase_err**2, axis=0)) / rms - 1).max() < 0.3  # its error is told right
    true_adv = np.diff(np.vstack([true, true[:1] + np.floor(res.tunes_model) + twin.tunes()]), axis=0)
    adv = np.sqrt(np.mean((res.phase_advance - true_adv) ** 2, axis=0))
    assert adv.max() < 1.6e-3  # BPM to BPM: two BPMs' noise


def test_ebs_beta_beat_from_phase_within_1_percent_of_the_truth(ebs_tbt):
    twin, _, res, _ = ebs_tbt
    mdl = model_optics(twin.profile)
    bx, by = twin.beta()
    true_bb = np.column_stack([bx, by]) / mdl.beta - 1
    assert np.sqrt(np.mean(true_bb**2, axis=0)).min() > 0.03  # a beta-beat worth measuring
    err = np.sqrt(np.mean((res.beta_beat - true_bb) ** 2, axis=0))
    assert err.max() < 0.01, err


# ------------------------------------------------------------------------------------------------------------
# logic on the small ring
def test_ideal_ring_gives_the_model_optics(hmba):
    twin = Twin(hmba, seed=None)
    mdl = model_optics(hmba)
    acq = twin.beam.kick_stored(kick_for_amplitude(hmba, 1e-5), turns=512)
    assert np.all(acq.x == acq.x_true)  # no BPM errors, no noise
    res = analyse_tbt(acq.x, acq.y, hmba, n_bpm=3)
    assert np.abs(res.tunes - mdl.fractional_tunes).max() < 2e-6
    assert np.abs(res.phase - res.phase_model).max() < 1e-5
    assert np.abs(res.beta / mdl.beta - 1).max() < 1e-4
    assert res.bpm_names == list(hmba.bpm_names)


def test_bpm_tunes_on_the_right_side_of_one_half(hmba):
    """A real signal shows q and 1 - q: the model tells which (the NAFF method is compared in the benchmark)."""
    n = np.arange(512)
    sig = np.column_stack([1e-4 * np.cos(2 * np.pi * 0.71234 * n + 0.3), 1e-4 * np.cos(2 * np.pi * 0.21234 * n)])
    assert np.abs(bpm_tunes(sig, 0.7)[0] - 0.71234) < 1e-8 and np.abs(bpm_tunes(sig, 0.2)[1] - 0.21234) < 1e-8
    sig[:, 1] = np.nan
    assert np.isnan(bpm_tunes(sig, 0.7)[1])
    with pytest.raises(ValueError, match="method must be"):
        bpm_tunes(sig, 0.3, method="sussix")


def test_bad_bpms_are_flagged_and_left_out(hmba):
    twin = Twin(hmba, seed=3)
    twin.anomalies.dead_bpms.add(5)
    acq = twin.beam.kick_stored(kick_for_amplitude(hmba, 1e-4), turns=1024)
    x, y = acq.x.copy(), acq.y.copy()
    rng = np.random.default_rng(0)
    x[:, 11] += rng.normal(0, 200e-6, x.shape[0])  # a noisy BPM
    y[:, 20] = y[0, 20]  # a frozen BPM
    res = analyse_tbt(x, y, hmba)
    assert res.bad[5].all() and res.bad[11, 0] and res.bad[20, 1]
    assert res.bad.sum() == 4
    assert np.isnan(res.beta[5]).all() and np.isfinite(res.beta[~res.bad]).all()
    assert any(hmba.bpm_names[11] in r and "noise" in r for r in res.bad_reasons["x"])
    clean = analyse_tbt(acq.x_true, acq.y_true, hmba)
    assert np.abs(res.tunes - clean.tunes).max() < 1e-5


def test_kicker_at_an_element_gives_the_same_optics(hmba):
    twin = Twin(hmba, seed=None)
    k = int(hmba.families["HST"].refpts[10])
    kick = kick_for_amplitude(hmba, 1e-4, kicker=k)
    twin.beam.set_kick(kick, kicker=k)
    twin.beam.set_mode("tbt", turns=512)
    acq = twin.beam.trigger()
    upstream = hmba.bpm_refpts < k
    assert np.allclose(acq.x_true[0, upstream], 0.0, atol=1e-12)  # turn 0 before the pinger: the closed orbit
    assert np.abs(acq.x_true[0, ~upstream]).max() > 1e-6
    res = analyse_tbt(acq.x, acq.y, hmba, first_turn=1, n_bpm=3)
    assert np.abs(res.phase - res.phase_model).max() < 5e-5  # 0.1 mm in the sextupoles: a little nonlinearity
    with pytest.raises(ValueError, match="no KickAngle"):
        twin.beam.set_kick(kick, kicker=int(hmba.bpm_refpts[0]))


def test_lost_beam_reads_nan_after_the_loss_point(hmba):
    twin = Twin(hmba, seed=1)
    acq = twin.beam.kick_stored((2.5e-3, 0.0), turns=64)
    assert acq.lost and acq.lost_turn is not None and acq.lost_element is not None
    flat = acq.x.reshape(-1)
    k = acq.bpms_reached
    assert np.all(np.isnan(flat[k:])) and np.all(np.isfinite(flat[:k]))
    assert acq.lost_element_name == twin.ring[acq.lost_element].FamName
    assert acq.transmission()["lost_turn"] == acq.lost_turn
    assert "aperture" in acq.reason


def test_no_closed_orbit_no_stored_beam_but_trajectories(hmba):
    twin = Twin(hmba, seed=0, error_scale=1.0)
    assert twin.observables().lost  # this seed at full errors has no closed orbit
    tbt = twin.beam.kick_stored((1e-5, 1e-5), turns=16)
    assert tbt.lost_turn == 0 and np.isnan(tbt.x).all()
    traj = twin.beam.inject(turns=2)
    assert 0 < traj.bpms_reached < 120 and np.isfinite(traj.x[0, :traj.bpms_reached]).all()


def test_injected_beam_is_seeded_and_deterministic(hmba):
    a, b, c = Twin(hmba, seed=4), Twin(hmba, seed=4), Twin(hmba, seed=5)
    assert np.array_equal(a.beam.injection_error, b.beam.injection_error)
    assert not np.array_equal(a.beam.injection_error, c.beam.injection_error)
    b.read_bpms()  # other draws do not shift the beam's streams
    s1, s2 = a.beam.inject(turns=2), b.beam.inject(turns=2)
    assert np.array_equal(s1.x, s2.x, equal_nan=True) and np.array_equal(s1.start, s2.start)
    assert not np.array_equal(a.beam.inject(turns=2).start, s1.start)  # jitter from shot to shot
    spec = hmba.spec.errors.injection
    assert np.all(np.abs(a.beam.injection_error[:4]) <= 2.5 * np.array([spec.x, spec.px, spec.y, spec.py]))
    ideal = Twin(hmba, seed=None)
    assert np.array_equal(ideal.beam.injection_error, np.zeros(6))
    assert np.array_equal(ideal.beam.inject().x, ideal.beam.inject().x, equal_nan=True)


def test_injection_trims_and_limits(hmba):
    twin = Twin(hmba, seed=None)
    twin.beam.set_injection([1e-3, 0.0, 0.0, 0.0])
    acq = twin.beam.inject(turns=1)
    assert acq.x_true[0, 0] != 0.0 and acq.start[0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="beyond the limits"):
        twin.beam.set_injection([0.0, 5e-3, 0.0, 0.0])
    assert twin.beam.injection_trim[0] == pytest.approx(1e-3)  # nothing set by the refused call
    with pytest.raises(ValueError, match="acquisition mode"):
        twin.beam.set_mode("turn-by-turn")
    twin.reset()
    assert twin.beam.mode == "orbit" and not twin.beam.injection_trim.any()


def test_decoherence_with_many_particles(hmba):
    twin = Twin(hmba, seed=None)
    twin.beam.emittance, twin.beam.energy_spread = (1e-10, 1e-12), 1e-3  # m rad, dp/p
    twin.set_setpoint("SD1", twin.get_setpoint("SD1") * 1.3)  # chromaticity: energy spread decoheres
    one = twin.beam.kick_stored((5e-5, 0.0), turns=250)
    many = twin.beam.kick_stored((5e-5, 0.0), turns=250, nparticles=12)
    a1 = np.abs(one.x_true[-50:]).max() / np.abs(one.x_true[:50]).max()
    am = np.abs(many.x_true[-50:]).max() / np.abs(many.x_true[:50]).max()
    assert a1 > 0.95 and am < 0.7
    assert many.nparticles == 12 and np.all(many.intensity == 1.0)


def test_twin_beam_is_thread_safe(hmba):
    twin = Twin(hmba, seed=6)
    errors: list[BaseException] = []

    def shots():
        try:
            for _ in range(20):
                assert twin.beam.inject(turns=2).x.shape == (2, 60)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def moves():
        try:
            for k in range(20):
                twin.set_setpoint("HST", 0.1 * k, index=3)
                twin.read_bpms()
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    ts = [threading.Thread(target=shots), threading.Thread(target=moves)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_result_round_trip_and_figure(hmba, tmp_path):
    twin = Twin(hmba, seed=2)
    acq = twin.beam.kick_stored(kick_for_amplitude(hmba, 1e-4), turns=256)
    res = analyse_tbt(acq.x, acq.y, hmba, kick=acq.kick, metadata={"seed": 2})
    stored = res.to_results()
    assert set(TbtResult.result_units()) >= set(stored)
    run = {"start": {"uid": "0123456789", "tool": "tbt", **res.start_metadata()}, **stored}
    back = TbtResult.from_run(run)
    assert back.bpm_names == res.bpm_names and back.uid == "0123456789"
    for k in ("tunes", "phase", "beta", "kick", "beta_model"):
        assert np.array_equal(getattr(back, k), getattr(res, k), equal_nan=True)
    assert back.kick[0] == pytest.approx(acq.kick[0])
    with pytest.raises(ValueError, match="not a 'tbt' run"):
        TbtResult.from_run({"start": {"tool": "orbit_response"}, **stored})
    with pytest.raises(KeyError, match="no TbT optics"):
        TbtResult.from_results({"tunes": res.tunes})
    path = res.plot(tmp_path / "tbt.png")
    assert path.exists() and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="model has"):
        analyse_tbt(acq.x[:, :10], acq.y[:, :10], hmba)
