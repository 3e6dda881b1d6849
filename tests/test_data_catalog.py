"""Runs in a catalogue folder (one on-demand Tiled server for the module): round trips, results, the RunEngine
convention, queries, export, databroker, FAIR metadata by default."""

from __future__ import annotations

import json
import time

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures
    N_BPM,
    _isolated_data_env,
    fake_machine,
    machine,
    make_bpm_device,
    run_engine,
)

from acc_bluesky.cli.catalog import main as catalog_main
from acc_bluesky.data import (
    MetadataError,
    RunResult,
    export_run,
    find_runs,
    make_run_engine,
    open_catalog,
    read_dataset,
    read_results,
    read_stream,
    run_metadata,
    stream_data_keys,
    tool_metadata,
)
from acc_bluesky.data.export import read_hdf5_export
from acc_bluesky.plan_stubs.results import store_result


@pytest.fixture(scope="module")
def module_catalog_dir(session_catalog_dir):
    """The session's catalogue folder (its server already up: a server of the module's own costs a start); this
    module reads its runs back by uid or by its tests' ``test_token``."""
    return session_catalog_dir


RNG = np.random.default_rng(1)


def orbit_scan(machine, bpm, n_steps, results=None, tool="orbit_response", md=None):
    """n_steps orbit readings while stepping the beam current, then the results; returns the run uid."""
    _md = tool_metadata(tool, machine, n_steps=n_steps) | (md or {})

    @bpp.run_decorator(md=_md)
    def inner():
        for i in range(n_steps):
            yield from bps.mv(bpm.x, np.linspace(-1e-4, 1e-4, N_BPM) * (i + 1), bpm.current, 0.2 + 0.01 * i)
            yield from bps.trigger_and_read([bpm])
        if results:
            units = {"orm": "m/rad", "singular_values": "m/rad", "rms": "m"}
            yield from store_result(
                results,
                units={k: u for k, u in units.items() if k in results},
                descriptions={"orm": "orbit response matrix, rows: BPM x then y; columns: hcor then vcor"}
                if "orm" in results else None,
            )
        return (yield from bps.null()) or None

    uid = yield from inner()
    return uid


def test_orm_and_orbit_round_trip_exactly(run_engine, machine):
    bpm = make_bpm_device()
    orm = RNG.normal(scale=1e-3, size=(224, 448))
    sv = np.linalg.svd(orm, compute_uv=False)
    tune_response = np.array([[0.5, -0.1], [0.2, 0.4]])  # small arrays too (SQLite tables hold no lists)
    results = {"orm": orm, "singular_values": sv, "rms": 1.25e-5, "n_corrector": 448, "converged": True,
               "method": "svd", "tunes": np.array([0.16, 0.34]), "tune_response": tune_response,
               "bad_bpms": np.array([3, 17, 101])}
    uid = run_engine(orbit_scan(machine, bpm, 12, results))

    run = run_engine.catalog[uid]
    back = read_results(run)
    assert back["orm"].dtype == np.float64 and back["orm"].shape == (224, 448)
    assert np.array_equal(back["orm"], orm)  # bit for bit
    assert np.array_equal(back["singular_values"], sv)
    assert float(back["rms"]) == 1.25e-5 and int(back["n_corrector"]) == 448
    assert bool(back["converged"]) is True and str(back["method"]) == "svd"
    assert np.array_equal(back["tunes"], [0.16, 0.34]) and np.array_equal(back["tune_response"], tune_response)
    assert back["bad_bpms"].dtype.kind == "i" and back["bad_bpms"].tolist() == [3, 17, 101]

    assert "empty_arrays" not in back and "empty_arrays" not in stream_data_keys(run, "results")
    keys = stream_data_keys(run, "results")
    assert keys["orm"]["units"] == "m/rad" and keys["orm"]["description"].startswith("orbit response")
    assert keys["orm"]["shape"] == [224, 448]
    assert keys["rms"]["units"] == "m" and keys["n_corrector"]["units"] == ""

    primary = read_stream(run)
    assert primary["bpm-x"].shape == (12, N_BPM)
    expected = np.linspace(-1e-4, 1e-4, N_BPM)[None, :] * np.arange(1, 13)[:, None]
    assert np.array_equal(primary["bpm-x"], expected)
    assert np.allclose(primary["bpm-current"], 0.2 + 0.01 * np.arange(12))
    assert np.all(np.diff(primary["time"]) >= 0)
    assert stream_data_keys(run)["bpm-x"]["units"] == "m"

    start = run_metadata(run)
    assert start["tool"] == "orbit_response" and start["parameters"] == {"n_steps": 12}
    assert run.metadata["stop"]["exit_status"] == "success"


def test_run_engine_returns_the_run_uid(run_engine, machine, tmp_path, module_catalog_dir):
    bpm = make_bpm_device()

    def returns_uid():
        @bpp.run_decorator(md=tool_metadata("tune", machine))
        def inner():
            yield from bps.trigger_and_read([bpm])

        uid = yield from inner()
        yield from bp.count([bpm], 1, md=tool_metadata("tune", machine))  # a second run after it
        return uid

    result = run_engine(returns_uid())
    assert isinstance(result, RunResult) and isinstance(result, str)
    assert len(result.run_start_uids) == 2
    assert result == result.plan_result == result.run_start_uids[0]  # the uid the plan returned
    assert result.exit_status == "success" and not result.interrupted
    assert run_engine.catalog[result].metadata["start"]["uid"] == result

    plain = run_engine(bp.count([bpm], 1, md=tool_metadata("tune", machine)))
    assert plain == plain.run_start_uids[-1]  # bluesky plans: the last run's uid

    legacy = make_run_engine(catalog_dir=module_catalog_dir, backup_dir=tmp_path / "bk", progress=False,
                             call_returns_result=False)
    uids = legacy(bp.count([bpm], 1, md=tool_metadata("tune", machine)))
    assert isinstance(uids, tuple) and len(uids) == 1


def test_validator_refuses_before_anything_moves(run_engine, machine, tmp_path, module_catalog_dir):
    bpm = make_bpm_device()
    md = tool_metadata("orbit_response", machine)
    del md["facility"], md["lattice"]

    def plan():
        @bpp.run_decorator(md=md)
        def inner():
            yield from bps.mv(bpm.current, 0.5)  # would move inside the run
            yield from bps.trigger_and_read([bpm])

        return (yield from inner())

    with pytest.raises(MetadataError, match="facility, lattice"):
        run_engine(plan())
    assert run_engine.state == "idle"
    value = run_engine(bps.rd(bpm.current)).plan_result
    assert value == pytest.approx(0.2)  # never moved
    assert list(find_runs(run_engine.catalog, test_token=run_engine.md["test_token"])) == []  # nothing recorded

    with pytest.raises(MetadataError, match="seed"):  # sim runs need the error seed
        run_engine(bp.count([bpm], 1, md={k: v for k, v in tool_metadata("x", machine).items() if k != "seed"}))

    lax = make_run_engine(catalog_dir=module_catalog_dir, validate=False, progress=False)
    assert lax(bp.count([bpm], 1))  # validation can be switched off


def test_find_runs_by_tool_facility_profile_mode_and_time(run_engine, machine, tmp_path):
    bpm = make_bpm_device()
    epics = fake_machine(tmp_path, mode="epics", seed=None)
    t0 = time.time()
    a = run_engine(orbit_scan(machine, bpm, 1, tool="orbit_response"))
    b = run_engine(orbit_scan(machine, bpm, 1, tool="dispersion"))
    time.sleep(0.05)
    t1 = time.time()
    c = run_engine(orbit_scan(epics, bpm, 1, tool="orbit_response"))
    cat = find_runs(run_engine.catalog, test_token=run_engine.md["test_token"])  # (the module shares a folder)

    assert sorted(find_runs(cat, tool="orbit_response")) == sorted([a, c])
    assert list(find_runs(cat, tool="orbit_response", mode="sim")) == [a]
    assert list(find_runs(cat, mode="epics")) == [c]
    assert sorted(find_runs(cat, facility="ESRF", profile="ebs")) == sorted([a, b, c])
    assert list(find_runs(cat, facility="SLS")) == []
    assert sorted(find_runs(cat, since=t0)) == sorted([a, b, c])
    assert list(find_runs(cat, since=t1)) == [c]
    assert sorted(find_runs(cat, until=t1)) == sorted([a, b])
    import datetime

    assert list(find_runs(cat, since=datetime.datetime.fromtimestamp(t1).isoformat(), tool="orbit_response")) == [c]
    assert list(find_runs(cat, **{"parameters.n_steps": 1, "tool": "dispersion"})) == [b]
    assert run_engine.catalog[-1].metadata["start"]["uid"] == c  # bluesky conveniences of the catalogue
    assert run_engine.catalog[c[:8]].metadata["start"]["uid"] == c


def test_open_catalog_of_a_folder_by_path_and_default_folder(machine, monkeypatch, module_catalog_dir):
    monkeypatch.setenv("ACC_BLUESKY_CATALOG", str(module_catalog_dir))
    RE = make_run_engine(progress=False)  # noqa: N806 - the folder from $ACC_BLUESKY_CATALOG
    assert RE.recorder.target.root == module_catalog_dir.resolve()
    uid = RE(bp.count([make_bpm_device()], 2, md=tool_metadata("test", machine)))
    assert (module_catalog_dir / "catalog.db").exists() and (module_catalog_dir / "data").is_dir()
    for cat in (open_catalog(), open_catalog(module_catalog_dir), open_catalog(str(module_catalog_dir)),
                open_catalog(catalog_dir=module_catalog_dir)):
        assert read_stream(cat[uid])["bpm-x"].shape == (2, N_BPM)


def test_store_result_iterations_and_bad_input(run_engine, machine):
    kicks = RNG.normal(scale=1e-5, size=(3, 448))

    def correction():
        @bpp.run_decorator(md=tool_metadata("orbit_correction", machine))
        def inner():
            for i, kick in enumerate(kicks):  # one event per iteration, same keys
                yield from store_result({"kick": kick, "rms": 1e-4 / (i + 1)}, units={"kick": "rad", "rms": "m"})
            yield from store_result({"converged": True}, stream="summary")

        return (yield from inner())

    run = run_engine.catalog[run_engine(correction())]
    assert np.array_equal(read_stream(run, "results")["kick"], kicks)
    assert np.array_equal(read_results(run)["kick"], kicks[-1])  # the last iteration
    assert float(read_results(run)["rms"]) == pytest.approx(1e-4 / 3)
    assert bool(read_results(run, "summary")["converged"])
    with pytest.raises(KeyError, match="no stream 'nope'"):
        read_results(run, "nope")

    with pytest.raises(ValueError, match="reserved"):
        list(store_result({"time": 1.0}))
    with pytest.raises(KeyError, match="not results"):
        list(store_result({"a": 1.0}, units={"b": "m"}))


def test_export_hdf5_and_csv_round_trip(run_engine, machine, tmp_path):
    bpm = make_bpm_device()
    orm = RNG.normal(size=(224, 448))
    uid = run_engine(orbit_scan(machine, bpm, 3, {"orm": orm, "rms": 2.0}))
    run = run_engine.catalog[uid]

    (h5,) = export_run(run, tmp_path / "run.h5")
    back = read_hdf5_export(h5)
    assert back["start"]["uid"] == uid and back["start"]["tool"] == "orbit_response"
    assert back["stop"]["exit_status"] == "success"
    assert np.array_equal(back["results"]["orm"][-1], orm)
    assert np.array_equal(back["primary"]["bpm-x"], read_stream(run)["bpm-x"])
    import h5py

    with h5py.File(h5) as f:
        assert f["entry"].attrs["NX_class"] == "NXentry"
        assert f["entry/results/orm"].attrs["units"] == "m/rad"
        assert f["entry/start"].attrs["facility"] == "ESRF"
        assert f["entry/start/profile"].attrs["sha256"] == "a" * 64
        assert f["entry/start/software"].attrs["bluesky"]

    files = export_run(run, tmp_path / "run.csv", streams=["primary"])
    assert [p.name for p in files] == ["run.primary.csv"]
    lines = files[0].read_text().splitlines()
    assert lines[0].startswith(f"# run uid: {uid}") and "bpm-x=m" in lines[1]
    header = lines[2].split(",")
    assert header[0] == "time" and "bpm-x[223]" in header and "bpm-current" in header
    rows = np.array([[float(x) for x in line.split(",")] for line in lines[3:]])
    assert rows.shape == (3, 1 + N_BPM + 1)
    assert np.array_equal(rows[:, header.index("bpm-x[10]")], read_stream(run)["bpm-x"][:, 10])


def test_cli_export_and_ls(run_engine, machine, tmp_path, capsys, module_catalog_dir):
    uid = run_engine(orbit_scan(machine, make_bpm_device(), 2, {"rms": 1.0}))
    folder = str(module_catalog_dir)
    assert catalog_main(["catalog", "export", uid[:8], str(tmp_path / "out.h5"), "--dir", folder]) == 0
    assert read_hdf5_export(tmp_path / "out.h5")["start"]["uid"] == uid
    assert catalog_main(["catalog", "ls", "--dir", folder, "--tool", "orbit_response"]) == 0
    out = capsys.readouterr().out
    assert uid in out and "orbit_response" in out and "success" in out
    assert catalog_main(["catalog", "export", "nonexistent", str(tmp_path / "x.h5"), "--dir", folder]) == 1
    json.dumps(run_metadata(run_engine.catalog[uid]))


def test_databroker_v1_and_v2_read_a_tool_run_and_units_reach_xarray(run_engine, machine, module_catalog_dir):
    from databroker.v1 import Broker
    from databroker.v2 import CatalogOfBlueskyRuns

    bpm = make_bpm_device()
    uid = run_engine(orbit_scan(machine, bpm, 4, {"rms": 3e-6}, tool="orbit_response"))
    expected = np.linspace(-1e-4, 1e-4, N_BPM)[None, :] * np.arange(1, 5)[:, None]
    # v2: databroker's client (Tiled's bluesky catalogue) on the folder's server
    v2 = open_catalog(module_catalog_dir)
    assert isinstance(v2, CatalogOfBlueskyRuns)
    run = v2[uid]
    assert run.metadata["start"]["tool"] == "orbit_response"
    assert np.array_equal(np.asarray(run["primary"]["bpm-x"].read()), expected)
    # v1: Broker over the same catalogue: headers, tables, searches by FAIR keys (databroker then serves the
    # process's runs in its v2 layout: our readers read them all the same)
    db = Broker(v2)
    header = db[uid]
    assert header.start["uid"] == uid and header.stop["exit_status"] == "success"
    table = header.table()
    assert len(table) == 4 and np.allclose(table["bpm-current"].to_numpy(), 0.2 + 0.01 * np.arange(4))
    assert uid in [h.start["uid"] for h in db(tool="orbit_response", test_token=run_engine.md["test_token"])]
    # our reading helper: an xarray Dataset with the descriptor's units in attrs
    ds = read_dataset(run_engine.catalog[uid])
    assert ds["bpm-x"].attrs["units"] == "m" and ds["bpm-current"].attrs["units"] == "A"
    assert np.array_equal(ds["bpm-x"].values, expected) and ds.sizes["time"] == 4
    assert read_dataset(run_engine.catalog[uid], "results")["rms"].attrs["units"] == "m"
    assert type(v2.v3[uid]).__name__ == "BlueskyRunV3"  # (back to the v3 layout for the rest of the process)


def test_fair_metadata_by_default_for_bluesky_plans_on_a_registered_machine(run_engine, tmp_path):
    """bluesky's own plans on a registered machine's devices: facility ... seed and tool filled, nothing typed."""
    from acc_bluesky.data import register_machine, unregister_machine

    class Machine:  # duck-typed: what connect() returns
        def __init__(self, seed, detector):
            self.profile, self.mode, self.seed = fake_machine(tmp_path).profile, "sim", seed
            self._detector = detector

        def devices(self):
            return [self._detector]

    a_bpm, b_bpm = make_bpm_device("bpm"), make_bpm_device("bpm")  # same names on two machines
    a, b = Machine(1, a_bpm), Machine(2, b_bpm)
    register_machine(a)
    try:
        uid = run_engine(bp.count([a_bpm], 2))
        start = run_engine.catalog[uid].metadata["start"]
        assert start["tool"] == "count" and start["seed"] == 1 and start["facility"] == "ESRF"
        assert start["profile"]["sha256"] == "a" * 64 and start["lattice"]["sha256"] == "b" * 64
        register_machine(b)
        uid = run_engine(bp.scan([b_bpm], b_bpm.current, 0.1, 0.2, 2))  # b's objects, though a has the names
        start = run_engine.catalog[uid].metadata["start"]
        assert start["seed"] == 2 and start["tool"] == "scan" and start["mode"] == "sim"
        other = make_bpm_device("other")  # on no machine: which one is meant is unknown
        with pytest.raises(MetadataError, match=r"none of the \d+ connected machines"):
            run_engine(bp.count([other], 1))
        uid = run_engine(bp.count([other], 1, md=tool_metadata("x", a) | {"tool": "mine"}))
        assert run_engine.catalog[uid].metadata["start"]["tool"] == "mine"  # what is given is kept
    finally:
        unregister_machine(a)
        unregister_machine(b)
    with pytest.raises(MetadataError, match="facility"):  # no machine: refused as before
        run_engine(bp.count([a_bpm], 1))


def test_results_with_no_element_are_recorded_and_read_back(run_engine, machine):
    """A correction that converged without a step stores a (0, 2) history: Tiled's tables hold no empty array,
    so the run once was refused whole (ArrowInvalid) and went to the backup; its shapes are kept instead."""
    bpm = make_bpm_device()
    results = {"steps_hw": np.zeros((0, 2)), "bad": np.zeros(0, dtype=np.int64), "m": np.zeros((3, 0)),
               "xi": np.array([0.2, 0.1])}
    uid = run_engine(orbit_scan(machine, bpm, 2, results))
    run = run_engine.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"  # in the catalogue, not only in the backup
    back = read_results(run)
    assert back["steps_hw"].shape == (0, 2) and back["steps_hw"].dtype == np.float64
    assert back["bad"].shape == (0,) and back["bad"].dtype == np.int64
    assert back["m"].shape == (3, 0) and np.array_equal(back["xi"], [0.2, 0.1])
    assert "empty_arrays" not in back


def test_an_empty_catalogue_path_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """'' (an unset shell variable, an empty setting) is not the working directory: no catalogue, lock or key there."""
    from acc_bluesky.data import local, make_run_engine, open_catalog

    monkeypatch.chdir(tmp_path)
    for call in (lambda: local.stop_server(""), lambda: open_catalog(""), lambda: make_run_engine(catalog_dir="")):
        with pytest.raises(ValueError, match="empty path"):
            call()
    assert list(tmp_path.iterdir()) == []
