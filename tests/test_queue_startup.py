"""The queue startup without a server: settings, the plan wrappers run in-process, run lookups, sim faults."""

from __future__ import annotations

import numpy as np
import pytest

COR4 = ["HST_001", "HST_100", "VST_050", "VST_150"]


@pytest.fixture(scope="module")
def qmachine(_ebs_machine):
    """One sim machine (EBS, seed 1) for the module, the session's (connecting EBS again costs seconds), reset to its
    design setpoints at the module's start and end; tests leave no fault switched on."""
    _ebs_machine.twin.reset()
    yield _ebs_machine
    _ebs_machine.twin.reset()


@pytest.fixture(scope="module")
def qRE(tmp_path_factory, session_catalog_dir):  # noqa: N802 - bluesky's name
    """A RunEngine on the session's catalogue (its server already up; "latest" finds the newest run of a tool, and
    this worker's earlier modules only wrote older ones)."""
    from acc_bluesky.data import make_run_engine

    d = tmp_path_factory.mktemp("queue_startup")
    return make_run_engine(catalog_dir=session_catalog_dir, backup_dir=d / "backup", progress=False)


@pytest.fixture(scope="module")
def qplans(qmachine, qRE):  # noqa: N803
    from acc_bluesky.queue.startup import RunLookup, queue_functions, queue_plans

    lookup = RunLookup(qmachine, lambda: qRE.catalog)
    return queue_plans(qmachine, lookup), queue_functions(qmachine), lookup


def test_settings_from_env(monkeypatch):
    from acc_bluesky.queue.startup import settings_from_env

    monkeypatch.setenv("ACC_BLUESKY_PROFILE", "ebs")
    monkeypatch.setenv("ACC_BLUESKY_MODE", "sim")
    monkeypatch.setenv("ACC_BLUESKY_SEED", "none")
    monkeypatch.delenv("ACC_BLUESKY_PREFIX", raising=False)
    assert settings_from_env() == {"profile": "ebs", "mode": "sim", "seed": None, "prefix": None}
    monkeypatch.setenv("ACC_BLUESKY_PREFIX", "SR-TEST:")
    assert settings_from_env()["prefix"] == "SR-TEST:"
    monkeypatch.setenv("ACC_BLUESKY_SEED", "7")
    assert settings_from_env()["seed"] == 7
    assert settings_from_env(seed=3)["seed"] == 3
    monkeypatch.setenv("ACC_BLUESKY_SEED", "seven")
    with pytest.raises(ValueError, match="ACC_BLUESKY_SEED must be an integer or 'none', got 'seven'"):
        settings_from_env()
    # --- tango: a third mode, with the device server's address ---
    monkeypatch.setenv("ACC_BLUESKY_MODE", "tango")
    monkeypatch.setenv("ACC_BLUESKY_TANGO_ADDRESS", "127.0.0.1:45000")
    assert settings_from_env(seed=1)["address"] == "127.0.0.1:45000"
    monkeypatch.setenv("ACC_BLUESKY_MODE", "pva")
    with pytest.raises(ValueError, match="ACC_BLUESKY_MODE must be one of sim, epics, tango, got 'pva'"):
        settings_from_env(seed=1)
    # --- end tango ---


def test_profile_startup_uses_its_own_folder(ebs, tmp_path):
    from acc_bluesky.queue.startup import profile_from_startup_file

    assert profile_from_startup_file(str(ebs.path.parent / "startup.py"), "x") == str(ebs.path)
    assert profile_from_startup_file(str(tmp_path / "startup.py"), "ebs") == "ebs"
    assert profile_from_startup_file(None, "ebs") == "ebs"


def test_only_the_wrappers_are_plans_and_they_hide_the_machine(qplans):
    import inspect

    from bluesky.utils import is_plan

    plans, funcs, _ = qplans
    assert all(is_plan(p) for p in plans.values())
    assert not any(is_plan(f) for f in funcs.values())
    for name, p in plans.items():
        sig = inspect.signature(p)
        assert "machine" not in sig.parameters, name
        assert list(sig.parameters)[-1] == "md", name
        assert p.__doc__ and "Parameters\n" in p.__doc__, name
        ann = getattr(p, "_custom_parameter_annotation_", {}).get("parameters", {})
        assert set(ann) <= set(sig.parameters), name


def test_wrappers_expose_every_tool_parameter(qplans):
    """When a tool plan gains a parameter, its queue wrapper must offer it too (figures go to the default folder)."""
    import inspect

    from acc_bluesky.queue.plans import tool_plan_list

    tools = {p.__name__: p for p in tool_plan_list()}
    plans, _, _ = qplans
    renamed = {"uid_or_run": "config"}
    for name, wrapper in plans.items():
        if name == "count":
            continue
        tool = tools[name]
        tool_params = set(inspect.signature(tool).parameters) - {"machine", "figure_dir"}
        exposed = set(inspect.signature(wrapper).parameters)
        missing = {p for p in tool_params if renamed.get(p, p) not in exposed}
        assert not missing, f"queue plan {name} does not expose {sorted(missing)}"


def test_latest_lookup_skips_failed_runs_and_checks_the_tool(qRE, qplans):  # noqa: N803
    from acc_bluesky.plan_stubs.machine import BeamLostError

    RE = qRE  # noqa: N806
    plans, funcs, lookup = qplans
    good = RE(plans["measure_orm"](correctors=COR4, delta=0.5))
    assert lookup.resolve("latest", "orbit_response") == good

    def lose_on_first_event(name, doc):  # the beam is lost in the middle of the measurement
        if name == "event":
            funcs["sim_fault"]("lose_beam")

    token = RE.subscribe(lose_on_first_event)
    try:
        with pytest.raises(BeamLostError):
            RE(plans["measure_orm"](correctors=COR4, delta=0.5))
    finally:
        RE.unsubscribe(token)
    funcs["sim_fault"]("inject")
    failed = RE.catalog[-1].metadata
    assert failed["start"]["tool"] == "orbit_response" and failed["stop"]["exit_status"] == "fail"
    assert lookup.resolve("latest", "orbit_response") == good  # the failed ORM is never used

    cfg = RE(plans["save_config"](name="golden"))
    RE(plans["save_config"](name="other"))
    assert lookup.resolve("golden", "config", by_name="config_name") == cfg
    assert lookup.resolve(cfg, "config", by_name="config_name") == cfg
    with pytest.raises(LookupError, match=f"run {cfg} is a 'config' run, expected a 'orbit_response' run"):
        lookup.resolve(cfg, "orbit_response")
    with pytest.raises(LookupError, match="no successful 'config' run .* profile='ebs', mode='sim', seed=1, "
                                          "config_name='nightly'"):
        lookup.resolve("nightly", "config", by_name="config_name")


def test_correct_orbit_wrapper_uses_the_latest_orm(qmachine, qRE, qplans):  # noqa: N803
    from acc_bluesky.data import read_results

    machine, RE = qmachine, qRE  # noqa: N806
    plans, _, _ = qplans
    orm = RE(plans["measure_orm"](correctors=COR4, delta=0.5))
    sp0 = machine.twin.get_setpoint("HST").copy()
    uid = RE(plans["correct_orbit"](orm="latest", max_iter=1, n_sv=2))
    start = RE.catalog[uid].metadata["start"]
    assert start["orm_uid"] == orm and start["tool"] == "orbit_correction"
    res = read_results(RE.catalog[uid])
    np.testing.assert_allclose(machine.twin.get_setpoint("HST") - sp0, res["HST_correction"], atol=1e-12)
    assert np.count_nonzero(res["HST_correction"]) == 2  # only HST_001 and HST_100 are in the ORM


def test_count_records_fair_metadata(qmachine, qRE, qplans):  # noqa: N803
    machine, RE = qmachine, qRE  # noqa: N806
    plans, _, _ = qplans
    uid = RE(plans["count"](detectors=["bpm", "beam"], num=3))
    run = RE.catalog[uid]
    start = run.metadata["start"]
    assert start["tool"] == "count" and start["plan_name"] == "count"
    assert start["parameters"] == {"detectors": ["bpm", "beam"], "num": 3, "delay": 0.0}
    assert start["mode"] == "sim" and start["seed"] == 1 and start["profile"]["name"] == "ebs"
    x = np.asarray(run["primary"]["bpm-x"].read())
    assert x.shape == (3, 224)
    truth = machine.twin.orbit()[0]
    ok = np.isfinite(x[0])
    # readings = truth through BPM offsets/gains/rolls + noise: same sign and magnitude at the mm level
    assert np.corrcoef(x[0][ok], truth[ok])[0, 1] > 0.9


def test_sim_fault_switches_twin_anomalies(qmachine, qplans):
    machine = qmachine
    _, funcs, _ = qplans
    f = funcs["sim_fault"]
    assert f("dead_bpm", index=5)["dead_bpms"] == [5]
    assert np.isnan(machine.twin.read_bpms()[0][5])
    assert f("stuck", "HST", 3)["stuck"] == [["HST", 3]]
    assert f("noisy_bpm", index=7, rms=2e-6)["noisy_bpms"] == [7] and machine.twin.anomalies.noisy_bpms == {7: 2e-6}
    assert f("frozen_bpm", index=9)["frozen_bpms"] == [9]
    frozen = [machine.twin.read_bpms()[0][9] for _ in range(3)]
    assert frozen[0] == frozen[1] == frozen[2]
    assert f("clear") == {"stuck": [], "dead": [], "tripped": [], "dead_bpms": [], "noisy_bpms": [],
                          "frozen_bpms": [], "beam_lost": False}
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        f("melt")
    with pytest.raises(ValueError, match="stuck needs family and index"):
        f("stuck", "HST")
