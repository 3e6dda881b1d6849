"""Fixtures and helpers of the data-layer tests (imported by tests/test_data_*.py).

Nothing here is mocked: catalogues are real catalogue folders whose Tiled servers (real ``acc-bluesky catalog
serve`` processes on loopback, started on demand) the tests share per module and stop at teardown.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

N_BPM = 224


def fake_machine(tmp: pathlib.Path, mode: str = "sim", seed: int | None = 1) -> types.SimpleNamespace:
    """A duck-typed stand-in for ``acc_bluesky.connect(...)``: what ``tool_metadata`` reads."""
    profile_path = tmp / "profile.yaml"
    lattice_path = tmp / "esrf.m"
    profile = types.SimpleNamespace(
        name="ebs",
        facility="ESRF",
        accelerator="EBS",
        path=profile_path,
        sha256="a" * 64,
        lattice_path=lattice_path,
        lattice_sha256="b" * 64,
    )
    return types.SimpleNamespace(profile=profile, mode=mode, seed=seed)


def make_bpm_device(name: str = "bpm"):
    """An ophyd-async device with a 224-value orbit [m] and a beam current [A] (soft signals)."""
    from ophyd_async.core import StandardReadable, init_devices, soft_signal_rw

    class Bpms(StandardReadable):
        def __init__(self, name: str = "") -> None:
            with self.add_children_as_readables():
                self.x = soft_signal_rw(np.ndarray, np.linspace(-1e-4, 1e-4, N_BPM), units="m")
                self.current = soft_signal_rw(float, 0.2, units="A")
            super().__init__(name=name)

    with init_devices():
        dev = Bpms(name=name)
    return dev


#: Seconds a server started by a test waits without users before it stops (the tests stop theirs anyway).
SERVER_IDLE = "20"


@pytest.fixture(autouse=True)
def _isolated_data_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's real catalogue, backup folder or Tiled key."""
    monkeypatch.setenv("ACC_BLUESKY_CATALOG", str(tmp_path / "default-catalog"))
    monkeypatch.setenv("ACC_BLUESKY_BACKUP", str(tmp_path / "default-backup"))
    monkeypatch.setenv("ACC_BLUESKY_OPERATOR", "tester")
    monkeypatch.setenv("ACC_BLUESKY_SERVER_IDLE", SERVER_IDLE)
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    monkeypatch.delenv("ACC_BLUESKY_LICENSE", raising=False)


@pytest.fixture
def machine(tmp_path: pathlib.Path) -> types.SimpleNamespace:
    return fake_machine(tmp_path)


@pytest.fixture(scope="module")
def module_catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """One catalogue folder (so one server) for a test module; its server is stopped at the module's end."""
    from acc_bluesky.data import close_catalog

    directory = tmp_path_factory.mktemp("catalog")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACC_BLUESKY_SERVER_IDLE", SERVER_IDLE)
        yield directory
    close_catalog(directory)


@pytest.fixture
def run_engine(module_catalog_dir: pathlib.Path, tmp_path: pathlib.Path):
    """A RunEngine on the module's catalogue folder (backup in ``tmp_path/backup``). Its runs carry
    ``test_token`` (unique per test): ``find_runs(cat, test_token=run_engine.md["test_token"])`` gives this
    test's runs only."""
    from acc_bluesky.data import make_run_engine

    RE = make_run_engine(catalog_dir=module_catalog_dir, backup_dir=tmp_path / "backup", progress=False)  # noqa: N806
    RE.md["test_token"] = secrets.token_hex(8)
    yield RE
    if RE.state != "idle":
        RE.halt()


def run_script(code: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (a plain script, as a user would), with this test's environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def start_script(code: str, *args: str) -> subprocess.Popen:
    """Start Python code in a fresh interpreter; its stdout is a pipe (line-buffered text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TiledServer:
    """``acc-bluesky catalog serve`` in a subprocess on 127.0.0.1."""

    def __init__(
        self,
        directory: pathlib.Path,
        port: int | None = None,
        read_only_key: str | None = None,
        api_key: str | None = None,
        database: str | None = None,
    ) -> None:
        self.database = database
        self.directory = directory
        self.port = port or free_port()
        self.api_key = api_key or secrets.token_hex(16)
        self.read_only_key = read_only_key
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = directory.parent / f"server-{self.port}.log"

    def launch(self) -> TiledServer:
        """Start the process; do not wait (see :meth:`wait_ready`)."""
        cmd = [
            sys.executable, "-m", "acc_bluesky.cli.catalog", "catalog", "serve",
            "--dir", str(self.directory), "--port", str(self.port), "--api-key", self.api_key,
        ]
        if self.read_only_key:
            cmd += ["--read-only-key", self.read_only_key]
        if self.database:
            cmd += ["--database", self.database]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 60.0) -> TiledServer:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tiled server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.uri}/healthz", timeout=0.5, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tiled server not ready in {timeout} s: {self.log.read_text()}")

    def start(self) -> TiledServer:
        return self.launch().wait_ready()

    def kill(self) -> None:
        """Die like a crashed server (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def tiled_server(tmp_path: pathlib.Path) -> Iterator[TiledServer]:
    """A started single-key server on a fresh catalogue folder; stopped at teardown."""
    server = TiledServer(tmp_path / "server-catalog").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_tiled_retries() -> Iterator[None]:
    """Tiled's client retries a lost server for up to 45 s ($TILED_RETRY_TIMEOUT); fail at once in tests."""
    import stamina

    stamina.set_testing(True, attempts=1)
    try:
        yield
    finally:
        stamina.set_testing(False)
