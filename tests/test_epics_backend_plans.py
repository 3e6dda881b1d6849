"""Every tool plan end to end against the twin IOC, compared with the same plan on the same twin in sim mode.

Both machines are the EBS twin with seed 1 (same errors); they differ only in the noise sequence and in the path
(devices -> twin directly, or devices -> Channel Access -> IOC -> twin). So the results must agree within noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import caget

from acc_bluesky.analysis import (
    Chromaticity,
    Dispersion,
    MeasuredTunes,
    OrbitResponse,
    TuneCorrection,
    TuneResponse,
)


@pytest.fixture(scope="module")
def mcat(session_catalog_dir):
    """One RunEngine for the module on the session's catalogue (opening a catalogue costs seconds)."""
    from acc_bluesky.data import make_run_engine, open_catalog

    d = session_catalog_dir
    re = make_run_engine(catalog_dir=d, progress=False)
    return re, open_catalog(catalog_dir=d)


@pytest.fixture(scope="module")
def sim(_ebs_machine):
    """The session's EBS sim machine, seed 1 (``both`` resets it: connecting EBS again costs seconds)."""
    return _ebs_machine


@pytest.fixture
def both(sim, ioc_machine, reset_ioc, mcat):
    """Run a plan factory ``f(machine)`` on the sim machine and on the IOC; returns the two Tiled runs."""
    re, cat = mcat
    sim.twin.reset()

    def run(factory):
        runs = []
        for m in (sim, ioc_machine):
            uid = re(factory(m)).plan_result
            runs.append(cat[uid])
        return runs

    return run


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_measure_orm(both):
    from acc_bluesky.plans import measure_orm

    cors = ["HST_001", "HST_050", "HST_120", "HST_200", "VST_002", "VST_060", "VST_130", "VST_210"]
    s, e = both(lambda m: measure_orm(m, correctors=cors))
    rs, re_ = OrbitResponse.from_run(s), OrbitResponse.from_run(e)
    assert re_.corrector_names == cors and re_.matrix.shape == (448, 8)
    assert e.metadata["start"]["mode"] == "epics"
    assert rel(re_.matrix, rs.matrix) <= 0.02, rel(re_.matrix, rs.matrix)


def test_measure_dispersion(both):
    from acc_bluesky.plans import measure_dispersion

    s, e = both(lambda m: measure_dispersion(m))
    ds, de = Dispersion.from_run(s), Dispersion.from_run(e)
    assert np.max(np.abs(ds.eta_x)) > 0.01
    assert rel(de.eta_x, ds.eta_x) <= 0.02
    assert np.max(np.abs(de.eta_y - ds.eta_y)) < 0.02 * np.max(np.abs(ds.eta_x))


def test_correct_orbit_reduces_the_orbit_as_in_sim(both, ioc_machine, tmp_path):
    from acc_bluesky.data import read_results
    from acc_bluesky.plans import correct_orbit

    x0 = np.asarray(caget(ioc_machine.backend.pvs["orbit:x"]))
    s, e = both(lambda m: correct_orbit(m, orm="model", max_iter=2, figure_dir=tmp_path))
    rs, re_ = read_results(s), read_results(e)
    x1 = np.asarray(caget(ioc_machine.backend.pvs["orbit:x"]))
    assert e.metadata["stop"]["exit_status"] == "success"
    assert np.std(x1) < 0.2 * np.std(x0), (np.std(x0), np.std(x1))  # what any EPICS client sees
    for plane in "xy":
        assert re_[f"rms_{plane}_after"] < 0.2 * re_[f"rms_{plane}_before"]
        assert re_[f"rms_{plane}_before"] == pytest.approx(rs[f"rms_{plane}_before"], rel=0.01)
        assert re_[f"rms_{plane}_after"] == pytest.approx(rs[f"rms_{plane}_after"], rel=0.05, abs=2e-7)
    for fam in ("HST", "VST"):
        assert rel(re_[f"{fam}_correction"], rs[f"{fam}_correction"]) <= 0.02, fam
        assert np.array_equal(np.asarray(caget(ioc_machine.backend.pvs[f"{fam}:setpoints"])),
                              np.asarray(re_[f"{fam}_correction"]))  # started from zero


def test_orbit_bump(both):
    from acc_bluesky.data import read_results
    from acc_bluesky.plans import orbit_bump

    s, e = both(lambda m: orbit_bump(m, "BPM_010", 0.3e-3, plane="x"))
    rs, re_ = read_results(s), read_results(e)
    assert float(re_["amplitude_x"]) == pytest.approx(0.3e-3, abs=5e-6)
    assert float(re_["amplitude_x"]) == pytest.approx(float(rs["amplitude_x"]), abs=2e-6)
    assert float(re_["closure_rms"]) < 5e-6
    assert rel(re_["HST_step"], rs["HST_step"]) <= 0.02


def test_save_and_restore_config(both, ioc_machine, reset_ioc, mcat):
    from acc_bluesky.plans import compare_config, restore_config, save_config

    from ioc_fixtures import caput

    s, e = both(lambda m: save_config(m, "golden"))
    assert not compare_config(s, e, atol=1e-9)  # same machine, same setpoints
    p = reset_ioc.pvs
    q0 = caget(p["QF2:003:setpoint"])
    caput(p["HST:001:setpoint"], 1.0)
    caput(p["QF2:003:setpoint"], q0 * 1.01)
    diff = compare_config(ioc_machine, e)
    assert {d.device for d in diff} == {"HST_001", "QF2_003"}, str(diff)
    re, cat = mcat
    uid = re(restore_config(ioc_machine, e.metadata["start"]["uid"])).plan_result
    assert cat[uid].metadata["stop"]["exit_status"] == "success"
    assert caget(p["HST:001:setpoint"]) == 0.0 and caget(p["QF2:003:setpoint"]) == q0
    assert caget(p["QF2:003:readback"]) == q0
    assert not compare_config(ioc_machine, e, atol=0.0)


def test_measure_tune(both):
    from acc_bluesky.plans import measure_tune

    s, e = both(lambda m: measure_tune(m, n_avg=3))
    qs, qe = MeasuredTunes.from_run(s).q, MeasuredTunes.from_run(e).q
    assert np.all(np.abs(qe - qs) < 5e-5)


def test_measure_tune_response(both):
    from acc_bluesky.plans import measure_tune_response

    s, e = both(lambda m: measure_tune_response(m, families=["QF2", "QD3", "QF5"]))
    ms, me = TuneResponse.from_run(s).matrix_hw, TuneResponse.from_run(e).matrix_hw
    assert rel(me, ms) <= 0.02


def test_correct_tune(both, sim):
    from acc_bluesky.plans import correct_tune

    q = sim.twin.tunes()
    tgt = (round(float(q[0]) + 0.005, 4), round(float(q[1]) - 0.005, 4))
    s, e = both(lambda m: correct_tune(m, tgt, response="model", figure_dir=False))
    cs, ce = TuneCorrection.from_run(s), TuneCorrection.from_run(e)
    assert ce.converged and np.all(np.abs(ce.after - tgt) <= 1e-3)
    assert ce.families == cs.families
    assert np.allclose(ce.delta_hw, cs.delta_hw, rtol=0.02)


def test_measure_chromaticity(both):
    from acc_bluesky.plans import measure_chromaticity

    s, e = both(lambda m: measure_chromaticity(m, figure_dir=False))
    xs, xe = Chromaticity.from_run(s).xi, Chromaticity.from_run(e).xi
    assert np.all(np.abs(xe - xs) < 0.05), (xs, xe)


def test_measure_chromaticity_response(both):
    from acc_bluesky.analysis import ChromaticityResponse
    from acc_bluesky.plans import measure_chromaticity_response

    s, e = both(lambda m: measure_chromaticity_response(m, families=["S4", "S20"], steps=3, order=1))
    rs, re_ = ChromaticityResponse.from_run(s), ChromaticityResponse.from_run(e)
    assert np.all(np.abs(rs.matrix_hw) > 1e-3)  # each family moves the chromaticity [1/A]
    assert rel(re_.matrix, rs.matrix) <= 0.03, (rs.matrix, re_.matrix)


def test_correct_orbit_with_an_orm_measured_on_the_ioc(both):
    """The control-room sequence on live PVs: measure an ORM, then correct with that run (not the model)."""
    from acc_bluesky.data import read_results
    from acc_bluesky.plans import correct_orbit, measure_orm

    cors = [f"HST_{i:03d}" for i in range(5, 224, 14)] + [f"VST_{i:03d}" for i in range(5, 224, 14)]
    orms = {}

    def measure_then_correct(m):
        orms[m.mode] = yield from measure_orm(m, correctors=cors)
        return (yield from correct_orbit(m, orm=orms[m.mode], max_iter=2, figure_dir=False))

    s, e = both(measure_then_correct)
    assert e.metadata["start"]["orm_uid"] == orms["epics"] and s.metadata["start"]["orm_uid"] == orms["sim"]
    rs, re_ = read_results(s), read_results(e)
    for plane in "xy":
        assert re_[f"rms_{plane}_after"] < 0.7 * re_[f"rms_{plane}_before"]  # 32 correctors: a partial correction
        assert re_[f"rms_{plane}_after"] == pytest.approx(rs[f"rms_{plane}_after"], rel=0.05)
    for fam in ("HST", "VST"):
        assert rel(re_[f"{fam}_correction"], rs[f"{fam}_correction"]) <= 0.02, fam


def test_correct_chromaticity(both):
    from acc_bluesky.analysis import ChromaticityCorrection
    from acc_bluesky.plans import correct_chromaticity

    s, e = both(lambda m: correct_chromaticity(m, (5.0, 5.0), response="model", figure_dir=False))
    cs, ce = ChromaticityCorrection.from_run(s), ChromaticityCorrection.from_run(e)
    assert ce.converged and np.all(np.abs(ce.after - 5.0) <= 0.1)
    assert ce.families == cs.families
    assert np.allclose(ce.delta_hw, cs.delta_hw, rtol=0.02)
