"""The catalogue writer process: runs written by a child process, reads that wait for it, failures that lose nothing.

Everything is real: the writer is the real child process, the catalogues real embedded Tiled catalogues. Failures are
made real too: the child is killed with SIGKILL, Tiled's data folder is replaced by a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from data_fixtures import N_BPM, _isolated_data_env, machine, make_bpm_device  # noqa: F401 - fixtures

from acc_bluesky.data import (
    close_catalog,
    make_run_engine,
    open_catalog,
    read_results,
    read_stream,
    tool_metadata,
)
from acc_bluesky.data.backup import replay_backup
from acc_bluesky.data.writer import WriterProcessRecorder, writer_process


def _scan(machine, bpm, n, orm=None, on_event=None):
    @bpp.run_decorator(md=tool_metadata("orbit_response", machine, n_steps=n))
    def inner():
        for i in range(n):
            yield from bps.mv(bpm.x, np.linspace(-1e-4, 1e-4, N_BPM) * (i + 1), bpm.current, 0.2 + 0.001 * i)
            yield from bps.trigger_and_read([bpm])
            if on_event is not None:
                on_event(i)
        if orm is not None:
            from acc_bluesky.plan_stubs.results import store_result

            yield from store_result({"orm": orm}, units={"orm": "m/rad"})

    return (yield from inner())


def _rows(docs: list[dict]) -> int:
    return sum(len(d["doc"]["seq_num"]) if d["name"] == "event_page" else d["name"] == "event" for d in docs)


@pytest.fixture
def recorder_run_engine(tmp_path):
    RE = make_run_engine(catalog_dir=tmp_path / "catalog", backup_dir=tmp_path / "backup", progress=False)  # noqa: N806
    assert isinstance(RE.tiled_recorder, WriterProcessRecorder) and not RE.tiled_recorder.in_process
    yield RE
    close_catalog()


def test_run_complete_for_readers_of_this_process_right_after_the_run(recorder_run_engine, machine, tmp_path):
    RE = recorder_run_engine  # noqa: N806
    bpm = make_bpm_device()
    orm = np.random.default_rng(3).normal(size=(2 * N_BPM, 96))
    n = 60
    uid = RE(_scan(machine, bpm, n, orm))
    run = open_catalog(catalog_dir=tmp_path / "catalog")[uid]  # no explicit wait: reads wait for the writer
    assert run.metadata["stop"]["exit_status"] == "success"
    assert np.asarray(run["primary"]["seq_num"].read()).tolist() == list(range(1, n + 1))
    x = read_stream(run)["bpm-x"]
    assert x.shape == (n, N_BPM) and np.array_equal(x[-1], np.linspace(-1e-4, 1e-4, N_BPM) * n)
    assert np.array_equal(read_results(run)["orm"], orm)  # bit for bit through the pipe and Tiled
    # the same process and the same child serve every catalogue folder
    other = make_run_engine(catalog_dir=tmp_path / "other", backup_dir=tmp_path / "backup", progress=False)
    assert other.tiled_recorder.process is RE.tiled_recorder.process
    uid2 = other(_scan(machine, bpm, 3))
    assert uid2 in open_catalog(catalog_dir=tmp_path / "other") and uid2 not in RE.catalog


def test_another_process_sees_the_run_after_wait_for_catalog(recorder_run_engine, machine, tmp_path):
    RE = recorder_run_engine  # noqa: N806
    uid = RE(_scan(machine, make_bpm_device(), 20))
    RE.wait_for_catalog()
    code = textwrap.dedent(f"""
        import numpy as np
        from acc_bluesky.data import open_catalog
        run = open_catalog(catalog_dir={str(tmp_path / "catalog")!r})[{uid!r}]
        print(run.metadata["stop"]["exit_status"], len(np.asarray(run["primary"]["seq_num"].read())))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["success", "20"]
    RE.wait_written = True  # (the queue server's worker): RE(plan) returns with the run written
    RE(_scan(machine, make_bpm_device(), 5))
    assert not RE.tiled_recorder.process.pending(RE.tiled_recorder.directory)


def test_writer_killed_mid_run_backs_up_the_run_then_writes_in_process(recorder_run_engine, machine, tmp_path):
    RE = recorder_run_engine  # noqa: N806
    recorder = RE.tiled_recorder
    child = recorder.process
    bpm = make_bpm_device()
    first = RE(_scan(machine, bpm, 4))  # a run written before the crash stays in the catalogue
    RE.wait_for_catalog()
    n, kill_at = 12, 6
    orm = np.random.default_rng(4).normal(size=(2 * N_BPM, 10))

    def on_event(i):
        if i == kill_at:
            child._proc.kill()
            child._proc.wait()

    with pytest.warns(RuntimeWarning, match="backed up"):
        uid = RE(_scan(machine, bpm, n, orm, on_event))
    assert uid.exit_status == "success"  # the plan itself went on
    assert recorder.in_process and recorder.process is None
    backup = tmp_path / "backup"
    files = list(backup.glob("*.jsonl"))
    assert [f.stem for f in files] == [uid]
    docs = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert docs[0]["name"] == "start" and docs[-1]["name"] == "stop"
    assert _rows(docs) == n + 1  # primary + results: none lost

    # later runs are written in this process, and the backed-up run replays exactly once
    later = RE(_scan(machine, bpm, 2))
    cat = open_catalog(catalog_dir=tmp_path / "catalog")
    assert cat[later].metadata["stop"]["exit_status"] == "success"
    assert cat[first].metadata["stop"]["exit_status"] == "success"
    report = replay_backup(backup, cat)
    assert uid in report.written
    run = open_catalog(catalog_dir=tmp_path / "catalog")[uid]
    assert np.asarray(run["primary"]["seq_num"].read()).tolist() == list(range(1, n + 1))
    assert np.array_equal(read_results(run)["orm"], orm)
    # a new RunEngine starts a new writer process
    fresh = make_run_engine(catalog_dir=tmp_path / "catalog", backup_dir=backup, progress=False)
    assert fresh.tiled_recorder.process is not None and fresh.tiled_recorder.process is not child
    assert fresh.tiled_recorder.process is writer_process(start=False)
    uid3 = fresh(_scan(machine, bpm, 2))
    assert open_catalog(catalog_dir=tmp_path / "catalog")[uid3].metadata["stop"]["exit_status"] == "success"


def test_tiled_refusing_a_run_in_the_writer_is_backed_up_with_a_warning(recorder_run_engine, machine, tmp_path):
    RE = recorder_run_engine  # noqa: N806
    bpm = make_bpm_device()
    RE(_scan(machine, bpm, 2))
    RE.wait_for_catalog()
    data = tmp_path / "catalog" / "data"
    shutil.rmtree(data)
    data.write_text("not a folder: every array write fails")  # even as root
    try:
        with pytest.warns(RuntimeWarning, match="backed up"):
            uid = RE(_scan(machine, bpm, 5))
            RE.wait_for_catalog()  # the warning comes with the run's report
    finally:
        data.unlink()
        data.mkdir()
    files = list((tmp_path / "backup").glob("*.jsonl"))
    assert [f.stem for f in files] == [uid]
    docs = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [d["name"] for d in docs][0] == "start" and docs[-1]["name"] == "stop"
    assert _rows(docs) == 5
    # the writer process goes on with the next run
    assert not RE.tiled_recorder.in_process
    uid2 = RE(_scan(machine, bpm, 3))
    assert RE.catalog[uid2].metadata["stop"]["exit_status"] == "success"


def test_close_catalog_writes_what_is_pending_and_the_run_engine_goes_on(recorder_run_engine, machine, tmp_path):
    RE = recorder_run_engine  # noqa: N806
    bpm = make_bpm_device()
    uid = RE(_scan(machine, bpm, 30))
    close_catalog(tmp_path / "catalog")  # no wait before: the pending run is written first
    cat = open_catalog(catalog_dir=tmp_path / "catalog")
    assert len(np.asarray(cat[uid]["primary"]["seq_num"].read())) == 30
    uid2 = RE(_scan(machine, bpm, 2))  # the writer opens the folder again
    assert open_catalog(catalog_dir=tmp_path / "catalog")[uid2].metadata["stop"]["exit_status"] == "success"


def test_writer_inline_and_bad_choice(tmp_path, machine):
    RE = make_run_engine(catalog_dir=tmp_path / "c", backup_dir=tmp_path / "b", progress=False,  # noqa: N806
                         writer="inline")
    assert not isinstance(RE.tiled_recorder, WriterProcessRecorder)
    uid = RE(_scan(machine, make_bpm_device(), 2))
    assert RE.catalog[uid].metadata["stop"]["exit_status"] == "success"
    with pytest.raises(ValueError, match="'process' or 'inline'"):
        make_run_engine(catalog_dir=tmp_path / "c", progress=False, writer="thread")
    with pytest.raises(ValueError, match="embedded catalogues only"):
        make_run_engine(tiled="http://127.0.0.1:1", progress=False, writer="process", offline_ok=True)
    close_catalog()


def test_run_engine_keeps_full_collections_off_the_session_heap_during_plans(tmp_path, machine):
    import gc

    RE = make_run_engine(catalog_dir=tmp_path / "c", backup_dir=tmp_path / "b", progress=False)  # noqa: N806
    seen = []
    bpm = make_bpm_device()

    def plan():
        seen.append(gc.get_freeze_count())
        yield from _scan(machine, bpm, 1)

    assert gc.get_freeze_count() == 0
    RE(plan())
    assert seen[0] > 10_000 and gc.get_freeze_count() == 0  # the heap was frozen during the plan only
    RE.freeze_gc = False
    seen.clear()
    RE(plan())
    assert seen == [0]
    close_catalog()
