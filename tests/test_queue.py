"""Batch plans on a real bluesky-queueserver: Redis + RE Manager on loopback, the EBS sim twin in the worker.

One server (``acc-bluesky queue start ebs``) serves the module; each test leaves the queue empty and idle.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import yaml

from queue_fixtures import api, cli, needs_redis, queue_dirs, queue_server  # noqa: F401 - fixtures

from acc_bluesky.analysis.config import config_from_run

pytestmark = [needs_redis, pytest.mark.timeout(400)]

#: 10 correctors spread around the ring (5 per plane, every 45th): a quick ORM that still corrects the orbit
HST10 = [f"HST_{i:03d}" for i in range(1, 225, 45)] + [f"VST_{i:03d}" for i in range(23, 225, 45)]


def _catalog(queue_dirs):
    from acc_bluesky.data import open_catalog

    return open_catalog(catalog_dir=queue_dirs["catalog"])


def _results(run, *keys):
    """The named results of a run (its small arrays are packed in one data key: read them all)."""
    from acc_bluesky.data import read_results

    res = read_results(run)
    return {k: res[k] for k in keys}


def _run_items(api, items, timeout=240.0):  # noqa: F811
    """Submit ``[(plan, kwargs, submit-options)]``, start the queue, wait; returns the history items."""
    from acc_bluesky.queue import run_queue, submit

    uids = [submit(api, plan, kw, **opts) for plan, kw, opts in items]
    return run_queue(api, uids, timeout=timeout)


def _assert_idle_and_empty(api):  # noqa: F811
    from acc_bluesky.queue import status

    st = status(api)
    assert st["manager_state"] == "idle" and st["items_in_queue"] == 0, st
    assert st["worker_environment_exists"]


# --------------------------------------------------------------------------------------------- no server
def test_shipped_permissions_give_each_group_its_plans(ebs):
    from bluesky_queueserver.manager.profile_ops import load_user_group_permissions

    from acc_bluesky.queue.permissions import DEFAULT_PERMISSIONS, plan_allowed

    path = ebs.path.parent / "user_group_permissions.yaml"
    perms = load_user_group_permissions(str(path))  # the queue server's own loader and schema
    assert perms == yaml.safe_load(path.read_text()) == DEFAULT_PERMISSIONS
    plans = ["count", "measure_orm", "measure_dispersion", "measure_tune", "measure_chromaticity", "save_config",
             "correct_orbit", "orbit_bump", "correct_tune", "correct_chromaticity", "restore_config"]
    allowed = {g: {p for p in plans if plan_allowed(p, g, perms)} for g in ("primary", "admin", "operator",
                                                                             "guest")}
    assert allowed["primary"] == allowed["admin"] == set(plans)
    assert allowed["operator"] == set(plans) - {"restore_config"}
    assert allowed["guest"] == {"count", "measure_orm", "measure_dispersion", "measure_tune",
                                "measure_chromaticity"}
    with pytest.raises(KeyError, match="unknown user group 'visitor'"):
        plan_allowed("count", "visitor", perms)


def test_parse_params_reads_yaml_values():
    from acc_bluesky.queue import parse_params

    kw = parse_params(["delta=0.2", "correctors=[HST_001, VST_002]", "bipolar=false", "tol=null", "name=golden",
                       "target=[0.21, 0.34]"])
    assert kw == {"delta": 0.2, "correctors": ["HST_001", "VST_002"], "bipolar": False, "tol": None,
                  "name": "golden", "target": [0.21, 0.34]}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_params(["delta"])
    with pytest.raises(ValueError, match="given twice"):
        parse_params(["n_avg=1", "n_avg=2"])


def test_missing_redis_says_how_to_install(monkeypatch, tmp_path):
    from acc_bluesky.queue import QueueServerError, start_queue_server
    from acc_bluesky.queue import manager

    real_which = shutil.which
    monkeypatch.setattr(manager.shutil, "which", lambda name: None if name == "redis-server" else real_which(name))
    with pytest.raises(QueueServerError, match=r"apt-get install redis-server"):
        start_queue_server("ebs", run_dir=tmp_path / "run", catalog_dir=tmp_path / "cat")
    assert not (tmp_path / "run" / "server.json").exists()


def test_shipped_plan_list_is_up_to_date(ebs, tmp_path, session_catalog_dir):
    """``acc-bluesky queue gen-lists`` reproduces the shipped list: every plan, parameter, type, enum, default."""
    from acc_bluesky.cli import main

    # (the generator runs in its own process; its startup's RunEngine opens the session's catalogue, whose server
    # is up: listing records nothing)
    assert main(["queue", "gen-lists", "ebs", "--out", str(tmp_path), "--catalog-dir", str(session_catalog_dir)]) == 0
    fresh = yaml.safe_load((tmp_path / "existing_plans_and_devices.yaml").read_text())
    shipped = yaml.safe_load((ebs.path.parent / "existing_plans_and_devices.yaml").read_text())
    same = fresh == shipped  # a plain bool: pytest's rewrite of a diff of two large dicts is unreadable anyway
    assert same, "run `acc-bluesky queue gen-lists ebs` and commit the file"
    plans = fresh["existing_plans"]
    # only the queue plans (one per tool plan, generated from it, and count) are plans: no helper generator of the
    # tool modules leaks into the namespace
    from acc_bluesky.queue.plans import tool_plan_list

    assert set(plans) == {"count", *(p.__name__ for p in tool_plan_list())}
    assert {"measure_orm", "correct_orbit", "orbit_bump", "measure_dispersion", "save_config", "restore_config",
            "measure_tune", "measure_tune_response", "correct_tune", "measure_chromaticity",
            "measure_chromaticity_response", "correct_chromaticity", "model_orm"} <= set(plans)
    par = {p["name"]: p for p in plans["measure_orm"]["parameters"]}
    assert "machine" not in par
    cors = par["correctors"]["annotation"]["enums"]["Correctors"]
    assert len(cors) == 2 + 224 + 224 and cors[:3] == ["HST", "VST", "HST_001"]
    assert float(par["delta"]["max"]) == 8.0 and "[A]" in par["delta"]["description"]  # half the +-8 A span
    assert {"bpm", "rf", "tune", "beam", "HST", "VST", "QF2", "S4"} <= set(fresh["existing_devices"])


# --------------------------------------------------------------------------------------------- with server
def test_server_started_on_loopback(queue_server, api):  # noqa: F811
    from acc_bluesky.queue import status

    assert queue_server.zmq_control_addr.startswith("tcp://127.0.0.1:")
    assert queue_server.is_running()
    st = status(api)
    assert st["worker_environment_exists"] and st["manager_state"] == "idle"
    print(f"queue server started and environment open in {queue_server.start_seconds:.1f} s")


@pytest.mark.parametrize("plan, kwargs, group, reason", [
    ("measure_orm", {"delta": "big"}, None, "valid number"),
    ("measure_orm", {"n_avg": 2.5}, None, "valid integer"),
    ("measure_orm", {"deltaa": 0.2}, None, "unexpected keyword argument 'deltaa'"),
    ("measure_orm", {"correctors": ["HST_999"]}, None, "HST_999"),
    ("measure_orm", {"delta": 40.0}, None, "40.0"),
    ("measure_orm", {"delta": 9.0}, None, "out of range"),
    ("measure_dispersion", {"df": 1e9}, None, "out of range"),
    ("measure_tune_response", {"delta": 1e6}, None, "out of range"),
    ("measure_chromaticity", {"steps": 4000}, None, "out of range"),
    ("count", {"num": 10 ** 9}, None, "out of range"),
    ("measure_tune", {"n_avg": 10 ** 8}, None, "out of range"),
    ("correct_tune", {"target": [0.2]}, None, "target"),
    ("correct_tune", {"target": [0.44, 0.39, 0.1]}, None, "target"),
    ("correct_chromaticity", {"target": [1e6, 5.0]}, None, "out of range"),
    ("correct_orbit", {"gain": 1.5}, None, "1.5"),
    ("correct_tune", {}, None, "target"),
    ("orbit_bump", {"bpm": "BPM_999", "amplitude": 1e-4}, None, "BPM_999"),
    ("measure_orbit_response", {}, None, "not in the list of allowed plans"),
    ("correct_orbit", {}, "guest", "not in the list of allowed plans"),
    ("restore_config", {}, "operator", "not in the list of allowed plans"),
])
def test_bad_submission_is_refused_before_anything_runs(api, plan, kwargs, group, reason):  # noqa: F811
    from acc_bluesky.queue import SubmissionRefused, submit

    with pytest.raises(SubmissionRefused, match="the queue refused") as info:
        submit(api, plan, kwargs, group=group)
    assert reason in info.value.reason
    assert "For further information" not in str(info.value)
    _assert_idle_and_empty(api)


def test_cli_refuses_a_wrong_parameter(queue_dirs, queue_server, capsys):  # noqa: F811
    from acc_bluesky.cli import main

    assert main(["queue", "submit", "measure_orm", "-p", "n_avg=two", "--run-dir", str(queue_dirs["run"])]) == 1
    err = capsys.readouterr().err
    assert "the queue refused measure_orm(n_avg='two')" in err and "valid integer" in err


def test_measure_orm_then_correct_orbit(api, queue_dirs):  # noqa: F811
    """The queue runs an ORM on 10 correctors, then corrects the orbit with it ("latest"); both runs are in Tiled
    with FAIR metadata, and the machine keeps the correction (a later save_config shows exactly its steps)."""
    t0 = time.perf_counter()
    res = _run_items(api, [("save_config", {"name": "before correction"}, {}),
                           ("measure_orm", {"correctors": HST10, "delta": 0.5}, {"user": "alice",
                                                                                  "group": "operator"}),
                           ("correct_orbit", {"orm": "latest", "max_iter": 2},
                            {"user": "alice", "group": "operator"}),
                           ("save_config", {"name": "after correction"}, {})])
    elapsed = time.perf_counter() - t0
    assert all(r is not None and r["result"]["exit_status"] == "completed" for r in res), \
        [r and (r["name"], r["result"]["msg"]) for r in res]
    before_uid, orm_uid, cor_uid, after_uid = (r["result"]["run_uids"][-1] for r in res)
    assert len(res[2]["result"]["run_uids"]) == 1  # "latest" used the queued ORM, no new measurement
    _assert_idle_and_empty(api)

    cat = _catalog(queue_dirs)
    orm_run, cor_run = cat[orm_uid], cat[cor_uid]
    for run, tool in ((orm_run, "orbit_response"), (cor_run, "orbit_correction")):
        start = run.metadata["start"]
        assert start["tool"] == tool
        assert start["facility"] == "ESRF" and start["accelerator"]
        assert start["profile"]["name"] == "ebs" and len(start["profile"]["sha256"]) == 64
        assert start["lattice"]["sha256"] and start["mode"] == "sim" and start["seed"] == 1
        assert start["operator"] == "alice" and start["user_group"] == "operator"
        assert start["license"] and start["software"]["bluesky"]
        assert run.metadata["stop"]["exit_status"] == "success"
    assert orm_run.metadata["start"]["corrector_names"] == HST10
    assert cor_run.metadata["start"]["orm_uid"] == orm_uid

    # the ORM: 2 x 224 BPM readings per corrector, x response to HST and y to VST dominate
    from acc_bluesky.analysis.orm import OrbitResponse

    orm = OrbitResponse.from_run(orm_run)
    assert orm.matrix.shape == (448, 10)
    assert np.all(np.abs(orm.matrix[:224, :5]).max(axis=0) > 10 * np.abs(orm.matrix[224:, :5]).max(axis=0))
    assert np.all(np.abs(orm.matrix[224:, 5:]).max(axis=0) > 10 * np.abs(orm.matrix[:224, 5:]).max(axis=0))

    # the correction: it reduced the orbit, and the machine kept exactly the steps it reports
    cr = _results(cor_run, "rms_x_before", "rms_x_after", "rms_y_before", "rms_y_after", "HST_correction",
                  "VST_correction")
    # 5 + 5 correctors remove only part of the orbit: the truth is the least-squares optimum of the measured ORM
    # on the orbit read before the first step (seed 1: x 1.05 -> 0.77 mm, y 0.47 -> 0.45 mm, 2 iterations)
    x0 = np.asarray(cor_run["primary"]["orbit_correction-x_before"].read())[0]
    y0 = np.asarray(cor_run["primary"]["orbit_correction-y_before"].read())[0]
    for plane, dev, cols, after in (("x", x0, slice(0, 5), cr["rms_x_after"]), ("y", y0, slice(5, 10),
                                                                               cr["rms_y_after"])):
        r = orm.matrix[:224, cols] if plane == "x" else orm.matrix[224:, cols]
        ok = np.isfinite(dev)
        best = dev[ok] - r[ok] @ np.linalg.lstsq(r[ok], dev[ok], rcond=None)[0]
        optimum = float(np.sqrt(np.mean(best ** 2)))
        assert after < 1.05 * optimum + 2e-6, (plane, after, optimum)  # within 5 % of the best these can do
    before, after = config_from_run(cat[before_uid]), config_from_run(cat[after_uid])
    for fam in ("HST", "VST"):
        np.testing.assert_allclose(after[fam] - before[fam], cr[f"{fam}_correction"], atol=1e-12)
        moved = {f"{fam}_{i + 1:03d}" for i in np.nonzero(after[fam] != before[fam])[0]}
        assert moved and moved <= set(HST10)  # only the ORM's correctors moved
    for key in set(before) - {"HST", "VST"}:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    per_item = ", ".join(f"{r['name']} {r['result']['time_stop'] - r['result']['time_start']:.1f} s" for r in res)
    print(f"queue: {per_item}; ")
    print(f"queue: save_config + measure_orm (10 correctors) + correct_orbit + save_config in {elapsed:.1f} s; "
          f"orbit rms x {cr['rms_x_before'] * 1e6:.1f} -> {cr['rms_x_after'] * 1e6:.1f} um, "
          f"y {cr['rms_y_before'] * 1e6:.1f} -> {cr['rms_y_after'] * 1e6:.1f} um")


def test_failed_plans_leave_queue_usable_and_machine_restored(api, queue_dirs):  # noqa: F811
    """A plan refused at its limits and a plan hit by a beam loss both fail cleanly: the queue stops with the
    failed item back at its front, the setpoints are exactly as before, and the next item runs."""
    from acc_bluesky.queue import call_function, history, run_queue, submit

    (ref,) = _run_items(api, [("save_config", {"name": "reference"}, {})])
    ref_uid = ref["result"]["run_uids"][0]

    # 1. a bump the correctors cannot make (+-8 A limits): refused when the plan starts, before anything moves
    #    (a parameter out of its declared range, e.g. a corrector step past half the span, never gets this far:
    #    the submission is refused, see test_bad_submission_is_refused_before_anything_runs)
    (fail1,) = _run_items(api, [("orbit_bump", {"bpm": "BPM_010", "amplitude": 0.01}, {})])
    assert fail1["result"]["exit_status"] == "failed"
    assert "HST_0" in fail1["result"]["msg"] and "limit" in fail1["result"]["msg"].lower()
    q = api.queue_get(reload=True)["items"]
    assert [i["name"] for i in q] == ["orbit_bump"] and q[0]["item_uid"] != fail1["item_uid"]
    api.item_remove(pos="front")

    # 2. no beam: the plan refuses to start, before anything moves, and records no run
    assert call_function(api, "sim_fault", "lose_beam")["beam_lost"] is True
    (fail2,) = _run_items(api, [("measure_orm", {"correctors": HST10, "delta": 0.5}, {})])
    assert fail2["result"]["exit_status"] == "failed"
    assert "did not start: no beam" in fail2["result"]["msg"] and "Nothing was moved" in fail2["result"]["msg"]
    assert fail2["result"]["run_uids"] == []
    assert call_function(api, "sim_fault", "inject")["beam_lost"] is False

    # the queue is usable: drop the failed item, the next one runs after queue_start
    assert [i["name"] for i in api.queue_get(reload=True)["items"]] == ["measure_orm"]
    api.item_remove(pos="front")
    uid = submit(api, "save_config", {"name": "after failures"})
    (after,) = run_queue(api, [uid], timeout=120)
    assert after["result"]["exit_status"] == "completed"
    _assert_idle_and_empty(api)
    assert [h["result"]["exit_status"] for h in history(api)[-4:]] == ["completed", "failed", "failed", "completed"]

    cat = _catalog(queue_dirs)
    a, b = config_from_run(cat[ref_uid]), config_from_run(cat[after["result"]["run_uids"][0]])
    assert set(a) == set(b) and {"HST", "VST", "QF2", "S4", "RF:frequency", "RF:voltage"} <= set(a)
    for k in a:  # every family and the RF, exactly
        np.testing.assert_array_equal(b[k], a[k], err_msg=f"{k} not restored")
    # the refused ORM recorded nothing
    from acc_bluesky.data import find_runs

    assert not [u for u in find_runs(cat, tool="orbit_response", since=queue_dirs["since"])
                if cat[u].metadata["stop"]["exit_status"] != "success"]


def test_a_run_records_who_submitted_it_whatever_the_client(api, queue_dirs):  # noqa: F811
    """An item added with the plain REManagerAPI (as qserver and GUIs do, no metadata of ours): the run says alice
    of group operator submitted it, not the worker's login."""
    from acc_bluesky.queue import run_queue

    resp = api.item_add({"item_type": "plan", "name": "count", "kwargs": {"detectors": ["beam"], "num": 1}},
                        user="alice", user_group="operator")
    assert resp["success"], resp
    (done,) = run_queue(api, [resp["item"]["item_uid"]], timeout=120)
    assert done["result"]["exit_status"] == "completed"
    start = _catalog(queue_dirs)[done["result"]["run_uids"][0]].metadata["start"]
    assert start["operator"] == "alice" and start["user_group"] == "operator"
    assert start["queue_item_uid"] == resp["item"]["item_uid"]
    _assert_idle_and_empty(api)


def test_guest_may_measure_but_not_fault_the_twin(api):  # noqa: F811
    from acc_bluesky.queue import QueueError, call_function

    res = _run_items(api, [("count", {"detectors": ["bpm", "tune"], "num": 2}, {"user": "bob", "group": "guest"})])
    assert res[0]["result"]["exit_status"] == "completed"
    with pytest.raises(QueueError, match="not allowed"):
        call_function(api, "sim_fault", "lose_beam", group="guest")
    _assert_idle_and_empty(api)


def test_cli_submit_status_and_plans(queue_dirs, queue_server, capsys):  # noqa: F811
    from acc_bluesky.cli import main

    run_dir = ["--run-dir", str(queue_dirs["run"])]
    assert main(["queue", "submit", "measure_tune", "-p", "n_avg=2", "--user", "carol", "--group", "operator",
                 "--wait", "--timeout", "120", *run_dir]) == 0
    assert "measure_tune(n_avg=2) by carol (operator) [completed] runs:" in capsys.readouterr().out
    assert main(["queue", "status", *run_dir]) == 0
    out = capsys.readouterr().out
    assert "manager idle, environment open" in out and "measure_tune(n_avg=2)" in out
    assert main(["queue", "plans", "--group", "guest", *run_dir]) == 0
    out = capsys.readouterr().out
    assert "measure_orm:" in out and "correct_orbit" not in out
    assert "correctors: typing.Optional[typing.List[{HST, VST, HST_001" in out


def test_broken_startup_is_reported_and_cleaned_up(ebs, tmp_path):
    """A failed environment open (reported as a success by the manager) is detected and nothing is left."""
    from acc_bluesky.queue import QueueServerError, start_queue_server

    prof = tmp_path / "broken"
    prof.mkdir()
    for f in ("profile.yaml", "existing_plans_and_devices.yaml", "user_group_permissions.yaml"):
        shutil.copy(ebs.path.parent / f, prof / f)
    (prof / "startup.py").write_text("raise RuntimeError('this startup is broken on purpose')\n")
    with pytest.raises(QueueServerError, match="failed to open") as info:
        start_queue_server(prof / "profile.yaml", run_dir=tmp_path / "run", catalog_dir=tmp_path / "cat",
                           timeout=120)
    assert "broken on purpose" in str(info.value)
    assert not (tmp_path / "run" / "server.json").exists()
    log = (tmp_path / "run" / "re_manager.log").read_text()
    assert "broken on purpose" in log


def test_cli_stop_ends_every_process(queue_dirs, queue_server, capsys):  # noqa: F811
    """Last: ``queue stop`` ends the watchdog, the manager, the worker and Redis."""
    import psutil

    from acc_bluesky.cli import main

    children = [p.pid for p in psutil.Process(queue_server.manager_pid).children(recursive=True)]
    assert len(children) >= 2  # manager and worker
    assert main(["queue", "stop", "--run-dir", str(queue_dirs["run"])]) == 0
    for pid in [queue_server.manager_pid, queue_server.redis_pid, *children]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not queue_server.state_file.exists()
    assert main(["queue", "status", "--run-dir", str(queue_dirs["run"])]) == 1
    assert "no queue server is running" in capsys.readouterr().err
