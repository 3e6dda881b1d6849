"""The ``loco`` and ``correct_optics`` plans on the twin, against the truth it knows.

Ring: ``tests/profiles/loco_hmba`` (two HMBA cells: 20 BPMs, 18 + 18 correctors, 32 quadrupoles). Errors: the
profile's BPM gains (2 %) and rolls (1 mrad) and corrector calibrations (2 %), gradient errors 1 % rms (10x the
profile's, so that they dominate the measurement), BPM noise 0.01 um (the fitted gradients of this small ring are
noise-limited: at 0.1 um their error is 30 % rms, consistent with the fit's own uncertainties, see test_loco.py).
The ORM and dispersion are measured by the plans (``measure_orm``, ``measure_dispersion``), fitted by ``loco``,
corrected by ``correct_optics``; the truth is the twin's error model and pyAT on its lattice.

Tolerances (measured values in brackets, seed 2):
- fitted gradient errors within 6 % rms of the injected ones [3.3 %], and consistent with their uncertainties
  (rms of error / sigma in 0.5..1.5 [0.84]); chi2/dof in 0.8..1.2 [0.95];
- BPM gains within 6e-4 and corrector gains within 5e-4 of the injected ones, worst magnet [4e-4, 2e-4] (in the
  fit's gauge of the common scale, see test_loco.gains_in_gauge);
- true rms beta-beat after ``correct_optics`` below 0.3 % in both planes [0.16 / 0.12 %, from 8.9 / 22 %], and
  below 0.1 % after a second measure_orm -> loco -> correct_optics [0.03 / 0.02 %];
- a dead BPM (reading only its offset and noise) and a stuck corrector are excluded by name, and the fit stays
  within 1.5x of the clean fit's gradient error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import (  # noqa: F401 - fixtures
    Interrupt,
    draw_step,
    module_catalog,
    module_run_engine,
    run_documents,
    run_interrupted,
    same,
)
from test_loco import errors, gains_in_gauge, rel_rms, true_beta_beat, true_relative_errors

from acc_bluesky.analysis import Dispersion, OrbitResponse
from acc_bluesky.analysis.loco import LocoResult, optics_correction
from acc_bluesky.machine import connect
from acc_bluesky.plan_stubs.checks import ParameterError
from acc_bluesky.plan_stubs.runs import WrongRun
from acc_bluesky.plan_stubs.tool import ToolError
from acc_bluesky.plans import correct_optics, loco, measure_dispersion, measure_orm
from acc_bluesky.profile import LimitError, load_profile
from acc_bluesky.twin import Twin

PROFILE = Path(__file__).parent / "profiles" / "loco_hmba" / "profile.yaml"
NOISE = 1e-8


@pytest.fixture(scope="module")
def prof():
    return load_profile(PROFILE)


@pytest.fixture(scope="module")
def em(prof):
    return errors(prof, 2, gradient_scale=10.0, noise=NOISE)


def _machine(prof, em):
    return connect(prof, mode="sim", twin=Twin(prof, seed=2, errors=copy.deepcopy(em)))


@pytest.fixture(scope="module")
def machine(prof, em):
    return _machine(prof, em)


def _measure_and_fit(RE, m, **kw):  # noqa: N803 - the bluesky name
    orm = RE(measure_orm(m, figure_dir=False)).plan_result
    disp = RE(measure_dispersion(m, figure_dir=False)).plan_result
    uid = RE(loco(m, orm=orm, dispersion=disp, bpm_noise=NOISE, rcond=1e-6, **kw)).plan_result
    return orm, disp, uid


@pytest.fixture(scope="module")
def fitted(RE, machine):  # noqa: N803
    """The clean measurement and fit: (orm uid, dispersion uid, loco uid)."""
    machine.twin.reset()
    return _measure_and_fit(RE, machine)


def test_loco_run_matches_the_twin_truth(prof, em, fitted, catalog):
    orm, disp, uid = fitted
    run = catalog[uid]
    res = LocoResult.from_run(run)
    truth = true_relative_errors(em, res)
    assert rel_rms(res.relative_dk, truth) < 0.06
    z = (res.relative_dk - truth) * np.abs(res.element_k0) / res.dk_sigma
    assert 0.5 < np.sqrt(np.mean(z ** 2)) < 1.5
    assert 0.8 < res.chi2_dof < 1.2
    gx, gy, gc = gains_in_gauge(prof, em, res)
    fx, fy = res.bpm_gains()
    assert np.max(np.abs(fx - gx)) < 6e-4 and np.max(np.abs(fy - gy)) < 6e-4
    assert np.max(np.abs(res.corrector_gains() - gc)) < 5e-4
    # the run: inputs by uid, every parameter with units, chi-square history, uncertainties, the start model
    start = run.metadata["start"]
    assert start["tool"] == "loco" and start["orm_uid"] == orm and start["dispersion_uid"] == disp
    assert start["parameters"]["orm"] == orm and start["parameters"]["dispersion"] == disp  # the parameters, by uid
    assert len(start["loco_units"]) == len(start["loco_names"]) == len(res.values)
    units = dict(zip(start["loco_kinds"], start["loco_units"]))
    assert units == {"quad": "m^-2", "bpm_gain_x": "1", "bpm_gain_y": "1", "bpm_roll": "rad", "corrector_gain": "1",
                     "rf": "1"}
    assert np.all(np.diff(res.chi2) < 0) and res.chi2[-1] < 1e-3 * res.chi2[0]
    assert np.all(np.isfinite(res.sigmas)) and np.all(res.sigmas > 0)
    assert np.allclose(start["loco_setpoints"]["QF1"], prof.families["QF1"].spec.calibration.physics2hw(
        res.element_k0[[res.element_names.index(d) for d in prof.families["QF1"].device_names]], 6e9, 6e9))
    for key in ("gradients", "chi2"):
        assert Path(start["figures"][key]).stat().st_size > 5_000


def test_loco_result_round_trip(fitted, catalog):
    """What the session remembers = what the catalogue gives back (the analysis a year later)."""
    from acc_bluesky.plan_stubs.tool import remembered

    _, _, uid = fitted
    mem = remembered(uid)[1]
    back = LocoResult.from_run(catalog[uid])
    assert back.uid == uid == mem.uid
    assert back.names == mem.names and back.kinds == mem.kinds and back.units == mem.units
    for a in ("values", "sigmas", "dk", "dk_sigma", "residual", "data_mask"):
        assert np.array_equal(getattr(back, a), getattr(mem, a), equal_nan=a != "data_mask"), a
    assert back.chi2 == pytest.approx(mem.chi2, rel=1e-15) and back.setpoints == mem.setpoints
    assert back.excluded_bpms == mem.excluded_bpms and back.orm_uid == mem.orm_uid


def test_correct_optics_removes_the_true_beta_beat_and_iterates(prof, em, fitted, RE, machine, catalog):  # noqa: N803
    _, _, uid = fitted
    machine.twin.reset()
    before = true_beta_beat(machine.twin)
    res = LocoResult.from_run(catalog[uid])
    expect = optics_correction(res, prof, setpoints={f: machine.twin.get_setpoint(f) for f in prof.families})
    c = RE(correct_optics(machine, loco=uid)).plan_result
    after = true_beta_beat(machine.twin)
    assert max(after) < 0.003 and max(after) < 0.05 * min(before), (before, after)
    for f, sp in expect.setpoints.items():  # hardware units through the calibration, exactly what the analysis says
        assert np.array_equal(machine.twin.get_setpoint(f), sp), f
    run = catalog[c]
    from acc_bluesky.analysis._common import run_results

    r = {k: v[None] for k, v in run_results(run).items()}  # (one event first, as the Tiled table)
    rb, ra = np.asarray(r["beta_beat_rms"])[0]
    assert np.allclose(rb, before, rtol=0.05)  # the model fitted to the machine agrees with the truth
    assert np.all(ra < 1e-6)  # every fitted magnet moved: the design is predicted
    start = run.metadata["start"]
    after_sp = dict(zip(start["magnets"], np.asarray(r["setpoints_after"])[0]))
    assert after_sp[prof.families["QF1"].device_names[0]] == expect.setpoints["QF1"][0]
    assert run.metadata["start"]["loco_uid"] == uid
    assert Path(run.metadata["start"]["figures"]["beta_beat"]).stat().st_size > 5_000
    # second pass from the corrected machine: measured again, fitted from the corrected setpoints, corrected again
    _, _, uid2 = _measure_and_fit(RE, machine)
    res2 = LocoResult.from_run(catalog[uid2])
    assert res2.setpoints["QF1"] == machine.twin.get_setpoint("QF1").tolist()
    RE(correct_optics(machine, loco=uid2, figure_dir=False))
    again = true_beta_beat(machine.twin)
    assert max(again) < 0.001, again


def test_dead_bpm_and_stuck_corrector_are_excluded(prof, em, fitted, RE, catalog):  # noqa: N803
    clean = LocoResult.from_run(catalog[fitted[2]])
    bad = copy.deepcopy(em)
    bad.bpm_gain[6] = -1.0  # a dead BPM: reads its offset and noise, no beam signal
    m = connect(prof, mode="sim", twin=Twin(prof, seed=2, errors=bad))
    m.twin.anomalies.stuck("VCOR", 4)
    with pytest.warns(UserWarning, match="VCOR_005"):
        _, _, uid = _measure_and_fit(RE, m, figure_dir=False)
    res = LocoResult.from_run(catalog[uid])
    assert list(res.excluded_bpms) == [prof.bpm_names[6]]
    assert list(res.excluded_correctors) == [prof.families["VCOR"].device_names[4]]
    truth = true_relative_errors(em, res)
    assert rel_rms(res.relative_dk, truth) < 1.5 * rel_rms(clean.relative_dk, truth)
    assert prof.bpm_names[6] not in res.of_kind("bpm_gain_x")[0]


def test_limits_are_checked_before_anything_moves(fitted, RE, machine, catalog, docs):  # noqa: N803
    machine.twin.reset()
    res = LocoResult.from_run(catalog[fitted[2]])
    res.values[: res.element_param.max() + 1] = -200.0  # gradient "errors" far beyond the supplies' range
    before = machine.twin.snapshot()
    with pytest.raises(LimitError, match="QF1"):
        RE(correct_optics(machine, loco=res, figure_dir=False))
    assert same(machine.twin.snapshot(), before)
    assert not [d for n, d in docs if n == "start"]  # refused before the run opened


def test_bad_input_is_refused(fitted, RE, machine):  # noqa: N803
    orm, disp, uid = fitted
    with pytest.raises(ParameterError, match="fraction"):
        RE(correct_optics(machine, loco=uid, fraction=0.0))
    with pytest.raises(ToolError, match="fit must name"):
        RE(loco(machine, orm=orm, fit=("quads", "sextupoles")))
    with pytest.raises(WrongRun, match="'dispersion' run"):
        RE(loco(machine, orm=disp))
    with pytest.raises(WrongRun, match="'orbit_response' run"):
        RE(correct_optics(machine, loco=orm))
    with pytest.raises(ToolError, match="not a quadrupole or skew family"):
        RE(correct_optics(machine, loco=uid, families=["HCOR"]))
    assert isinstance(OrbitResponse, type) and isinstance(Dispersion, type)


@pytest.mark.parametrize("mode", ["exception", "abort", "stop"])
def test_interrupted_correction_restores_every_setpoint(mode, fitted, RE, machine, docs):  # noqa: N803
    """Interrupted between its moves (7 families, one set each), every setpoint is put back."""
    machine.twin.reset()
    before = machine.twin.snapshot()
    k = draw_step("correct_optics", mode, 2, 7)
    hook = Interrupt(machine, k, RuntimeError("injected fault") if mode == "exception" else "pause")
    run_interrupted(RE, hook, correct_optics(machine, loco=fitted[2], figure_dir=False), mode,
                    lambda: [d for n, d in docs if n == "stop"])
    assert hook.fired and hook.changed  # something had moved: not a vacuous test
    assert same(machine.twin.snapshot(), before), f"not restored after {mode} at step {k}"


def test_loco_plan_with_averaged_orm_and_prior_meets_the_10_percent_acceptance(prof, RE, catalog):  # noqa: N803
    """The profile's 0.1 um BPM noise, 1 % gradient errors: ``measure_orm(n_avg=64)`` (effective 12.5 nm) and
    ``loco(gradient_prior=0.01)`` give the individual gradients within 10 % rms of the injected ones [measured
    5 %], the prior recorded with the run."""
    em01 = errors(prof, 2, gradient_scale=10.0, noise=1e-7)
    m = connect(prof, mode="sim", twin=Twin(prof, seed=2, errors=em01))
    orm = RE(measure_orm(m, n_avg=64, figure_dir=False)).plan_result
    uid = RE(loco(m, orm=orm, bpm_noise=1e-7 / 8, gradient_prior=0.01, figure_dir=False)).plan_result
    res = LocoResult.from_run(catalog[uid])
    assert rel_rms(res.relative_dk, true_relative_errors(em01, res)) < 0.10
    assert res.options["gradient_prior"] == 0.01 and res.n_sv == len(res.element_refpts)
    with pytest.raises(ToolError, match="gradient_prior"):
        RE(loco(m, orm=orm, gradient_prior=0.0, figure_dir=False))
    with pytest.raises(ToolError, match="bpm_noise"):
        RE(loco(m, orm=orm, gradient_prior=0.01, figure_dir=False))


#: What the fit found: in the results stream (the run opens while the fit iterates); before, in the start document.
OUTCOME = ("chi2", "chi2_dof", "n_sv", "singular_values", "tunes_model", "iterations", "converged", "excluded_bpms",
           "excluded_correctors", "fit_seconds")
OLD_OUTCOME_START_KEYS = ("loco_chi2", "loco_chi2_dof", "loco_n_sv", "loco_singular_values", "loco_tunes_model",
                          "excluded_bpms", "excluded_correctors", "loco_iterations", "loco_fit_seconds")


def test_run_layout_request_in_start_outcome_in_results(fitted, catalog):
    from acc_bluesky.data import stream_data_keys

    orm, disp, uid = fitted
    run = catalog[uid]
    start = run.metadata["start"]
    assert start["loco_run_layout"] == 2 and start["loco_fit"] == ["quads", "bpm_gains", "bpm_rolls",
                                                                    "corrector_gains"]
    assert not set(OLD_OUTCOME_START_KEYS) & set(start)  # the outcome is not in the start document ...
    assert "converged" not in start["loco_options"]
    keys = stream_data_keys(run, "results")
    for k in OUTCOME:  # ... but in the results, each with units and meaning
        assert k in keys and keys[k]["units"] == LocoResult.RESULT_KEYS[k][0], k
        assert keys[k]["description"] == LocoResult.RESULT_KEYS[k][1], k
    res = LocoResult.from_run(run)
    assert res.n_sv > 0 and len(res.singular_values) >= res.n_sv and res.options["converged"] is True
    assert len(res.chi2) >= 2 and res.timing["fit"] > 0 and res.tunes_model.shape == (2,)
    assert run.metadata["stop"]["exit_status"] == "success"


def _old_layout(res: LocoResult, beta) -> tuple[dict, dict]:
    """The start keys and results of a loco run as recorded before the run opened ahead of the fit (commit 262f68e):
    the outcome in the start document, three result keys."""
    new = res.to_results(beta)
    md = {k: v for k, v in res.start_metadata().items() if k != "loco_n_parameters"}
    md["loco_options"] = dict(res.options)  # with "converged"
    md |= {"excluded_bpms": dict(res.excluded_bpms), "excluded_correctors": dict(res.excluded_correctors),
           "loco_chi2_dof": float(res.chi2_dof), "loco_n_sv": int(res.n_sv), "loco_chi2": list(res.chi2),
           "loco_singular_values": np.asarray(res.singular_values).tolist(),
           "loco_tunes_model": np.asarray(res.tunes_model).tolist(), "loco_fit": ["quads", "bpm_gains"],
           "num_points": 0, "loco_n_parameters": len(res.values), "loco_iterations": len(res.chi2) - 1,
           "loco_fit_seconds": 1.0}
    return md, {k: new[k] for k in ("parameters", "residual", "bpm_optics")}


def test_runs_of_the_earlier_layout_are_read_and_corrected_from(prof, fitted, RE, machine, catalog):  # noqa: N803
    """A loco run of the earlier layout (outcome in the start document) reads the same, and correct_optics takes it."""
    import bluesky.preprocessors as bpp

    from acc_bluesky.data.metadata import tool_metadata
    from acc_bluesky.plan_stubs.results import store_result

    new = LocoResult.from_run(catalog[fitted[2]])
    assert new.excluded_bpms == {} and new.excluded_correctors == {}
    new.excluded_bpms = {prof.bpm_names[3]: "excluded by request"}  # exclusions with reasons round-trip
    md, results = _old_layout(new, new.beta_beat(prof))

    @bpp.run_decorator(md=tool_metadata("loco", machine, plan_name="loco") | md)
    def old_run():
        yield from store_result(results, units={k: LocoResult.RESULT_KEYS[k][0] for k in results})

    uid = RE(old_run()).run_start_uids[0]
    run = catalog[uid]
    assert "loco_chi2" in run.metadata["start"] and "chi2" not in run["results"].metadata["data_keys"]
    old = LocoResult.from_run(run)
    for a in ("names", "kinds", "units", "chi2", "excluded_bpms", "excluded_correctors", "setpoints", "orm_uid",
              "dispersion_uid", "n_sv", "bpm_names", "element_names"):
        assert getattr(old, a) == getattr(new, a), a
    for a in ("values", "sigmas", "residual", "singular_values", "tunes_model", "dk", "element_k0"):
        assert np.array_equal(getattr(old, a), getattr(new, a), equal_nan=True), a
    assert old.chi2_dof == new.chi2_dof and old.options == new.options and old.uid == uid
    machine.twin.reset()
    expect = optics_correction(new, prof, setpoints={f: machine.twin.get_setpoint(f) for f in prof.families})
    c = RE(correct_optics(machine, loco=uid, figure_dir=False)).plan_result
    assert catalog[c].metadata["start"]["loco_uid"] == uid
    for f, sp in expect.setpoints.items():
        assert np.array_equal(machine.twin.get_setpoint(f), sp), f
    machine.twin.reset()


def _fit_fails_after_layout(*args, on_layout=None, **kwargs):
    import acc_bluesky.analysis.loco as analysis

    def layout_then_fail(md):
        on_layout(md)
        raise FloatingPointError("injected: the fit diverged")

    return analysis.fit_loco(*args, on_layout=layout_then_fail, **kwargs)


@pytest.mark.parametrize("when", ["before the layout", "while iterating"])
def test_a_failing_fit_leaves_its_run_closed_fail_with_the_reason(when, fitted, RE, machine, catalog,  # noqa: N803
                                                                  monkeypatch):
    """The run opens while the fit runs: a fit that raises leaves the run recorded, closed ``fail`` with the error
    as its reason (the request in the start document), and nothing moved."""
    import importlib

    plan_module = importlib.import_module("acc_bluesky.plans.loco")  # the module (plans.loco is the plan)
    orm, disp, _ = fitted
    machine.twin.reset()
    before = machine.twin.snapshot()
    kw: dict = {}
    if when == "before the layout":  # a real failure of fit_loco before it has its parameters
        kw["exclude_correctors"] = list(OrbitResponse.from_run(catalog[orm]).corrector_names)
        match, error = "every corrector is excluded", "ValueError"
    else:
        monkeypatch.setattr(plan_module, "fit_loco", _fit_fails_after_layout)
        match, error = "injected: the fit diverged", "FloatingPointError"
    with pytest.raises(Exception, match=match):
        RE(loco(machine, orm=orm, dispersion=disp, bpm_noise=NOISE, figure_dir=False, md={"case": when}, **kw))
    assert same(machine.twin.snapshot(), before)
    runs = [catalog[u] for u in catalog if catalog[u].metadata["start"].get("case") == when]
    assert len(runs) == 1
    run = runs[0]
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert stop["exit_status"] == "fail" and stop["reason"].startswith(error) and match in stop["reason"]
    assert start["orm_uid"] == orm and start["dispersion_uid"] == disp and start["loco_fit"]
    assert start["loco_setpoints"]["QF1"] == machine.twin.get_setpoint("QF1").tolist()
    assert ("loco_names" in start) == (when == "while iterating")  # the layout, when the fit had it
    assert "results" not in run
    with pytest.raises(KeyError, match="results"):
        LocoResult.from_run(run)
