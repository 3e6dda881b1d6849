"""Commissioning campaigns: a sequence of the real tool plans per seed on Dask workers, truth from each seed's twin.

One LocalCluster (2 worker processes) and the session's catalogue folder (its Tiled server) serve the module; the
Dask scheduler + worker started as separate processes serve the determinism test. Everything started here is
stopped here.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from acc_bluesky.cli.commission import parse_seeds
from acc_bluesky.commissioning import (
    CampaignResult,
    SequenceError,
    default_sequence,
    load_sequence,
    run_campaign,
)
from acc_bluesky.commissioning.truth import design_values

HMBA = str(Path(__file__).parent / "profiles" / "hmba" / "profile.yaml")
ORBIT_TARGET = 100e-6  # m: BPM offsets are 50 um rms, the corrected orbit sits at that level
SEQ = f"""
name: test
steps:
  - measure_lifetime: {{}}     # a tool this installation does not have: skipped with a note
    optional: true
  - measure_orm: {{rf: true}}
    id: orm
    success: {{beam: true}}
    required: true
  - correct_orbit: {{orm: $orm, fit_rf: true, n_sv: 8, target_rms: {ORBIT_TARGET}}}
"""


# --------------------------------------------------------------------------------------------------- sequences
def test_sequence_is_validated_before_anything_starts():
    seq = load_sequence(SEQ, HMBA)
    assert [s.id for s in seq.steps] == ["measure_lifetime", "orm", "correct_orbit"]
    assert "not registered" in seq.steps[0].skip and [s.id for s in seq.runnable] == ["orm", "correct_orbit"]
    assert seq.steps[2].success == {"orbit_rms": ORBIT_TARGET}  # target_rms: a criterion, not a parameter
    # YAML 1.1 reads 50e-6 as a string: taken as the number the plan wants
    s = load_sequence("steps: [{correct_orbit: {tol: 50e-6, max_step: 1e-1}}]", HMBA)
    assert s.steps[0].params == {"tol": 50e-6, "max_step": 0.1}
    bad = {
        "steps: [{correct_orbit: {n_sv: 2.5}}]": "n_sv must be an integer",
        "steps: [{correct_orbit: {gain: 1.5}}]": "gain .* must be > 0 and <= 1",
        "steps: [{correct_orbit: {fit_rf: 1}}]": "fit_rf must be a bool",
        "steps: [{correct_orbit: {fitrf: true}}]": "has no parameter 'fitrf'; it takes orm, n_sv",
        "steps: [{correct_orbit: {orm: $nope}}]": r"\$nope names no earlier step",
        "steps: [{correct_orbit: {md: {}}}]": "set by the campaign",
        "steps: [{measure_bba: {method: sideways}}]": "method must be one of quadcenter, parallel",
        "steps: [{corect_orbit: {}}]": "'corect_orbit' is not a registered tool plan; did you mean 'correct_orbit'",
        "steps: [{measure_lifetime: {}}]": "not a registered tool plan.*optional: true",
        "steps: [{measure_orm: {}, optional: 1}]": "optional must be true or false",
        "steps: [{correct_tune: {target: [0.2, 1.3]}}]": r"target must be fractional tunes, each in \(0, 1\)",
        "steps: [{correct_tune: {}}]": "correct_tune needs target",
        "steps: [{correct_orbit: {}, success: {orbit: 1e-4}}]": "unknown success criterion 'orbit'",
        "steps: [{measure_orm: {}, correct_orbit: {}}]": "one tool per step",
        "steps: [{measure_orm: {}}, {measure_orm: {}, id: measure_orm}]": "id 'measure_orm' is used",
        "steps: [{measure_orm: {delta: 0.1, n_avg: 0}}]": r"n_avg .* must be >= 1",
    }
    for text, message in bad.items():
        with pytest.raises(SequenceError, match=message):
            load_sequence(text, HMBA)
    # a step that needs the run of a skipped step is skipped too
    s = load_sequence("steps: [{measure_lifetime: {}, optional: true}, {correct_optics: {loco: $measure_lifetime}}]",
                      HMBA)
    assert "not registered" in s.steps[0].skip and "skipped" in s.steps[1].skip


def test_default_sequences_of_the_profiles_are_valid():
    for prof in ("ebs", HMBA):
        seq = default_sequence(prof)
        tools = [s.tool for s in seq.steps]
        for t in ("thread_first_turns", "correct_trajectory", "ramp_sextupoles", "measure_orm", "correct_orbit",
                  "measure_bba", "apply_bba", "loco", "correct_optics", "correct_tune", "correct_chromaticity"):
            assert t in tools, (prof, t)
        assert seq.runnable and all(s.skip == "" for s in seq.steps if s.tool in ("measure_orm", "correct_orbit"))


def test_parse_seeds():
    assert parse_seeds("1-3,7, 9-10") == [1, 2, 3, 7, 9, 10]
    with pytest.raises(Exception, match="end before start"):
        parse_seeds("5-2")
    with pytest.raises(Exception, match="repeat"):
        parse_seeds("1-3,2")


# ---------------------------------------------------------------------------------------------- campaigns
@pytest.fixture(scope="module")
def folder(tmp_path_factory, session_catalog_dir):
    """The session's catalogue folder (its Tiled server already up, shared by the workers; the campaigns' runs are
    found by campaign uid); backups of runs Tiled could not take go to a temporary folder, never the user's."""
    root = tmp_path_factory.mktemp("campaign")
    old = os.environ.get("ACC_BLUESKY_BACKUP")
    os.environ["ACC_BLUESKY_BACKUP"] = str(root / "backup")  # before the workers start: they inherit it
    yield session_catalog_dir
    if old is None:
        os.environ.pop("ACC_BLUESKY_BACKUP", None)
    else:
        os.environ["ACC_BLUESKY_BACKUP"] = old


@pytest.fixture(scope="module")
def client(folder):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def first(client, folder):
    """Seeds 1-3 of the test sequence on the LocalCluster."""
    return run_campaign(HMBA, [1, 2, 3], SEQ, client=client, catalog=folder, progress=False)


def _same(a: dict, b: dict) -> bool:
    """Equal truth figures (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                        ((a[k], b[k]) for k in a))


def _rms(v):
    return float(np.sqrt(np.mean(np.asarray(v) ** 2)))


def test_campaign_runs_the_plans_per_seed_and_records_the_truth(first, client, folder):
    from acc_bluesky.data import find_runs, open_catalog
    from acc_bluesky.twin import Twin

    res = first
    assert res.seeds == [1, 2, 3] and res.missing == [] and sorted(res.ran) == [1, 2, 3]
    workers = {r.worker for r in res.results.values()}
    assert all(w.startswith("tcp://127.0.0.1") for w in workers)
    for s, r in res.results.items():
        assert r.status == "done" and r.reason == "", r
        # the initial truth is the seed's twin's (an independent twin of the same seed)
        x, y = Twin(HMBA, seed=s).orbit()
        assert r.initial["orbit_rms_x"] == pytest.approx(_rms(x), rel=1e-9)
        assert r.initial["orbit_rms_y"] == pytest.approx(_rms(y), rel=1e-9)
        assert r.step("measure_lifetime").status == "skipped"
        co = r.step("correct_orbit")
        # the verdict is the truth against the target: orbit reduced at least 2x and below 100 um in both planes
        after = max(co.truth["orbit_rms_x"], co.truth["orbit_rms_y"])
        assert co.status == ("ok" if after <= ORBIT_TARGET else "missed")
        assert after < 0.5 * max(r.initial["orbit_rms_x"], r.initial["orbit_rms_y"])
        assert co.truth["beam"] == 1.0 and co.truth["transmission"] == 1.0
        d = design_values(HMBA)
        assert co.truth["tune_error"] == pytest.approx(np.max(np.abs(
            np.array([co.truth["tune_x"], co.truth["tune_y"]]) - d["tunes"])), abs=1e-12)
        assert all(st.recorded for st in r.steps if st.status == "ok")
    # the workers' sampling profiler is off once they ran a seed (its stack sampling can deadlock a worker on
    # CPython < 3.12, gh-106883: seen here as a seed hanging in pyAT's tracking for minutes)
    running = client.run(lambda dask_worker: [dask_worker.periodic_callbacks[k].is_running()
                                              for k in ("profile", "profile-cycle")
                                              if k in dask_worker.periodic_callbacks])
    assert running and not any(any(v) for v in running.values()), running
    truth_rate = np.mean(np.fmax(res.figure("orbit_rms_x", "correct_orbit"),
                                 res.figure("orbit_rms_y", "correct_orbit")) <= ORBIT_TARGET)
    assert res.success_rate("correct_orbit") == truth_rate == 1.0  # measured here: 46-59 um x, 30-33 um y
    assert res.success_rate("orm") == 1.0 and math.isnan(res.success_rate("measure_lifetime"))
    assert "skipped: tool 'measure_lifetime' is not registered" in res.table()
    # every step's run is in the catalogue, its metadata naming the campaign, the seed and the step
    cat = open_catalog(catalog_dir=folder)
    runs = find_runs(cat, campaign=res.uid)
    by = {}
    for uid in list(runs):
        st = runs[uid].metadata["start"]
        by.setdefault((st["seed"], st["step"]), []).append(st["tool"])
    for s in (1, 2, 3):
        assert by[(s, "orm")] == ["orbit_response"] and by[(s, "correct_orbit")] == ["orbit_correction"]
        assert by[(s, "record")] == ["campaign_seed"]
        assert runs[res.results[s].step("correct_orbit").uid].metadata["start"]["parameters"]["n_sv"] == 8
    # read back from Tiled alone
    again = CampaignResult.from_catalog(res.uid, catalog=folder)
    assert again.seeds == [1, 2, 3]
    for s in (1, 2, 3):
        assert _same(again.results[s].step("correct_orbit").truth, res.results[s].step("correct_orbit").truth)


def test_summary_figures(first, tmp_path):
    paths = first.plot(tmp_path)
    names = {p.name.split("_", 2)[-1] for p in paths}
    assert {"orbit_rms.png", "beta_beat.png", "transmission.png"} <= names
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_a_killed_worker_is_retried_and_the_results_are_unchanged(first, client, folder):
    """The worker of the first seed to start is killed (SIGKILL) during its first step: the scheduler runs the
    seed again (the nanny starts a new worker), the other seed completes, both give the first campaign's results."""
    killed: list[int] = []

    def on_event(msg):
        if msg["event"] == "step" and not killed:
            killed.append(msg["seed"])
            os.kill(int(msg["pid"]), signal.SIGKILL)  # a worker process of this test's cluster

    res = run_campaign(HMBA, [1, 2], SEQ, client=client, catalog=folder, progress=False, on_event=on_event)
    assert killed and res.missing == []
    victim = res.results[killed[0]]
    assert victim.status == "done" and victim.attempts >= 2, victim
    for s in (1, 2):
        assert _same(res.results[s].step("correct_orbit").truth, first.results[s].step("correct_orbit").truth)
    client.wait_for_workers(2, timeout=120)


def test_resume_runs_only_the_missing_seeds(client, folder):
    """Interrupted (as by Ctrl-C) once the first seeds started: the seed not started is left; resume runs it only."""
    stop = threading.Event()

    def on_event(msg):
        if msg["event"] == "step":
            stop.set()

    part = run_campaign(HMBA, [1, 2, 3], SEQ, client=client, catalog=folder, progress=False, on_event=on_event,
                        stop=stop)
    assert part.missing and set(part.missing) | set(part.ran) == {1, 2, 3}
    done_before = {s for s in (1, 2, 3) if s not in part.missing}
    from acc_bluesky.data import find_runs, open_catalog

    def records() -> list[tuple[int, str]]:
        runs = find_runs(open_catalog(catalog_dir=folder), tool="campaign_seed", campaign=part.uid)
        return sorted((runs[u].metadata["start"]["seed"], u) for u in list(runs))

    before = records()
    # a seed may hold two records of the first call (Dask ran it again after its worker stopped answering the
    # scheduler's heartbeats: both attempts complete); each seed done before holds at least one
    assert done_before and done_before <= {s for s, _ in before}
    rest = run_campaign(resume=part.uid, client=client, catalog=folder, progress=False)
    assert sorted(rest.ran) == sorted(part.missing) and rest.missing == []
    new = [s for s, u in records() if (s, u) not in before]
    assert new == sorted(part.missing)  # the resume recorded the missing seeds only: nothing done was run again
    assert all(rest.results[s].status == "done" for s in (1, 2, 3))


def test_the_same_campaign_on_a_dask_scheduler_and_worker_processes(first, folder, tmp_path):
    """`dask scheduler` + `dask worker` started here on loopback: the same per-seed results as the LocalCluster."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    exe = Path(sys.executable).parent
    scheduler = subprocess.Popen([str(exe / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(sched_file)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    worker = None
    try:
        worker = subprocess.Popen([str(exe / "dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads",
                                   "1", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        with Client(scheduler_file=str(sched_file), timeout=60) as c:
            c.wait_for_workers(1, timeout=120)
            address = c.scheduler.address
        res = run_campaign(HMBA, [2, 3], SEQ, address=address, catalog=folder, progress=False)
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.terminate()
        for proc in (worker, scheduler):
            if proc is not None:
                proc.wait(60)
    assert res.missing == []
    for s in (2, 3):
        r, ref = res.results[s], first.results[s]
        assert r.worker != ref.worker
        assert [st.status for st in r.steps] == [st.status for st in ref.steps]
        for a, b in zip(r.steps, ref.steps):
            assert _same(a.truth, b.truth), (s, a.id)  # bit-identical: seeded twin, same plans


def test_truth_measures_the_orbit_from_the_quadrupole_centres():
    """centre_rms: the closed orbit's distance from the quadrupoles' magnetic centres (BBA's figure of merit),
    zero on the ideal ring, the misaligned quadrupoles' rms on an errored one (not the BPM-frame orbit)."""
    from acc_bluesky.analysis.bba import bba_model, true_orbit_at_quads
    from acc_bluesky.commissioning.truth import truth
    from acc_bluesky.twin import Twin

    ideal = truth(Twin(HMBA, seed=None))
    assert ideal["centre_rms_x"] < 1e-12 and ideal["centre_rms_y"] < 1e-12
    tw = Twin(HMBA, seed=2)
    t = truth(tw)
    c = true_orbit_at_quads(tw, [q.name for q in bba_model(tw.profile).quads if q.in_service])
    assert t["centre_rms_x"] == pytest.approx(_rms(c[:, 0]), rel=1e-5)  # the orbit solved again: 5e-7 apart
    assert t["centre_rms_y"] == pytest.approx(_rms(c[:, 1]), rel=1e-5)
    assert t["centre_rms_x"] > 1e-6 and t["centre_rms_x"] != pytest.approx(t["orbit_rms_x"], rel=1e-3)
    seq = load_sequence("steps: [{correct_orbit: {}, success: {centre_rms: 50e-6}}]", HMBA)
    assert seq.steps[0].success == {"centre_rms": 50e-6}
