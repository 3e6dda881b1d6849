"""The local server of a catalogue folder, with real processes: shared by sessions, nothing lost when a session or the
server is killed (kill -9), many sessions at once, a plan asking its RunEngine for the catalogue, FAIR by default from
a plain script. One catalogue folder (so one server) for the module where the test allows.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import signal
import stat
import sys
import threading
import zlib

import bluesky.plans as bp
import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures
    _isolated_data_env,
    machine,
    make_bpm_device,
    module_catalog_dir,
    run_script,
    start_script,
)

from acc_bluesky.data import (
    close_catalog,
    find_runs,
    local,
    make_run_engine,
    open_catalog,
    read_stream,
    recover_catalog,
    tool_metadata,
)
from acc_bluesky.data.wal import RECOVERY_REASON
from acc_bluesky.profile import load_profile

#: The small ring (one HMBA cell: 10 BPMs, 6 + 6 correctors): a session connects in ~1 s instead of EBS's ~5 s, and
#: what is tested here is the catalogue (processes, kills, concurrency), not the size of an orbit.
HMBA = str(pathlib.Path(__file__).parent / "profiles" / "hmba" / "profile.yaml")

#: A session measuring ORMs (every corrector + RF on the small ring) that prints each event's seq_num and orbit
#: checksum.
ORM_SESSION = """
import sys, zlib
import numpy as np
from acc_bluesky.machine import connect
from acc_bluesky.data import make_run_engine
from acc_bluesky.plans import measure_orm
folder, n_runs, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
per_plane = int(sys.argv[4]) if len(sys.argv) > 4 else 40
m = connect(profile, mode="sim", seed=1)
names = [n for fams in (m.hcors, m.vcors) for f in sorted(fams)[:1]
         for n in m.profile.families[f].device_names[:per_plane]]
RE = make_run_engine(catalog_dir=folder, progress=False)
def report(name, doc):
    if name == "start":
        print("start", doc["uid"], flush=True)
    elif name == "event":
        x = next((v for k, v in sorted(doc["data"].items()) if np.ndim(v)), None)  # the first array (an orbit)
        if x is not None:  # (the small ring's results are packed in one string: no array)
            print("event", doc["seq_num"], zlib.crc32(np.ascontiguousarray(x, dtype=float).tobytes()), flush=True)
RE.subscribe(report)
for _ in range(n_runs):
    print("done", RE(measure_orm(m, correctors=names, rf=True)), flush=True)
"""


def _events_until(proc, k: int) -> tuple[str, dict[int, int]]:
    """Read a session's lines until its k-th event: (run uid, {seq_num: checksum})."""
    uid, seen = "", {}
    for line in proc.stdout:
        word, *rest = line.split()
        if word == "start":
            uid = rest[0]
        elif word == "event":
            seen[int(rest[0])] = int(rest[1])
            if len(seen) >= k:
                return uid, seen
    raise AssertionError(f"the session ended before event {k}: {proc.stderr.read()[-3000:]}")


def _checksums(run) -> dict[int, int]:
    data = read_stream(run)
    key = next(k for k, v in sorted(data.items()) if k != "time" and v.ndim == 2)
    return {i + 1: zlib.crc32(np.ascontiguousarray(row, dtype=float).tobytes()) for i, row in enumerate(data[key])}


def test_one_server_per_folder_shared_by_processes_key_private(module_catalog_dir, machine):
    RE = make_run_engine(catalog_dir=module_catalog_dir, progress=False)  # noqa: N806
    files = local.server_files(module_catalog_dir)
    address = json.loads(files["json"].read_text())
    assert address["uri"].startswith("http://127.0.0.1:") and local.server_alive(module_catalog_dir)
    assert stat.S_IMODE(files["key"].stat().st_mode) == 0o600
    uid = RE(bp.count([make_bpm_device()], 3, md=tool_metadata("test", machine)))
    # another process: the same server (no second one), the run complete at once
    out = run_script(
        "import sys, json; from acc_bluesky.data import open_catalog, local; cat = open_catalog(sys.argv[1]); "
        "print(json.dumps([local.attach(sys.argv[1]).pid, cat[sys.argv[2]].metadata['stop']['exit_status']]))",
        str(module_catalog_dir), uid)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [address["pid"], "success"]
    # anonymous requests and a wrong key are refused
    import httpx

    assert httpx.get(f"{address['uri']}/api/v1/search/", trust_env=False).status_code == 401


def test_session_killed_at_a_random_event_then_recovered(module_catalog_dir):
    k = int(np.random.default_rng(zlib.crc32(b"kill-session")).integers(5, 75))
    proc = start_script(ORM_SESSION, str(module_catalog_dir), "1", "ebs")  # EBS: 8 s a run, the kill lands in it
    try:
        uid, seen = _events_until(proc, k)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    wal = module_catalog_dir / "wal" / f"{uid}.jsonl"
    assert wal.exists()  # the killed session's log, no longer held by anyone
    out = run_script("from acc_bluesky.cli import main; raise SystemExit(main())", "catalog", "recover", "--dir",
                     str(module_catalog_dir))
    assert out.returncode == 0, out.stderr
    assert "1 run(s) completed" in out.stdout and f"closed {uid}" in out.stdout
    run = open_catalog(module_catalog_dir)[uid]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail" and stop["reason"] == RECOVERY_REASON
    back = _checksums(run)
    assert len(back) >= k and list(back) == list(range(1, len(back) + 1))  # every event before the kill, in order
    assert all(back[s] == c for s, c in seen.items())  # bit for bit
    assert stop["num_events"]["primary"] == len(back)
    assert not wal.exists()
    again = recover_catalog(module_catalog_dir)
    assert again.completed == [] and again.closed == [] and not again.failed  # idempotent: nothing left


def test_server_killed_mid_run_the_run_completes(module_catalog_dir, machine):
    """kill -9 of the server at a random event: the session starts it again and writes the whole run."""
    RE = make_run_engine(catalog_dir=module_catalog_dir, progress=False, batch_size=5)  # noqa: N806
    bpm = make_bpm_device()
    k = int(np.random.default_rng(zlib.crc32(b"kill-server")).integers(8, 30))
    pid_before = local.attach(module_catalog_dir).pid

    def kill_at_k(name, doc):
        if name == "event" and doc["seq_num"] == k:
            RE.wait_for_catalog()  # some events are in the server when it dies
            os.kill(local.attach(module_catalog_dir).pid, signal.SIGKILL)

    token = RE.subscribe(kill_at_k)
    uid = RE(bp.count([bpm], 40, md=tool_metadata("test", machine)))
    RE.unsubscribe(token)
    run = open_catalog(module_catalog_dir)[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert read_stream(run)["bpm-x"].shape[0] == 40
    assert np.asarray(run["primary"].base["internal"].read()["seq_num"]).tolist() == list(range(1, 41))
    assert local.attach(module_catalog_dir).pid != pid_before
    assert not list(RE.backup_dir.glob("*.jsonl")) if RE.backup_dir.exists() else True  # no backup needed
    assert not list((module_catalog_dir / "wal").glob("*.jsonl"))


def test_four_sessions_four_orms_each_and_a_reader(module_catalog_dir):
    reader = start_script(  # reads every run that completes, checking it is whole
        "import sys, time\n"
        "from acc_bluesky.data import open_catalog, read_stream\n"
        "cat, whole, other, t0 = open_catalog(sys.argv[1]), set(), set(), time.time()\n"
        "for _ in range(600):\n"
        "    for uid in list(cat):\n"
        "        if uid in whole or uid in other:\n"
        "            continue  # (a reader that does not ask the server again for what it has seen)\n"
        "        run = cat[uid]\n"
        "        stop = run.metadata.get('stop')\n"
        "        start = run.metadata['start']\n"
        "        if start['time'] <= t0 or start['tool'] != 'orbit_response':\n"
        "            other.add(uid)\n"
        "        elif stop:\n"
        "            n = len(read_stream(run)['time'])\n"
        "            assert n == stop['num_events']['primary'] == 12, (uid, n, stop)\n"
        "            whole.add(uid)\n"
        "    if len(whole) >= 16: break\n"
        "    time.sleep(0.5)  # (pacing the polls of a reader, not a synchronisation)\n"
        "print('whole', len(whole), flush=True)\n", str(module_catalog_dir))
    # 4 sessions x 4 ORMs of 6 + 6 correctors + RF on the small ring at once (the EBS 80-corrector version of the
    # acceptance: 16/16 complete too, 0 backups; it costs a minute of the suite's two cores, the concurrency is the
    # same, the small ring's runs even come faster)
    sessions = [start_script(ORM_SESSION, str(module_catalog_dir), "4", HMBA, "6") for _ in range(4)]
    done = []
    try:
        for proc in sessions:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            done += [line.split()[1] for line in out.splitlines() if line.startswith("done")]
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0 and out.split() == ["whole", "16"], err[-3000:]
    finally:
        for proc in [*sessions, reader]:
            if proc.poll() is None:
                proc.kill()
    assert len(done) == 16 and len(set(done)) == 16
    cat = open_catalog(module_catalog_dir)
    for uid in done:
        run = cat[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert len(read_stream(run)["time"]) == 12
        assert "rf" in run and "results" in run
    assert not list((module_catalog_dir / "wal").glob("*.jsonl"))
    assert not list((module_catalog_dir.parent / "default-backup").glob("*.jsonl"))  # 0 backups


def test_plain_script_fair_by_default_and_a_plan_reads_its_run_engines_catalogue(module_catalog_dir, machine):
    RE = make_run_engine(catalog_dir=module_catalog_dir, progress=False)  # noqa: N806
    uid = RE(bp.count([make_bpm_device()], 2, md=tool_metadata("earlier", machine)))
    script = """
import sys, json
import bluesky.plans as bp
from bluesky.utils import Msg
import acc_bluesky as ab
from acc_bluesky.data import make_run_engine, register_machine, registered_machines
RE = make_run_engine(catalog_dir=sys.argv[1], progress=False)
m = ab.connect(sys.argv[3], mode="sim", seed=3)
if m not in registered_machines():  # (until connect() registers the machine itself)
    register_machine(m)
uid = RE(bp.count([m.bpm]))
start = RE.catalog[uid].metadata["start"]
def resolve(uid):
    cat = yield Msg("acc_catalog")
    return cat[uid].metadata["start"]["tool"]
print(json.dumps({"start": start, "earlier": RE(resolve(sys.argv[2])).plan_result}))
"""
    out = run_script(script, str(module_catalog_dir), uid, HMBA)  # (the small ring: what is tested is the metadata)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    start = got["start"]
    assert start["tool"] == "count" and start["plan_name"] == "count"
    assert start["facility"] == "ESRF" and start["accelerator"] == "HMBA cell (test ring)"
    assert start["profile"]["name"] == load_profile(HMBA).name
    assert start["profile"]["sha256"] and start["lattice"]["sha256"] and start["mode"] == "sim"
    assert start["seed"] == 3 and start["operator"] and start["license"] and start["software"]["bluesky"]
    assert got["earlier"] == "earlier"  # a uid recorded from another process, resolved through Msg("acc_catalog")
    assert RE.catalog[uid].metadata["start"]["tool"] == "earlier"
    assert list(find_runs(RE.catalog, tool="count", seed=3))


def test_server_stops_when_idle(tmp_path, monkeypatch):
    """(Started again on demand: see the server-kill test.)"""
    monkeypatch.setenv("ACC_BLUESKY_SERVER_IDLE", "0.5")
    folder = tmp_path / "idle"
    assert list(open_catalog(folder)) == []
    files = local.server_files(folder)
    assert local.server_alive(folder)
    local.detach(folder)  # nobody uses it now: it stops by itself
    assert local._wait_dead(files, 30)  # noqa: SLF001 - (waits on the server's lock, no polling)
    assert not files["json"].exists() and not local.server_alive(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not installed on Windows")
def test_local_server_runs_on_uvloop(module_catalog_dir):
    """The folder's server runs its event loop on uvloop (uvicorn's choice when it is installed, as our
    dependencies make it): 2-4x shorter write requests than asyncio's loop when the machine is busy. (The module's
    server: a server of its own would cost a start.)"""
    open_catalog(module_catalog_dir)  # (started on demand if this test runs alone)
    pid = int(json.loads(local.server_files(module_catalog_dir)["json"].read_text())["pid"])
    with open(f"/proc/{pid}/maps") as maps:
        assert "uvloop" in maps.read(), "the catalogue server does not run on uvloop"


def test_server_stops_when_its_folder_is_deleted(tmp_path, monkeypatch):
    """A temporary catalogue folder removed while its server lives (nobody can find that server any more): the
    server stops once idle instead of living on."""
    import shutil

    monkeypatch.setenv("ACC_BLUESKY_SERVER_IDLE", "0.5")
    folder = tmp_path / "gone"
    assert list(open_catalog(folder)) == []
    files = local.server_files(folder)
    local.detach(folder)
    alive = os.open(files["alive"], os.O_RDONLY)  # the server's own lock, kept open across the deletion
    shutil.rmtree(folder)
    ended = threading.Event()

    def wait() -> None:
        fcntl.flock(alive, fcntl.LOCK_SH)  # granted once the server process has ended
        ended.set()

    threading.Thread(target=wait, daemon=True).start()
    assert ended.wait(30), "the server of a deleted catalogue folder did not stop"
    os.close(alive)


@pytest.fixture(autouse=True, scope="module")
def _stop_servers(session_catalog_dir):
    """Every server this module started is stopped at its end; the session's catalogue server (other modules' on
    this worker) is left running."""
    yield
    keep = local.server_files(session_catalog_dir)["root"]
    for root in local.attached():
        if root != keep:
            close_catalog(root)
