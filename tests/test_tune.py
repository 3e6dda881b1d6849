"""Tune tools: model response, measured response vs the errored twin's truth, correction to a target, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from acc_bluesky.analysis import MeasuredTunes, TuneCorrection, TuneResponse, model_tune_response
from acc_bluesky.analysis.plots import resonance_lines, tune_diagram
from acc_bluesky.analysis.tune import lattice_tunes, model_lattice, select_families
from acc_bluesky.plans.optics import correct_tune, measure_tune, measure_tune_response
from acc_bluesky.profile import LimitError
from helpers import events, module_catalog, module_run_engine, run_documents, same  # noqa: F401 - fixtures


# ----------------------------------------------------------------------------------------------------
# pure analysis
def test_model_lattice_reproduces_the_ideal_twin_at_any_setpoints(ebs, twin_ideal):
    """The model (design + setpoints through the calibration) is the ideal twin itself: tunes equal to 1e-9."""
    twin_ideal.set_setpoint("QF2", twin_ideal.get_setpoint("QF2") + 0.013)
    twin_ideal.set_setpoint("QD6", twin_ideal.get_setpoint("QD6") - 0.021)
    sp = {n: twin_ideal.get_setpoint(n) for n in twin_ideal.family_names}
    q = lattice_tunes(model_lattice(ebs, sp))
    assert np.allclose(q, twin_ideal.tunes(), atol=1e-9, rtol=0)
    assert not np.allclose(q, lattice_tunes(ebs.load_lattice()), atol=1e-3)  # the setpoints did matter


def test_model_tune_response_matches_thin_lens_beta_sums(ebs):
    """dQ/dK of a quadrupole family = +-(1/4 pi) sum(<beta> L) over its magnets (first-order perturbation, with
    pyAT's beta averaged inside each magnet): agreement to 2e-3."""
    import at

    resp = model_tune_response(ebs)
    ring = ebs.load_lattice()
    for j, name in enumerate(resp.families):
        refs = ebs.families[name].refpts
        _, avebeta, *_ = at.avlinopt(ring, 0.0, refs)
        length = np.array([ring[int(r)].Length for r in refs])
        thin = np.array([np.sum(avebeta[:, 0] * length), -np.sum(avebeta[:, 1] * length)]) / (4 * np.pi)
        assert np.allclose(resp.matrix[:, j], thin, rtol=2e-3, atol=0), name
    # per A through the profile's calibration (0.01 m^-2 per A)
    assert np.allclose(resp.matrix_hw, resp.matrix * 0.01, rtol=1e-9)
    assert resp.kind == "model" and resp.physics_units == ["m^-2"] * len(resp.families)


def test_select_families_prefers_strong_independent_pairs():
    m = np.array([[1.0, 0.0, 1.0, 0.5],
                  [0.0, 1.0, 1e-3, -0.5]])
    assert select_families(m, ["a", "b", "c", "d"]) == ("a", "b")
    # nearly parallel columns (a, c) are excluded even if strong; with only them left they are still usable
    assert select_families(m * [1, 0.01, 1, 0.01], ["a", "b", "c", "d"], allowed=["a", "c"]) == ("a", "c")
    with pytest.raises(ValueError, match="at least two families"):
        select_families(m, ["a", "b", "c", "d"], allowed=["a"])


def test_response_select_and_step_solve_the_linear_system():
    r = TuneResponse(families=["A", "B", "C"], matrix_hw=[[1.0, 0.2, 0.5], [-0.3, -1.0, 0.1]],
                     matrix=[[100.0, 20.0, 50.0], [-30.0, -100.0, 10.0]], reference=[0.4, 0.3])
    sub = r.select(["B", "A"])
    step = sub.step([0.01, -0.02])
    assert np.allclose(sub.matrix_hw @ step, [0.01, -0.02], atol=1e-14)
    least_norm = r.step([0.01, -0.02])  # 3 families: least-norm solution
    assert np.allclose(r.matrix_hw @ least_norm, [0.01, -0.02], atol=1e-14)
    assert np.linalg.norm(least_norm) <= np.linalg.norm(step) + 1e-15
    with pytest.raises(KeyError, match="not in this tune response"):
        r.select(["QF9"])


def test_resonance_lines_and_tune_diagram(tmp_path):
    lines = resonance_lines(2)
    keys = {(m, n, p) for m, n, p, _, _ in lines}
    assert {(1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (2, 0, 1), (0, 2, 1), (1, 1, 1), (1, -1, 0)} <= keys
    assert (2, 0, 2) not in keys  # the same line as qx = 1
    for m, n, p, a, b in resonance_lines(4):
        assert abs(m * a[0] + n * a[1] - p) < 1e-12 and abs(m * b[0] + n * b[1] - p) < 1e-12
        assert 1 <= abs(m) + abs(n) <= 4
    out = tune_diagram(0.437, 0.382, tmp_path / "fig" / "td.png", history=[[0.4267, 0.3922], [0.436, 0.383]],
                       target=(0.437, 0.382))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


# ----------------------------------------------------------------------------------------------------
# plans on the EBS twin (default errors, seed 1, noise on)
def test_measure_tune(machine, RE, catalog, docs):
    uid = RE(measure_tune(machine, n_avg=5)).plan_result
    tunes = MeasuredTunes.from_run(catalog[uid])
    truth = machine.twin.tunes()
    assert np.all(np.abs(tunes.q - truth) < 3e-5)  # monitor noise 1e-5 rms, 5 readings
    assert np.all((tunes.q_std > 1e-6) & (tunes.q_std < 3e-5))
    assert tunes.samples.shape == (5, 2)
    assert len(events(docs)) == 5
    start = catalog[uid].metadata["start"]
    assert start["tool"] == "tune" and start["facility"] == "ESRF"
    assert Path(start["figures"]["tune_diagram"]).stat().st_size > 10_000  # the working point, resonance lines


def test_measure_tune_response_matches_finite_differences_of_the_errored_twin(machine, RE, catalog, docs):
    from acc_bluesky.twin import Twin

    before = machine.twin.snapshot()
    uid = RE(measure_tune_response(machine)).plan_result
    assert same(machine.twin.snapshot(), before)  # every family put back exactly
    resp = TuneResponse.from_run(catalog[uid])
    assert resp.families == list(machine.quad) and resp.kind == "measured" and resp.uid == uid
    # truth: a separate copy of the same errored twin, noise off, the same steps
    copy = Twin(machine.profile, seed=1)
    copy.noise_on = False
    truth = np.zeros((2, len(resp.families)))
    for j, name in enumerate(resp.families):
        base = copy.get_setpoint(name)
        copy.set_setpoint(name, base + resp.delta[j])
        qp = copy.tunes()
        copy.set_setpoint(name, base - resp.delta[j])
        qm = copy.tunes()
        copy.set_setpoint(name, base)
        truth[:, j] = (qp - qm) / (2 * resp.delta[j])
    rel = np.sqrt(np.mean((resp.matrix_hw - truth) ** 2) / np.mean(truth ** 2))
    assert rel <= 0.02, rel
    # default steps are sized for |dQ| ~ 2e-3; physics units through the calibration (0.01 m^-2/A)
    dq = np.max(np.abs(truth * resp.delta), axis=0)
    assert np.all((dq > 1.5e-3) & (dq < 2.5e-3)), dq
    assert np.allclose(resp.matrix, resp.matrix_hw / 0.01)
    # one reference + 2 points per family
    assert len(events(docs)) == 1 + 2 * len(resp.families)
    assert catalog[uid].metadata["start"]["tool"] == "tune_response"
    assert Path(catalog[uid].metadata["start"]["figures"]["response"]).stat().st_size > 10_000  # bars per family
    # the measured response corrects the tunes, given by its uid (families: its best-conditioned pair)
    tgt = _target(machine)
    cuid = RE(correct_tune(machine, tgt, response=uid, figure_dir=False)).plan_result
    assert np.all(np.abs(machine.twin.tunes() - tgt) <= 1e-3)
    corr = TuneCorrection.from_run(catalog[cuid])
    assert corr.response_uid == uid and tuple(corr.families) == resp.best_pair()
    assert np.allclose(corr.response_hw, resp.select(corr.families).matrix_hw)


def _target(machine):
    q = machine.twin.tunes()
    return (round(float(q[0]) + 0.01, 4), round(float(q[1]) - 0.01, 4))


def test_correct_tune_measuring_the_response_on_the_spot(machine, RE, catalog, tmp_path):
    tgt = _target(machine)
    others = {n: machine.twin.get_setpoint(n) for n in machine.families}
    uid = RE(correct_tune(machine, tgt, families=["QD4", "QF7"], figure_dir=tmp_path)).plan_result
    truth = machine.twin.tunes()
    assert np.all(np.abs(truth - tgt) <= 1e-3), truth
    run = catalog[uid]
    start = run.metadata["start"]
    assert start["tool"] == "tune_correction" and run.metadata["stop"]["exit_status"] == "success"
    fams = start["families"]
    assert fams == ["QD4", "QF7"]
    # the response was measured in its own run (of those families), referenced by the correction run
    resp_run = catalog[start["response_uid"]]
    assert resp_run.metadata["start"]["tool"] == "tune_response"
    assert TuneResponse.from_run(resp_run).families == fams
    # only the two chosen families moved, within their limits
    for n in machine.families:
        now = machine.twin.get_setpoint(n)
        if n in fams:
            lim = machine.families[n].limits
            assert np.all((now >= lim.low) & (now <= lim.high)) and not np.array_equal(now, others[n])
        else:
            assert np.array_equal(now, others[n]), n
    corr = TuneCorrection.from_run(run)
    assert corr.converged and corr.families == fams and corr.response_uid == start["response_uid"]
    assert np.all(np.abs(corr.after - tgt) <= 1e-4)  # measured, within tol
    assert np.all(np.abs(corr.before - (np.array(tgt) - [0.01, -0.01])) < 1e-4)
    assert 1 <= corr.iterations <= 3 and corr.steps_hw.shape == (corr.iterations, 2)
    assert np.allclose(corr.delta_hw, [machine.twin.get_setpoint(n)[0] - others[n][0] for n in fams], atol=1e-12)
    assert np.allclose(corr.delta_physics, corr.delta_hw * 0.01)
    assert corr.figure.startswith(str(tmp_path)) and open(corr.figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("response", ["model", "object"])
def test_correct_tune_with_model_or_given_response(machine, RE, response):
    tgt = _target(machine)
    resp = "model" if response == "model" else model_tune_response(machine.profile, ["QF2", "QD3"])
    fams = None if response == "model" else ["QF2", "QD3"]
    RE(correct_tune(machine, tgt, families=fams, response=resp, figure_dir=False))
    assert np.all(np.abs(machine.twin.tunes() - tgt) <= 1e-3)


def test_correct_tune_refuses_bad_input_and_restores_on_limit(machine, RE, catalog, docs):
    before = machine.twin.snapshot()
    with pytest.raises(ValueError, match="fractional tunes"):
        RE(correct_tune(machine, (76.43, 0.39)))
    with pytest.raises(KeyError, match="unknown family 'QF9'"):
        RE(correct_tune(machine, (0.43, 0.39), families=["QF9", "QD3"]))
    # a response 1e5 times too weak asks for huge steps: refused before anything moves, run marked failed
    weak = model_tune_response(machine.profile, ["QF2", "QD3"])
    weak.matrix_hw *= 1e-5
    with pytest.raises(LimitError, match=r"correct_tune iteration 1 .*outside the limits"):
        RE(correct_tune(machine, _target(machine), families=["QF2", "QD3"], response=weak, figure_dir=False))
    assert same(machine.twin.snapshot(), before)
    stop = [d for n, d in docs if n == "stop"][-1]
    assert stop["exit_status"] == "fail" and "limits" in stop["reason"]
    assert catalog[stop["run_start"]].metadata["stop"]["exit_status"] == "fail"
