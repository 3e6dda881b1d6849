"""Tune tools at the edges: default steps within the limits, the pair measured on the spot, a working point near a
resonance line, corrections that stop unconverged. On one EBS cell (``tests/profiles/hmba``) and the EBS twin."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import same

import acc_bluesky as ab
from acc_bluesky.analysis import TuneCorrection, TuneResponse, model_tune_response
from acc_bluesky.analysis.tune import nearest_resonance
from acc_bluesky.plans.optics import (
    TUNE_RESPONSE_DQ,
    correct_chromaticity,
    correct_tune,
    measure_tune_response,
)
from acc_bluesky.twin import Twin

HMBA = "tests/profiles/hmba/profile.yaml"


@pytest.fixture(scope="module")
def _hmba():
    return ab.connect(HMBA, mode="sim", seed=1)


@pytest.fixture(scope="module")
def _tight(tmp_path_factory):
    """The cell with QF1 0.254 A below its upper limit (half its default step) and QD2 0.297 A above its lower one."""
    text = Path(HMBA).read_text()
    for name, new in (("QF1", "[-300, 254.2]"), ("QD2", "[-267.5, 300]")):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{name}:"))
        text = text.replace(line, line.replace("limits: [-300, 300]", f"limits: {new}"))
    path = tmp_path_factory.mktemp("tight") / "profile.yaml"
    path.write_text(text)
    return ab.connect(ab.load_profile(path), mode="sim", seed=1)


@pytest.fixture
def tight(_tight):
    _tight.twin.reset()
    yield _tight
    _tight.twin.reset()


@pytest.fixture
def hmba(_hmba):
    """One EBS cell, seed-1 errors, tune noise 1e-5 rms, reset to its design setpoints."""
    _hmba.twin.reset()
    yield _hmba
    _hmba.twin.reset()


def _truth_response(profile, families, setpoints, delta):
    """dQ/dI of a noise-free copy of the seed-1 twin at ``setpoints``, central differences with ``delta``."""
    copy = Twin(profile, seed=1)
    copy.noise_on = False
    for n, v in setpoints.items():
        copy.set_setpoint(n, v)
    out = np.zeros((2, len(families)))
    for j, n in enumerate(families):
        base = copy.get_setpoint(n)
        copy.set_setpoint(n, base + delta[j])
        qp = copy.tunes()
        copy.set_setpoint(n, base - delta[j])
        qm = copy.tunes()
        copy.set_setpoint(n, base)
        out[:, j] = (qp - qm) / (2 * delta[j])
    return out


def _caught(RE, plan):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        uid = RE(plan).plan_result
    return uid, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


# ----------------------------------------------------------------------------------------------------
# D6: default steps within the limits
def test_default_step_capped_to_the_headroom_and_still_measures_the_truth(tight, RE, catalog):
    """QF1 half its default step (0.54 A for dQ 2e-3) below its upper limit: the step is capped to the headroom, the
    warning names it with the expected dQ, and the response still matches the twin's truth (5 %, or the noise)."""
    model = model_tune_response(tight.profile, ["QF1", "QD2"])
    aim = TUNE_RESPONSE_DQ / np.max(np.abs(model.matrix_hw), axis=0)
    room = 254.2 - tight.twin.get_setpoint("QF1")[0]
    assert 0.3 * aim[0] < room < 0.7 * aim[0]
    before = tight.twin.snapshot()
    uid, msgs = _caught(RE, measure_tune_response(tight, ["QF1", "QD3"], n_avg=3, figure_dir=False))
    assert same(tight.twin.snapshot(), before)  # put back exactly
    resp = TuneResponse.from_run(catalog[uid])
    assert resp.families == ["QF1", "QD3"]
    assert resp.delta[0] == pytest.approx(room, rel=1e-6) and resp.delta[0] <= room  # to the limit, not past it
    capped = [m for m in msgs if "capped to the limits" in m]
    assert len(capped) == 1 and "QF1: 0.54" in capped[0] and "QD3" not in capped[0] and "expected dQ 9." in capped[0]
    sp = {n: tight.twin.get_setpoint(n) for n in tight.twin.family_names}
    truth = _truth_response(tight.profile, resp.families, sp, resp.delta)
    assert np.allclose(resp.matrix_hw, truth, rtol=0.05, atol=2e-5 / resp.delta), (resp.matrix_hw, truth)


def test_family_at_its_limit_is_left_out_or_refused_when_named(tight, RE, catalog):
    tight.twin.set_setpoint("QD2", np.full(2, -267.5))  # at its lower limit: no room for a bipolar step
    before = tight.twin.snapshot()
    uid, msgs = _caught(RE, measure_tune_response(tight, figure_dir=False))
    assert same(tight.twin.snapshot(), before)
    resp = TuneResponse.from_run(catalog[uid])
    assert "QD2" not in resp.families and len(resp.families) == 6
    left = [m for m in msgs if "leaving out 1 family" in m]
    assert len(left) == 1 and "QD2 (headroom 0 A" in left[0] and "tune-monitor noise" in left[0]
    # named explicitly: refused before anything moves, no run
    with pytest.raises(ValueError, match=r"cannot be measured.*QD2 \(headroom 0 A to the limits \[-267.5, 300\].*"
                                         r"Nothing was moved"):
        RE(measure_tune_response(tight, ["QD2", "QF4"], figure_dir=False))
    assert same(tight.twin.snapshot(), before)
    # a step given by the caller is never capped: past the limits it is refused
    with pytest.raises(ab.profile.LimitError, match="step -1 A of QD2"):
        RE(measure_tune_response(tight, ["QD2", "QF4"], delta={"QD2": 1.0}, figure_dir=False))
    assert same(tight.twin.snapshot(), before)
    # correct_tune measuring on the spot: the model's best pair (QD2, QF4) is not measurable, the next best is used
    assert model_tune_response(tight.profile).best_pair() == ("QD2", "QF4")
    q0 = tight.twin.tunes()
    tgt = (round(float(q0[0]) - 0.005, 4), round(float(q0[1]) + 0.005, 4))
    uid = RE(correct_tune(tight, tgt, figure_dir=False)).plan_result
    corr = TuneCorrection.from_run(catalog[uid])
    assert "QD2" not in corr.families and corr.converged
    assert np.all(np.abs(tight.twin.tunes() - tgt) <= 2e-4)


def test_correct_tune_on_the_spot_measures_only_the_model_pair(hmba, RE, catalog):
    q0 = hmba.twin.tunes()
    tgt = (round(float(q0[0]) + 0.01, 4), round(float(q0[1]) - 0.01, 4))
    pair = model_tune_response(hmba.profile).best_pair()
    uid = RE(correct_tune(hmba, tgt, figure_dir=False)).plan_result
    corr = TuneCorrection.from_run(catalog[uid])
    resp_run = catalog[catalog[uid].metadata["start"]["response_uid"]]
    assert TuneResponse.from_run(resp_run).families == list(pair)  # two families measured, not seven
    assert tuple(corr.families) == pair and corr.converged
    assert np.all(np.abs(hmba.twin.tunes() - tgt) <= 2e-4)  # truth: tol 1e-4 on the reading + noise 1e-5


def test_correct_tune_on_the_spot_on_ebs_uses_the_model_pair(machine, RE, catalog):
    """EBS: the pair is the model's best-conditioned one, the same as the best pair of the fully measured response
    (the behaviour before only the pair was measured)."""
    q0 = machine.twin.tunes()
    tgt = (round(float(q0[0]) + 0.01, 4), round(float(q0[1]) - 0.01, 4))
    pair = model_tune_response(machine.profile).best_pair()
    uid = RE(correct_tune(machine, tgt, figure_dir=False)).plan_result
    corr = TuneCorrection.from_run(catalog[uid])
    assert tuple(corr.families) == pair
    assert TuneResponse.from_run(catalog[catalog[uid].metadata["start"]["response_uid"]]).families == list(pair)
    assert np.all(np.abs(machine.twin.tunes() - tgt) <= 2e-4)


# ----------------------------------------------------------------------------------------------------
# D7: a working point near a resonance line
def _closer_lines(monkeypatch, m, distance):
    orig = m.profile.tool_defaults

    def defaults(tool):
        return orig(tool) | ({"resonance_distance": distance} if tool == "tune_correction" else {})

    monkeypatch.setattr(m.profile, "tool_defaults", defaults)


def test_small_moves_near_the_working_points_own_resonance_are_allowed(hmba, RE, monkeypatch):
    """The cell's tunes are 0.0387 from 2 qx - qy = 0; with resonance_distance 0.04 (as PETRA III's 0.0056 against
    0.01) its own working point and a move along the line are allowed, a move towards it is refused."""
    _closer_lines(monkeypatch, hmba, 0.04)
    q0 = hmba.twin.tunes()
    gap0, line = nearest_resonance(*q0, 3)
    assert line == (2, -1, 0) and 0.035 < gap0 < 0.04
    RE(correct_tune(hmba, tuple(q0), families=["QD2", "QF4"], response="model", figure_dir=False))
    along = q0 + [0.003, 0.006]  # 2 qx - qy unchanged
    RE(correct_tune(hmba, tuple(along), families=["QD2", "QF4"], response="model", figure_dir=False))
    assert np.all(np.abs(hmba.twin.tunes() - along) <= 2e-4)
    before = hmba.twin.snapshot()
    towards = along + [0.003, -0.003]  # 2 qx - qy: -0.0865 -> -0.0775
    with pytest.raises(ValueError, match=r"is 0\.03\d+ from the resonance 2 qx - 1 qy = 0 \(order 3\); the present "
                                         r"tunes .* are 0\.03\d+ from it, the target moves towards it.*"
                                         r"Nothing was moved"):
        RE(correct_tune(hmba, tuple(towards), families=["QD2", "QF4"], response="model", figure_dir=False))
    assert same(hmba.twin.snapshot(), before)


# ----------------------------------------------------------------------------------------------------
# D9b: corrections that stop at max_iter
def test_unconverged_corrections_warn_with_the_distance_left(hmba, RE, catalog):
    q0 = hmba.twin.tunes()
    tgt = (round(float(q0[0]) + 0.05, 4), round(float(q0[1]) - 0.03, 4))  # max_dq 0.02 per iteration: 3 needed
    uid, msgs = _caught(RE, correct_tune(hmba, tgt, families=["QD2", "QF4"], response="model", max_iter=1,
                                         figure_dir=False))
    corr = TuneCorrection.from_run(catalog[uid])
    assert not corr.converged and corr.iterations == 1
    left = [m for m in msgs if "not converged" in m]
    assert len(left) == 1 and "correct_tune: not converged after 1 correction(s)" in left[0]
    assert f"{tgt[0] - corr.after[0]:+.3g}" in left[0] and "at least 3 iterations" in left[0]
    assert "max_iter" in left[0] and "measured response" in left[0]
    xi0 = hmba.twin.chromaticity()
    _, msgs = _caught(RE, correct_chromaticity(hmba, tuple(xi0 + 1.0), families=["SD1", "SF2"], max_iter=1,
                                               tol=1e-6, steps=3, order=1, figure_dir=False))
    left = [m for m in msgs if "not converged" in m]
    assert len(left) == 1 and "correct_chromaticity: not converged after 1 correction(s)" in left[0]


def test_default_sextupole_step_capped_to_the_headroom(tmp_path, RE, catalog):
    """SF2 69.6 A below its upper limit, half its default step (146 A for dxi ~ 1): the chromaticity response's
    step is capped there with a warning, nothing is left moved, and the response still matches the noise-free twin
    within 5 %."""
    from acc_bluesky.analysis import ChromaticityResponse
    from acc_bluesky.plans.optics import measure_chromaticity_response

    text = Path(HMBA).read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("SF2:"))
    path = tmp_path / "profile.yaml"
    path.write_text(text.replace(line, line.replace("limits: [-2000, 2000]", "limits: [-2000, 840]")))
    m = ab.connect(ab.load_profile(path), mode="sim", seed=1)
    room = 840 - m.twin.get_setpoint("SF2").max()
    before = m.twin.snapshot()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        uid = RE(measure_chromaticity_response(m, ["SF2"], steps=3, order=1, figure_dir=False)).plan_result
    assert same(m.twin.snapshot(), before)
    msgs = [str(x.message) for x in w if "capped" in str(x.message)]
    assert len(msgs) == 1 and "SF2: 14" in msgs[0], msgs
    resp = ChromaticityResponse.from_run(catalog[uid])
    assert resp.delta[0] == pytest.approx(room, rel=1e-6) and resp.delta[0] <= room
    copy = Twin(m.profile, seed=1)
    copy.noise_on = False
    base = copy.get_setpoint("SF2")
    copy.set_setpoint("SF2", base + resp.delta[0])
    xp = copy.chromaticity()
    copy.set_setpoint("SF2", base - resp.delta[0])
    xm = copy.chromaticity()
    truth = (xp - xm) / (2 * resp.delta[0])
    assert np.allclose(resp.matrix_hw[:, 0], truth, rtol=0.05), (resp.matrix_hw[:, 0], truth)
