"""measure_tbt through the devices (m.tbt, m.pinger, m.losses) against the twin's truth.

Truth: the same kicked particle tracked without noise (``twin.beam.kick_stored`` with the noise off: the BPMs'
true centroid) for the tunes; pyAT's linear optics of the twin's errored lattice around its closed orbit
(``get_optics(twin.ring, orbit=...)``) for the phase advance and the true beta-beat; pyAT's linear tunes of the
errored ring.
Small ring (six HMBA cells, 60 BPMs) for the logic, EBS (224 BPMs, profile errors, 10 um TbT noise) for the
acceptance figures of the issue.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import at
import numpy as np
import pytest
from helpers import Interrupt, module_catalog, module_run_engine, run_interrupted  # noqa: F401 - fixtures

import acc_bluesky as ab
from acc_bluesky import plans as ap
from acc_bluesky.analysis._common import rms
from acc_bluesky.analysis.tbt import TbtResult, analyse_tbt, model_optics
from acc_bluesky.plan_stubs.checks import ParameterError
from acc_bluesky.plan_stubs.machine import BeamLostError

HMBA = Path(__file__).parent / "profiles" / "tbt_hmba" / "profile.yaml"


@pytest.fixture(scope="module")
def hmba_machine():
    return ab.connect(ab.load_profile(HMBA), seed=1)


def _truth(machine, kick, turns):
    """Tunes of the same kicked particle without noise, the true phase advance and beta-beat at the BPMs."""
    tw = machine.twin
    noise, tw.noise_on = tw.noise_on, False
    saved = tw.beam.kick.copy()
    try:
        acq = tw.beam.kick_stored(kick, turns=turns)
    finally:
        tw.noise_on = noise
        tw.beam.set_kick(saved)
    clean = analyse_tbt(acq.x_true, acq.y_true, machine, kick=kick)
    # pyAT's linear optics of the errored lattice around the twin's closed orbit (with its energy offset: the RF
    # frequency moves it)
    bpms = np.asarray(tw.bpm_refpts, dtype=int)
    pts = np.union1d(np.union1d(bpms, np.arange(0, len(tw.ring), 10)), [len(tw.ring)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ed = at.get_optics(tw.ring, refpts=pts, orbit=tw.observables().orbit0)
    tw._engine_gen = -1  # pyAT converted the lattice afresh: the twin's kept one is stale
    b = np.searchsorted(pts, bpms)
    phase = ed.mu[b, :2] / (2 * np.pi)
    beat = ed.beta[b, :2] / model_optics(machine).beta - 1.0
    return clean.tunes, phase, beat


def _check(res: TbtResult, machine, kick, turns, tune_tol, phase_tol, beat_tol):
    q_clean, true_phase, beat = _truth(machine, kick, turns)
    assert np.all(np.abs(res.tunes - q_clean) < tune_tol), (res.tunes, q_clean)
    assert np.all(np.abs(res.tunes - machine.twin.tunes()) < 1e-4), (res.tunes, machine.twin.tunes())
    good = ~res.bad
    # phase advance from the first BPM against pyAT on the errored lattice [2 pi] (its common offset is not
    # observable: removed)
    dphi = res.phase - (true_phase - true_phase[0])
    for p in range(2):
        ok = good[:, p]
        d = dphi[ok, p] - np.mean(dphi[ok, p])
        assert rms(d) < phase_tol, (p, rms(d))
        # beta-beat from phase against the true beta-beat
        assert rms(res.beta_beat[good[:, p], p] - beat[good[:, p], p]) < beat_tol, (p, res.beta_beat_rms)
    return beat


def test_measure_tbt_small_ring_matches_the_truth(hmba_machine, RE, tmp_path):
    m = hmba_machine
    # the default kick (~0.1 mm), 4 shots: the phase noise of one BPM (10 um / (0.1 mm sqrt(512)) ~ 7e-4 x 2pi per
    # shot) halved
    uid = RE(ap.measure_tbt(m, turns=1024, n_avg=4, figure_dir=tmp_path)).plan_result
    run = RE.catalog[uid]
    res = TbtResult.from_run(run)
    assert res.bpm_names == m.bpm.names and res.beta.shape == (len(m.bpm), 2) and res.phase.shape == res.beta.shape
    assert 0.7e-4 < float(np.nanmedian(res.amplitude)) < 1.5e-4 and res.turns == 1024 and not res.bad.any()
    assert np.array_equal(res.kick, run.metadata["start"]["kick"])
    # 10 um TbT noise, 60 BPMs: tunes to 1e-5 of the clean particle, phase advance 1e-3 x 2pi; beta-beat 3 %: on
    # this small ring (10 % beta-beat, 10 BPMs a cell) beta from phase errs by 2.3 % rms even without noise (the
    # model's phase advances between the BPMs are off by more than the N-BPM weights expect): EBS meets 1 % below
    beat = _check(res, m, res.kick, 1024, 1e-5, 1e-3, 0.03)
    assert np.all(rms(beat) > 0.02)  # there is a beta-beat to measure
    start = run.metadata["start"]
    assert start["tool"] == "tbt" and set(start["figures"]) == {"spectrum", "phase_beating", "beta_beat"}
    assert all(Path(p).stat().st_size > 10_000 for p in start["figures"].values())
    # the BPM system and the pinger are back where they were
    assert m.twin.beam.mode == "orbit" and np.array_equal(m.twin.beam.kick, [0.0, 0.0])


def test_measure_tbt_averages_shots_and_refuses_without_beam(hmba_machine, RE):
    m = hmba_machine
    one = TbtResult.from_run(RE.catalog[RE(ap.measure_tbt(m, kick=(2e-5, 2e-5), turns=256,
                                                         figure_dir=False)).plan_result])
    four = TbtResult.from_run(RE.catalog[RE(ap.measure_tbt(m, kick=(2e-5, 2e-5), turns=256, n_avg=4,
                                                          figure_dir=False)).plan_result])
    assert np.nanmedian(four.noise) < 0.6 * np.nanmedian(one.noise)  # 1/sqrt(4) of the 10 um noise
    with pytest.raises(BeamLostError, match="lost in turn"):
        RE(ap.measure_tbt(m, kick=(4e-3, 0.0), turns=64, figure_dir=False))  # a kick far beyond the aperture
    assert m.twin.beam.mode == "orbit" and np.array_equal(m.twin.beam.kick, [0.0, 0.0])
    with pytest.raises(ParameterError, match="turns"):
        RE(ap.measure_tbt(m, turns=0))


@pytest.mark.parametrize("mode", ["exception", "abort", "stop"])
def test_interrupted_tbt_puts_the_bpm_mode_and_pinger_back(hmba_machine, RE, mode):
    m = hmba_machine
    stops = []
    RE.subscribe(lambda n, d: stops.append(d) if n == "stop" else None)
    # the 6th set/save: 4 sets (BPM mode, turns, two kicks) open the run, then each shot's event
    hook = Interrupt(m, 6, RuntimeError("injected fault") if mode == "exception" else "pause")
    run_interrupted(RE, hook, ap.measure_tbt(m, kick=(2e-5, 1e-5), turns=128, n_avg=3, figure_dir=False), mode,
                    lambda: stops)
    assert hook.fired
    assert m.twin.beam.mode == "orbit" and np.array_equal(m.twin.beam.kick, [0.0, 0.0])


def test_measure_tbt_on_ebs_acceptance(machine, RE):
    """EBS, profile errors, 10 um TbT noise, 1024 turns, ~0.1 mm kick (the default): the issue's figures. The
    orbit is corrected first, as before any optics measurement (uncorrected, the feed-down of the sextupoles makes a
    20 % beta-beat whose N-BPM estimate errs by ~4 %)."""
    RE(ap.correct_orbit(machine, orm="model", fit_rf=True, max_iter=3, figure_dir=False))
    uid = RE(ap.measure_tbt(machine, figure_dir=False)).plan_result
    res = TbtResult.from_run(RE.catalog[uid])
    assert np.all(np.abs(res.kick) > 0) and res.turns == 1024 and res.nbpm == 224
    assert 0.7e-4 < float(np.nanmedian(res.amplitude)) < 1.5e-4  # ~0.1 mm
    _check(res, machine, res.kick, 1024, 1e-5, 1e-3, 0.01)


def test_beam_devices_on_epics_from_the_profile_templates():
    """EPICS: no beam devices without ``controls.beam_pvs`` (the IOC serves none yet); with it, PVs from the
    templates, and the devices work on mock signals (the trigger is a put of 1 to the FIRE PV)."""
    import copy

    from bluesky.run_engine import call_in_bluesky_event_loop

    from acc_bluesky.devices.backends.epics import EpicsBackend
    from acc_bluesky.machine import Machine, bluesky_loop
    from acc_bluesky.profile.schema import BeamPvSpec

    prof = ab.load_profile(HMBA)
    m0 = Machine(prof, "epics", EpicsBackend(prof), None)
    assert m0.tbt is None and m0.pinger is None and "tbt" not in dict(m0._top_level())
    prof = copy.deepcopy(prof)
    prof.spec.controls.beam_pvs = BeamPvSpec()
    m = Machine(prof, "epics", EpicsBackend(prof), None)
    p = prof.spec.controls.prefix
    assert m.tbt.x.source == f"ca://{p}TBT:X" and m.pinger.fire.source == f"ca://{p}PINGER:FIRE"
    assert m.injection.energy.source == f"ca://{p}INJ:DP-SP" and m.losses.lost_s.source == f"ca://{p}LOSS:S"
    assert [n for n, _ in m._top_level()][-4:] == ["tbt", "pinger", "injection", "losses"]
    bluesky_loop()

    async def go():
        for dev in (m.tbt, m.pinger, m.injection, m.losses):
            await dev.connect(mock=True)
        await m.tbt.mode.set("tbt")
        await m.pinger.trigger()
        return (await m.tbt.mode.get_value(), await m.pinger.fire.get_value(), list(await m.tbt.describe()),
                list(await m.losses.describe()))

    mode, fired, keys, loss_keys = call_in_bluesky_event_loop(go())
    assert mode == "tbt" and fired == 1 and keys == ["tbt-x", "tbt-y"]
    assert loss_keys == ["losses-turns_reached", "losses-bpms_reached", "losses-lost_turn", "losses-lost_element",
                         "losses-lost_element_name", "losses-lost_s", "losses-transmission"]
