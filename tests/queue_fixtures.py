"""Fixtures for the queue-server tests: a real Redis + RE Manager on loopback, started with the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

ACC_BLUESKY = [sys.executable, "-c", "import sys; from acc_bluesky.cli import main; sys.exit(main())"]

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server not installed (apt-get install redis-server)")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Run ``acc-bluesky ARGS`` in a fresh interpreter; returns the completed process (text output)."""
    full_env = os.environ.copy()
    full_env.update(env or {})
    return subprocess.run([*ACC_BLUESKY, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def queue_dirs(tmp_path_factory, session_catalog_dir) -> dict:
    """The server's folders; its catalogue is the session's (its Tiled server already up: one server start fewer;
    ``queue_dirs["since"]``, the time the module started, selects the module's runs in it)."""
    base = tmp_path_factory.mktemp("queue")
    dirs = {k: base / k for k in ("run", "backup", "figures")}
    for d in dirs.values():
        d.mkdir()
    dirs["catalog"] = session_catalog_dir
    dirs["since"] = time.time()  # (the worker runs one module at a time: later runs in its catalogue are this one's)
    return dirs


@pytest.fixture(scope="module")
def queue_server(queue_dirs):
    """``acc-bluesky queue start ebs`` (sim, seed 1) on free loopback ports; stopped with ``queue stop``."""
    from acc_bluesky.queue import load_queue_server

    env = {"ACC_BLUESKY_BACKUP": str(queue_dirs["backup"]), "ACC_BLUESKY_FIGURE_DIR": str(queue_dirs["figures"]),
           "ACC_BLUESKY_OPERATOR": "queue-worker"}
    from acc_bluesky.cli import main

    t0 = time.perf_counter()
    # the CLI's own entry point in this process (an interpreter less to start: the server's processes are its
    # children, started with the environment below, as from a shell)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        code = main(["queue", "start", "ebs", "--mode", "sim", "--seed", "1", "--run-dir", str(queue_dirs["run"]),
                     "--catalog-dir", str(queue_dirs["catalog"]), "--timeout", "200"])
    assert code == 0, "queue start failed (its messages are in the captured output)"
    qs = load_queue_server(queue_dirs["run"])
    qs.start_seconds = time.perf_counter() - t0
    try:
        yield qs
    finally:
        if qs.is_running():
            if main(["queue", "stop", "--run-dir", str(queue_dirs["run"])]) != 0:  # nothing outlives the tests
                qs.stop()


@pytest.fixture
def api(queue_server):
    a = queue_server.api(timeout=10.0)
    yield a
    a.close()
