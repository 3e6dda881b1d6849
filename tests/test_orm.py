"""measure_orm / model_orm / OrbitResponse against the twin's truth.

The truth of a measured ORM is what the errored machine's BPMs would report for the calibrated kick: finite
differences of pyAT's ``find_orbit4`` (fixed path length, the twin's ``dct``) on a copy of ``twin.ring``, with the
corrector kick ``delta [A] x 5e-5 rad/A x (1 + calibration error)``, transformed by the BPM gains and rolls
(``errors.bpm_linear()``). Tolerance: relative rms difference (Frobenius norm) <= 1 %.
"""

from __future__ import annotations

import warnings

import at
import numpy as np
import pytest

from acc_bluesky.analysis import OrbitResponse, model_orm
from acc_bluesky.plans import measure_orm
from acc_bluesky.plan_stubs.orbit import corrector_devices
from acc_bluesky.profile import LimitError

SUBSET = ["HST_001", "HST_040", "HST_077", "HST_150", "HST_201", "VST_003", "VST_050", "VST_111", "VST_160",
          "VST_222"]


def _dct(twin, df: float) -> float:
    """The twin's path lengthening for an RF deviation ``df`` [Hz] (``find_orbit4(dct=...)`` convention)."""
    f0 = twin.rf_nominal_frequency
    return -twin.ring.circumference * df / (f0 + df)


def truth_orm(twin, names, delta_hw: float, *, bpm_frame: bool = True) -> np.ndarray:
    """(2n, m) [m/A]: response of the errored lattice to ``delta_hw`` steps, as its BPMs would read it."""
    prof = twin.profile
    ring = twin.ring.deepcopy()
    bpms = prof.bpm_refpts
    dct = _dct(twin, twin.df)
    out = np.zeros((2 * twin.nbpm, len(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = {d: (f, k) for f, fam in prof.families.items() for k, d in enumerate(fam.device_names)}
        for j, name in enumerate(names):
            fam, i = where[name]
            spec = prof.families[fam].spec
            plane = 0 if spec.type == "hcor" else 1
            kick = spec.calibration.hw2physics(delta_hw, twin.energy, twin.energy) * (
                1.0 + twin.errors.corrector_calibration[fam][i])
            el = ring[int(prof.families[fam].refpts[i])]
            k0 = np.array(el.KickAngle, dtype=float)
            orbits = []
            for sgn in (+1, -1):
                ka = k0.copy()
                ka[plane] += sgn * kick
                el.KickAngle = ka
                _, o = at.find_orbit4(ring, dct=dct, refpts=bpms)
                orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
            el.KickAngle = k0
            out[:, j] = (orbits[0] - orbits[1]) / (2 * delta_hw)
    return twin.errors.bpm_linear() @ out if bpm_frame else out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_measured_orm_matches_the_errored_machine(machine, RE, catalog):
    twin = machine.twin
    before = twin.snapshot()
    uid = RE(measure_orm(machine, correctors=SUBSET, n_avg=2))
    resp = OrbitResponse.from_run(catalog[uid])  # only the catalogue
    assert resp.corrector_names == SUBSET and resp.planes == ["x"] * 5 + ["y"] * 5
    assert resp.bpm_names == machine.profile.bpm_names and resp.matrix.shape == (448, 10)
    assert resp.uid == uid and resp.kind == "measured"
    np.testing.assert_allclose(resp.delta, 0.2)  # profile default tools.orbit_response.delta [A]
    truth = truth_orm(twin, SUBSET, 0.2)
    err = rel(resp.matrix_hw, truth)
    assert err <= 0.01, f"measured ORM differs from the truth by {err:.2%} rms"
    # the BPM errors matter at this tolerance: without them the comparison is off by more
    assert rel(resp.matrix_hw, truth_orm(twin, SUBSET, 0.2, bpm_frame=False)) > 2 * err
    # physics units: the nominal 5e-5 rad/A
    np.testing.assert_allclose(resp.matrix * 5e-5, resp.matrix_hw, rtol=1e-12)
    np.testing.assert_allclose(resp.delta_physics, 0.2 * 5e-5, rtol=1e-12)
    # coupling blocks are measured (x response to vertical correctors is small but not zero)
    assert 0 < np.abs(resp.block("x", "y")).max() < 0.05 * np.abs(resp.block("y", "y")).max()
    # the machine is left exactly as found
    assert all(np.array_equal(np.asarray(twin.snapshot()[k]), np.asarray(before[k])) for k in before)
    # one event per corrector in the primary stream, with both orbits
    run = catalog[uid]
    assert run.metadata["start"]["tool"] == "orbit_response" and run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["stop"]["num_events"]["primary"] == 10


def test_full_matrix_all_correctors(machine, RE, catalog, ebs):
    """The default selection is every in-service corrector (448, h then v); a seventh of them, spread over the ring
    and both planes, measured and every column checked against pyAT (the whole 448 x 448 check is in
    ``benchmarks/bench_orm.py``)."""
    every = corrector_devices(machine, None)
    assert [d.name for d in every] == machine.hcor.names + machine.vcor.names
    uid = RE(measure_orm(machine, correctors=[d.name for d in every[::7]]))
    resp = OrbitResponse.from_run(catalog[uid])
    assert resp.matrix.shape == (448, 64) and resp.ncor == 64
    # truth independent of the twin's own orbit solver: pyAT's find_orbit4 on the errored lattice, every column,
    # seen through the BPMs' gains and rolls (~130 closed orbits)
    truth = truth_orm(machine.twin, resp.corrector_names, 0.2)
    err = rel(resp.matrix_hw, truth)
    assert err <= 0.01, f"full ORM differs from the truth by {err:.2%}"
    # and it agrees with the model of the design lattice to the level of the errors (a few %), not exactly
    model = model_orm(ebs)
    assert 0.005 < resp.compare(model) < 0.2


def test_one_sided_physics_step_rf_column(machine, RE, catalog):
    twin = machine.twin
    # first, bad requests: refused before anything moves and before a run opens
    before = twin.snapshot()
    with pytest.raises(LimitError, match="HST_001.*outside the limits"):
        RE(measure_orm(machine, correctors=["HST_001"], delta=9.0))
    with pytest.raises(KeyError, match="unknown corrector 'HXX_001'"):
        RE(measure_orm(machine, correctors=["HXX_001"]))
    with pytest.raises(ValueError, match="delta .* or delta_physics"):
        RE(measure_orm(machine, correctors=["HST_001"], delta=0.1, delta_physics=1e-6))
    assert all(np.array_equal(np.asarray(twin.snapshot()[k]), np.asarray(before[k])) for k in before)
    assert len(list(catalog)) == 0
    names = ["HST_020", "VST_020"]
    # correctors as a device and a name (a MagnetFamily selects its in-service correctors)
    assert [d.name for d in corrector_devices(machine, machine.vcor)] == machine.vcor.names
    uid = RE(measure_orm(machine, correctors=[machine.hcor[19], "VST_020"], delta_physics=10e-6, bipolar=False,
                         rf=True, df=30.0))
    resp = OrbitResponse.from_run(catalog[uid])
    assert resp.corrector_names == names
    np.testing.assert_allclose(resp.delta, 10e-6 / 5e-5, rtol=1e-12)  # 0.2 A
    assert rel(resp.matrix_hw, truth_orm(twin, names, 0.2)) <= 0.01
    # RF column [m/Hz] against the truth (fixed path length, BPM frame)
    ring = twin.ring.deepcopy()
    orbits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sgn in (+1, 0):  # one-sided: +df against the reference
            _, o = at.find_orbit4(ring, dct=_dct(twin, twin.df + sgn * 30.0), refpts=machine.profile.bpm_refpts)
            orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
    truth_rf = twin.errors.bpm_linear() @ (orbits[0] - orbits[1]) / 30.0
    assert rel(resp.rf, truth_rf) <= 0.01
    assert resp.df == 30.0
    assert list(catalog[uid]) == ["primary", "results", "rf"] or set(catalog[uid]) >= {"primary", "results", "rf"}


def test_model_orm_is_the_ideal_machine(machine_ideal, RE, catalog, ebs):
    """The model (analytic + fixed-path-length term) equals a measurement on the ideal twin."""
    names = ["HST_005", "HST_100", "VST_007", "VST_180"]
    uid = RE(measure_orm(machine_ideal, correctors=names))
    meas = OrbitResponse.from_run(catalog[uid])
    model = model_orm(ebs, names)
    assert model.kind == "model" and model.matrix.shape == (448, 4)
    assert rel(model.matrix, meas.matrix) <= 0.01
    np.testing.assert_allclose(model.matrix_hw, model.matrix * 5e-5, rtol=1e-12)
    tracked = model_orm(ebs, names, method="tracking")
    assert rel(model.matrix, tracked.matrix) <= 0.01
    # the RF column: -eta / (alpha_c f)
    full = model_orm(ebs, rf=True)
    assert full.rf is not None and np.abs(full.rf).max() > 1e-6
    assert full.ncor == 448 and full.planes[:224] == ["x"] * 224


def test_model_orm_plan_records_the_model_and_corrections_name_it(machine, RE, catalog, ebs):
    """The model ORM as a run: the catalogue gives back exactly the model matrices (m/rad, m/A, RF column), nothing
    moved, and a correction made with it names that run."""
    from acc_bluesky.plans import correct_orbit
    from acc_bluesky.plans import model_orm as model_orm_plan

    before = machine.twin.snapshot()
    uid = RE(model_orm_plan(machine))
    assert all(np.array_equal(np.asarray(v), np.asarray(machine.twin.snapshot()[k])) for k, v in before.items())
    run = catalog[uid]
    assert run.metadata["start"]["tool"] == "orbit_response" and run.metadata["start"]["orm_kind"] == "model"
    got, ref = OrbitResponse.from_run(run), model_orm(ebs, rf=True)
    assert got.kind == "model" and got.uid == uid
    for a, b in ((got.matrix, ref.matrix), (got.matrix_hw, ref.matrix_hw), (got.rf, ref.rf)):
        np.testing.assert_array_equal(a, b)
    assert got.corrector_names == ref.corrector_names and got.bpm_names == ref.bpm_names
    cuid = RE(correct_orbit(machine, orm=uid, max_iter=1, figure_dir=False))
    assert catalog[cuid].metadata["start"]["orm_uid"] == uid


def test_orbit_response_tools(tmp_path, ebs):
    resp = model_orm(ebs, rf=True)
    sub = resp.submatrix(bpms=["BPM_001", "BPM_010"], correctors=["HST_003", "VST_004"])
    assert sub.matrix.shape == (4, 2) and sub.corrector_names == ["HST_003", "VST_004"]
    np.testing.assert_array_equal(sub.matrix[0, 0], resp.matrix[0, 2])
    np.testing.assert_array_equal(sub.matrix[3, 1], resp.matrix[224 + 9, 224 + 3])
    assert sub.rf.shape == (4,)
    assert resp.submatrix(planes="y").ncor == 224
    assert resp.block("y", "y").shape == (224, 224)
    np.testing.assert_array_equal(resp.to_hw(), resp.matrix_hw)
    np.testing.assert_array_equal(resp.to_physics(), resp.matrix)
    png = resp.plot(tmp_path / "orm.png")
    assert png.stat().st_size > 10_000
    back = OrbitResponse.from_results(resp.to_results(), resp.start_metadata())
    np.testing.assert_array_equal(back.matrix, resp.matrix)
    assert back.planes == resp.planes
    with pytest.raises(KeyError, match="not in this response matrix"):
        resp.column("QF2_001")


def test_bpms_with_an_acquisition_rate_never_give_a_stale_response(ebs, RE, catalog, tmp_path):
    """BPMs acquiring at 10 Hz: each reading of the plan waits for a fresh acquisition, so the measured columns
    are the true response, not zero (a reading of the acquisition taken before the corrector moved)."""
    import yaml

    from acc_bluesky.machine import connect

    spec = yaml.safe_load(ebs.path.read_text())
    spec["bpm"]["rate"] = 10.0
    path = tmp_path / "ebs10hz" / "profile.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    m = connect(str(path), mode="sim", seed=1)
    names = ["HST_020", "VST_033"]
    resp = OrbitResponse.from_run(catalog[RE(measure_orm(m, correctors=names))])
    assert rel(resp.matrix_hw, truth_orm(m.twin, names, 0.2)) <= 0.01


def test_orm_figure_is_drawn_off_the_plan_and_exists_when_re_returns(machine, RE, catalog, tmp_path, monkeypatch):
    """The ORM's PNG is drawn in the figure worker thread once the results are stored (the run closes at once);
    ``RE(plan)`` returns once it exists, and ``RE.wait_for_catalog()`` waits for it after ``wait_written = False``.
    The worker is not a daemon although the RunEngine's daemon loop thread starts it: a daemon thread stopped at the
    interpreter's exit inside matplotlib's C++ aborted a plain script ("terminate called without an active
    exception", seen in CI under load)."""
    import threading
    from pathlib import Path

    from acc_bluesky.data import figures

    threads = []
    plot = OrbitResponse.plot

    def spy(self, path, **kw):
        threads.append((threading.current_thread().name, threading.current_thread().daemon))
        return plot(self, path, **kw)

    monkeypatch.setattr(OrbitResponse, "plot", spy)
    uid = RE(measure_orm(machine, correctors=["HST_010", "VST_010"], figure_dir=tmp_path))
    png = Path(catalog[uid].metadata["start"]["figures"]["orm"])
    assert png.parent == tmp_path and png.stat().st_size > 1000 and figures.pending() == 0
    assert threads == [("acc-bluesky-figures", False)]
    RE.wait_written = False
    try:
        uid = RE(measure_orm(machine, correctors=["HST_011"], figure_dir=tmp_path))
        assert RE.wait_for_catalog(120)
        assert Path(catalog[uid].metadata["start"]["figures"]["orm"]).stat().st_size > 1000
    finally:
        RE.wait_written = True


def test_a_failing_figure_warns_and_the_run_is_complete(machine, RE, catalog, tmp_path, monkeypatch):
    def no_ink(self, path, **kw):
        raise RuntimeError("no ink")

    monkeypatch.setattr(OrbitResponse, "plot", no_ink)
    with pytest.warns(UserWarning, match=r"measure_orm: figure 'orm' not written \(no ink\)"):
        uid = RE(measure_orm(machine, correctors=["HST_012", "VST_012"], figure_dir=tmp_path))
    run = catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success" and run.metadata["stop"]["num_events"]["primary"] == 2
    assert OrbitResponse.from_run(run).matrix.shape == (448, 2)
    assert not list(tmp_path.glob("*.png"))


def test_orm_steps_are_bluesky_moves_that_read_the_orbit(machine, RE, catalog):
    """Per corrector the RunEngine sees one move to the corrector's column (the previous corrector put back, this
    one at +delta, then -delta, the orbit read once each arrived, with the values the twin's BPMs show) and the
    corrector's event (both orbits); the last corrector is put back at the end."""
    from acc_bluesky.data import read_stream
    from acc_bluesky.plan_stubs.orbit import OrmSteps

    names = ["HST_030", "HST_031", "VST_030"]
    msgs = []
    RE.msg_hook = msgs.append
    try:
        uid = RE(measure_orm(machine, correctors=names, figure_dir=False))
    finally:
        RE.msg_hook = None
    steps = [(m.command, m.args[0]) for m in msgs if m.command == "set" and isinstance(m.obj, OrmSteps)]
    assert steps == [("set", ("column", 0)), ("set", ("column", 1)), ("set", ("column", 2)), ("set", ("back", 2))]
    assert sum(m.command == "wait" for m in msgs if m.kwargs.get("group", "").startswith("acc-orm-")) == 4
    assert sum(m.command == "save" for m in msgs) == 3 + 1  # one event per corrector, then the results
    prim = read_stream(catalog[uid])
    resp = OrbitResponse.from_run(catalog[uid])
    assert prim["orm-index"].tolist() == [0, 1, 2]
    np.testing.assert_allclose((prim["orm-orbit_plus"] - prim["orm-orbit_minus"]).T / 0.4, resp.matrix_hw,
                               rtol=1e-12)


def test_a_measured_orm_stores_one_matrix_and_old_runs_with_both_still_read(machine, RE, catalog):
    """``orm`` [m/rad] is stored; ``orm_hw`` [m/A] is ``orm`` scaled per column by the steps of the start document
    (``delta_physics_rad / delta_hw``), rebuilt by the readers. Runs recorded before, with both, read the same."""
    from acc_bluesky.data import read_results
    from acc_bluesky.plan_stubs.tool import remembered

    uid = RE(measure_orm(machine, correctors=["HST_050", "VST_050", "HST_051"], figure_dir=False))
    run = catalog[uid]
    res = read_results(run)
    assert "orm" in res and "orm_hw" not in res
    back, measured = OrbitResponse.from_run(run), remembered(uid)[1]
    np.testing.assert_array_equal(back.matrix, measured.matrix)
    np.testing.assert_allclose(back.matrix_hw, measured.matrix_hw, rtol=1e-14, atol=0)
    start = run.metadata["start"]
    old = OrbitResponse.from_results({**res, "orm_hw": measured.matrix_hw}, start)  # the layout of older runs
    np.testing.assert_array_equal(old.matrix_hw, measured.matrix_hw)
    # a response whose m/A matrix is not orm scaled by its steps keeps both (e.g. no steps known)
    both = OrbitResponse(measured.matrix, measured.matrix_hw * 1.01, measured.bpm_names, measured.corrector_names,
                         measured.planes, delta=measured.delta, delta_physics=measured.delta_physics)
    assert "orm_hw" in both.to_results()
    assert "orm_hw" in OrbitResponse(measured.matrix, measured.matrix_hw, measured.bpm_names,
                                     measured.corrector_names, measured.planes).to_results()
