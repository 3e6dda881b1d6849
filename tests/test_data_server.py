"""A team Tiled server (``acc-bluesky catalog serve``) on loopback: keys checked up front, anonymous refusal, the
offline backup and its replay, and the same round trip on a real PostgreSQL server the test starts."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import httpx
import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures
    TiledServer,
    _isolated_data_env,
    fake_machine,
    free_port,
    machine,
    make_bpm_device,
)

from acc_bluesky.cli.catalog import main as catalog_main
from acc_bluesky.data import (
    CatalogPermissionError,
    CatalogUnavailableError,
    find_runs,
    make_run_engine,
    open_catalog,
    read_results,
    read_stream,
    replay_backup,
    tool_metadata,
)
from acc_bluesky.plan_stubs.results import store_result

RNG = np.random.default_rng(7)


def _plan(machine, bpm, n_events, orm):
    @bpp.run_decorator(md=tool_metadata("orbit_response", machine, n_events=n_events))
    def inner():
        for i in range(n_events):
            yield from bps.mv(bpm.current, 0.2 + 0.001 * i)
            yield from bps.trigger_and_read([bpm])
        yield from store_result({"orm": orm, "tunes": np.array([0.16, 0.34])}, units={"orm": "m/rad"},
                                descriptions={"orm": "orbit response"})

    return (yield from inner())


def test_team_server_writer_and_read_only_keys_checked_up_front(tmp_path, machine):
    reader = secrets.token_hex(16)
    server = TiledServer(tmp_path / "team-catalog", read_only_key=reader).start()
    try:
        with pytest.raises(CatalogPermissionError) as err:  # a read-only key cannot record: said at once
            make_run_engine(tiled=server.uri, api_key=reader, backup_dir=tmp_path / "bk", progress=False)
        assert server.uri in str(err.value) and "create:node" in str(err.value) and "read-only" in str(err.value)
        assert "create:node" in err.value.missing
        with pytest.raises(CatalogUnavailableError, match=f"{server.uri}.*refused"):
            make_run_engine(tiled=server.uri, api_key=secrets.token_hex(16), progress=False)

        RE = make_run_engine(tiled=server.uri, api_key=server.api_key, backup_dir=tmp_path / "bk", progress=False)  # noqa: N806
        orm = RNG.normal(size=(224, 448))
        uid = RE(_plan(machine, make_bpm_device(), 2, orm))
        cat = open_catalog(server.uri, api_key=reader)  # the analyst's key reads
        assert np.array_equal(read_results(cat[uid])["orm"], orm)
        assert cat[uid].metadata["stop"]["exit_status"] == "success"
        assert httpx.get(f"{server.uri}/api/v1/search/", trust_env=False).status_code == 401
        assert not list((tmp_path / "bk").glob("*.jsonl"))
    finally:
        server.stop()


def test_unreachable_server_error_then_offline_backup_and_replay(tmp_path, machine):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(CatalogUnavailableError) as err:
        make_run_engine(tiled=uri, api_key="abc", progress=False)
    assert uri in str(err.value) and "offline_ok=True" in str(err.value) and "catalog replay" in str(err.value)

    server = TiledServer(tmp_path / "catalog", port=port)
    backup = tmp_path / "backup"
    RE = make_run_engine(tiled=uri, api_key=server.api_key, backup_dir=backup, progress=False, offline_ok=True)  # noqa: N806
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
        assert len(read_stream(cat[uid1])["time"]) == 3
        assert np.array_equal(read_results(cat[uid1])["orm"], orm)
        assert replay_backup(backup, cat).written == []  # moved to replayed/: nothing twice

        server.stop()  # gone between two runs: the next run is backed up at once, without Tiled's 45 s of retries
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="backed up"):
            uid3 = RE(_plan(machine, bpm, 2, orm))
        assert time.monotonic() - t0 < 10 and (backup / f"{uid3}.jsonl").exists()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else (os.path.dirname(shutil.which("pg_ctl") or "") or None)


class PostgreSQL:
    """A PostgreSQL server in a temporary folder on 127.0.0.1, run as an unprivileged user (``nobody`` when the
    tests run as root: PostgreSQL refuses root), trust authentication on loopback only; stopped and removed after."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="acc-bluesky-pg-")
        self.port = free_port()
        self.user = "acc"
        self.run_as = {}
        if os.geteuid() == 0:
            self.run_as = {"user": "nobody", "group": "nogroup" if _group_exists("nogroup") else "nobody"}
            shutil.chown(self.dir, "nobody")
        self.uri = f"postgresql://{self.user}@127.0.0.1:{self.port}/catalog"

    def _run(self, *cmd: str) -> None:
        subprocess.run([os.path.join(self.bindir, cmd[0]), *cmd[1:]], check=True, capture_output=True,
                       cwd=self.dir, **self.run_as)

    def start(self) -> PostgreSQL:
        data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", self.user, "--no-sync")
        self._run("pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off", "start")  # -w: until it accepts
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "catalog")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgresql():
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs it with apt (package postgresql)")
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    pg = PostgreSQL(bindir).start()
    try:
        yield pg
    finally:
        pg.stop()


def test_postgresql_team_server_round_trip_and_fair_search(tmp_path, postgresql, capsys):
    server = TiledServer(tmp_path / "team", database=postgresql.uri).start()
    try:
        RE = make_run_engine(tiled=server.uri, api_key=server.api_key, backup_dir=tmp_path / "bk", progress=False)  # noqa: N806
        sim, epics = fake_machine(tmp_path), fake_machine(tmp_path, mode="epics", seed=None)
        bpm = make_bpm_device()
        orm = RNG.normal(size=(224, 448))
        a = RE(_plan(sim, bpm, 3, orm))
        b = RE(_plan(epics, bpm, 2, orm))
        cat = open_catalog(server.uri, api_key=server.api_key)
        assert np.array_equal(read_results(cat[a])["orm"], orm)  # bit for bit
        assert np.allclose(read_stream(cat[a])["bpm-current"], [0.2, 0.201, 0.202])
        assert list(find_runs(cat, tool="orbit_response", mode="epics")) == [b]
        assert sorted(find_runs(cat, facility="ESRF", profile="ebs")) == sorted([a, b])
        assert list(find_runs(cat, **{"parameters.n_events": 3})) == [a]
        # the runs are in PostgreSQL, not in a SQLite file of the folder
        assert not (tmp_path / "team" / "catalog.db").exists()
        assert catalog_main(["catalog", "ls", "--tiled", server.uri, "--api-key", server.api_key]) == 0
        out = capsys.readouterr().out
        assert a in out and b in out and "success" in out
    finally:
        server.stop()
