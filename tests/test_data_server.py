"""A real Tiled server (``acc-bluesky catalog serve``) on loopback: keys, anonymous refusal, backup/replay."""

from __future__ import annotations

import json
import secrets
import time

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import httpx
import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures
    TiledServer,
    _isolated_data_env,
    free_port,
    machine,
    make_bpm_device,
    no_tiled_retries,
    tiled_server,
)

from acc_bluesky.cli.catalog import main as catalog_main
from acc_bluesky.data import (
    CatalogUnavailableError,
    make_run_engine,
    open_catalog,
    read_results,
    read_stream,
    replay_backup,
    tool_metadata,
)
from acc_bluesky.plan_stubs.results import store_result

RNG = np.random.default_rng(7)


def _plan(machine, bpm, n_events, orm, on_event=None):
    @bpp.run_decorator(md=tool_metadata("orbit_response", machine, n_events=n_events))
    def inner():
        for i in range(n_events):
            if on_event is not None:
                on_event(i)
            yield from bps.mv(bpm.current, 0.2 + 0.001 * i)
            yield from bps.trigger_and_read([bpm])
        yield from store_result({"orm": orm, "tunes": np.array([0.16, 0.34])}, units={"orm": "m/rad"},
                                descriptions={"orm": "orbit response"})

    return (yield from inner())


def test_server_round_trip_and_anonymous_refused(tiled_server, machine, tmp_path):
    RE = make_run_engine(tiled=tiled_server.uri, api_key=tiled_server.api_key, backup_dir=tmp_path / "bk",
                         progress=False)
    bpm = make_bpm_device()
    orm = RNG.normal(size=(224, 448))
    uid = RE(_plan(machine, bpm, 4, orm))
    assert RE.catalog is not None

    cat = open_catalog(tiled_server.uri, api_key=tiled_server.api_key)
    run = cat[uid]
    assert np.array_equal(read_results(run)["orm"], orm)
    assert read_stream(run)["bpm-x"].shape == (4, 224)
    assert not list((tmp_path / "bk").glob("*.jsonl"))  # nothing needed the backup

    # Anonymous: refused for reading and for writing, by the server itself.
    assert httpx.get(f"{tiled_server.uri}/api/v1/search/", trust_env=False).status_code == 401
    created = httpx.post(f"{tiled_server.uri}/api/v1/metadata/", trust_env=False,
                         json={"structure_family": "container", "metadata": {}, "specs": [], "data_sources": []})
    assert created.status_code == 401
    with pytest.raises(CatalogUnavailableError, match="requires an API key|refused"):
        open_catalog(tiled_server.uri, api_key=None)
    with pytest.raises(CatalogUnavailableError, match=f"{tiled_server.uri}.*refused"):
        make_run_engine(tiled=tiled_server.uri, api_key="wrongkey", progress=False)


def test_read_only_key_reads_but_cannot_write(tmp_path, machine):
    reader = secrets.token_hex(16)
    server = TiledServer(tmp_path / "team-catalog", read_only_key=reader).start()
    try:
        assert (tmp_path / "team-catalog" / "tiled-server.yml").exists()
        RE = make_run_engine(tiled=server.uri, api_key=server.api_key, backup_dir=tmp_path / "bk", progress=False)
        bpm = make_bpm_device()
        orm = RNG.normal(size=(224, 448))
        uid = RE(_plan(machine, bpm, 2, orm))

        cat = open_catalog(server.uri, api_key=reader)
        assert np.array_equal(read_results(cat[uid])["orm"], orm)
        denied = httpx.post(f"{server.uri}/api/v1/metadata/", headers={"Authorization": f"Apikey {reader}"},
                            json={"structure_family": "container", "metadata": {}, "specs": [],
                                  "data_sources": []}, trust_env=False)
        assert denied.status_code in (401, 403)
        assert "scopes" in denied.text
        assert httpx.get(f"{server.uri}/api/v1/search/", trust_env=False).status_code == 401
    finally:
        server.stop()


def test_server_killed_mid_run_then_replay_exactly_once(tmp_path, machine, no_tiled_retries):
    folder, backup = tmp_path / "catalog", tmp_path / "backup"
    server = TiledServer(folder).launch()
    # The server that comes back after the crash: a new process on the same catalogue folder. Launched now,
    # in parallel, only to keep the test short; it is first used after the crash.
    revived = TiledServer(folder, api_key=server.api_key).launch()
    server.wait_ready()
    try:
        RE = make_run_engine(tiled=server.uri, api_key=server.api_key, backup_dir=backup, progress=False,
                             batch_size=1)  # events written as they come: the server holds a partial run
        bpm = make_bpm_device()
        orm = RNG.normal(size=(224, 448))
        n_events, kill_at = 8, 5

        def on_event(i):
            if i == kill_at:
                server.kill()

        with pytest.warns(RuntimeWarning, match="backed up"):
            uid = RE(_plan(machine, bpm, n_events, orm, on_event))
        assert uid.exit_status == "success"  # the run itself went on

        files = list(backup.glob("*.jsonl"))
        assert [f.stem for f in files] == [uid]
        docs = [json.loads(line) for line in files[0].read_text().splitlines()]
        assert docs[0]["name"] == "start" and docs[-1]["name"] == "stop"
        rows = sum(len(d["doc"]["seq_num"]) if d["name"] == "event_page" else d["name"] == "event" for d in docs)
        assert rows == n_events + 1  # primary + results, none lost

        revived.wait_ready()
        cat = open_catalog(revived.uri, api_key=revived.api_key)
        partial = cat[uid]  # written before the crash, without stop document
        assert not partial.metadata.get("stop")
        assert 0 < len(np.asarray(partial["primary"]["seq_num"].read())) < n_events

        rc = catalog_main(["catalog", "replay", str(backup), "--tiled", revived.uri, "--api-key", revived.api_key])
        assert rc == 0
        run = open_catalog(revived.uri, api_key=revived.api_key)[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        seq = np.asarray(run["primary"]["seq_num"].read())
        assert seq.tolist() == list(range(1, n_events + 1))  # every event, exactly once
        currents = read_stream(run)["bpm-current"]
        assert np.allclose(currents, 0.2 + 0.001 * np.arange(n_events))
        assert np.array_equal(read_results(run)["orm"], orm)  # float64 bit for bit through JSON
        assert read_results(run)["tunes"].tolist() == [0.16, 0.34]
        assert not list(backup.glob("*.jsonl")) and (backup / "replayed" / f"{uid}.jsonl").exists()

        # Replaying again (e.g. the file copied back) must not duplicate anything.
        (backup / "replayed" / f"{uid}.jsonl").rename(backup / f"{uid}.jsonl")
        report = replay_backup(backup, open_catalog(revived.uri, api_key=revived.api_key))
        assert report.skipped_complete == [uid] and not report.written
        assert np.asarray(run["primary"]["seq_num"].read()).tolist() == list(range(1, n_events + 1))
    finally:
        server.stop()
        revived.stop()


def test_unreachable_server_error_then_offline_backup(tmp_path, machine):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(CatalogUnavailableError) as err:
        make_run_engine(tiled=uri, api_key="abc", progress=False)
    assert uri in str(err.value) and "offline_ok=True" in str(err.value) and "catalog replay" in str(err.value)

    server = TiledServer(tmp_path / "catalog", port=port)
    backup = tmp_path / "backup"
    RE = make_run_engine(tiled=uri, api_key=server.api_key, backup_dir=backup, progress=False, offline_ok=True)
    assert RE.catalog is None
    bpm = make_bpm_device()
    orm = RNG.normal(size=(224, 448))
    with pytest.warns(RuntimeWarning, match="backed up"):
        uid1 = RE(_plan(machine, bpm, 3, orm))
    assert (backup / f"{uid1}.jsonl").exists()
    server.start()
    try:
        uid2 = RE(_plan(machine, bpm, 2, orm))  # the RunEngine reconnects at the next run
        assert RE.catalog is not None
        report = replay_backup(backup, open_catalog(uri, api_key=server.api_key))
        assert report.written == [uid1] and report.ok
        cat = open_catalog(uri, api_key=server.api_key)
        assert sorted(cat) == sorted([uid1, uid2])
        assert np.asarray(cat[uid1]["primary"]["seq_num"].read()).tolist() == [1, 2, 3]
        assert np.array_equal(read_results(cat[uid1])["orm"], orm)

        server.stop()  # gone between two runs: the next run is backed up at once, without Tiled's 45 s of retries
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="backed up"):
            uid3 = RE(_plan(machine, bpm, 2, orm))
        assert time.monotonic() - t0 < 10 and (backup / f"{uid3}.jsonl").exists()
    finally:
        server.stop()
