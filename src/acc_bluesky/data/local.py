"""One Tiled server process per catalogue folder, on loopback, shared by every session of the machine.

The first session (or ``open_catalog``, or ``acc-bluesky catalog ...``) that needs a catalogue folder starts
``acc-bluesky catalog serve --dir FOLDER --port 0 --on-demand`` -- the same command and code as a team server --
and every later session and process finds it through files in the folder:

============== =====================================================================================================
``server.lock`` held (``flock``, exclusive) while a server is being started or is stopping: one server per folder
``server.json`` the address ``{"uri": ..., "pid": ...}``, written by the server once it listens, removed at its end
``server.key``  the API key of the folder, random, mode 0600 (only this user reads it)
``server.alive`` held (exclusive) by the server process for its whole life: a dead server is seen at once, even
                after ``kill -9`` (the kernel releases the lock)
``server.users`` held (shared) by every process that uses the server; the server stops when nobody holds it and no
                request came for ``idle_timeout`` seconds (``$ACC_BLUESKY_SERVER_IDLE``, default 120 s)
``server.log``  the server's output
============== =====================================================================================================

No polling with sleeps: a starting session waits on the lock, then reads the server's "ready" line from a pipe.
This module is the client side and the server's book-keeping; it imports only :mod:`.catalog`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .catalog import CatalogUnavailableError, catalog_paths

__all__ = [
    "ENV_IDLE",
    "LocalServer",
    "attach",
    "attached",
    "detach",
    "folder_api_key",
    "server_alive",
    "server_files",
    "stop_server",
]

logger = logging.getLogger(__name__)

#: Environment variable: seconds an on-demand server waits, once no process uses it, before it stops.
ENV_IDLE = "ACC_BLUESKY_SERVER_IDLE"
DEFAULT_IDLE = 120.0
#: Seconds a server may take to start (the imports of the Tiled server stack, ~3 s, on a loaded machine).
START_TIMEOUT = 120.0


def server_files(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """The book-keeping files of a catalogue folder (see the module docs)."""
    root = catalog_paths(directory)["root"]
    return {name: root / f"server.{name}" for name in ("lock", "json", "key", "alive", "users", "log")} | {
        "root": root}


@contextlib.contextmanager
def file_lock(path: pathlib.Path, exclusive: bool = True, blocking: bool = True) -> Iterator[int | None]:
    """``flock`` on ``path`` (created if needed) for the ``with`` block; yields the fd, or None if ``blocking`` is
    False and somebody else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # (releases the lock)


def server_alive(directory: str | os.PathLike) -> bool:
    """True while a server process of that folder lives (it holds ``server.alive``)."""
    path = server_files(directory)["alive"]
    if not path.exists():
        return False
    with file_lock(path, exclusive=False, blocking=False) as fd:
        return fd is None


def folder_api_key(directory: str | os.PathLike, create: bool = True) -> str:
    """The folder's API key (``server.key``, mode 0600), made at random on first use."""
    path = server_files(directory)["key"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if create and not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # (a copied folder): nobody else may read the key
    return path.read_text().strip()


@dataclasses.dataclass(frozen=True)
class LocalServer:
    """The server of a catalogue folder: ``uri`` (``http://127.0.0.1:PORT``), ``api_key``, ``pid``."""

    root: pathlib.Path
    uri: str
    api_key: str
    pid: int


_lock = threading.RLock()
_users: dict[pathlib.Path, int] = {}  # folder -> fd holding server.users (shared) for this process
_servers: dict[pathlib.Path, LocalServer] = {}


def _read_address(files: dict[str, pathlib.Path]) -> dict[str, Any] | None:
    try:
        return json.loads(files["json"].read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def idle_timeout() -> float:
    """``$ACC_BLUESKY_SERVER_IDLE`` [s], default 120."""
    try:
        return float(os.environ.get(ENV_IDLE, DEFAULT_IDLE))
    except ValueError:
        return DEFAULT_IDLE


def attach(directory: str | os.PathLike, *, start: bool = True) -> LocalServer:
    """The server of a catalogue folder, started if none runs (and ``start``); this process is then one of its
    users until :func:`detach` or its end. Checks each time that the server still lives (a restarted one has a new
    address)."""
    files = server_files(directory)
    root = files["root"]
    with _lock:
        known = _servers.get(root)
        if known is not None and server_alive(root):
            return known
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(files["lock"]):
            address = _read_address(files)
            if address is None or not server_alive(root):
                if not start:
                    raise CatalogUnavailableError(f"No catalogue server runs for {root}")
                old = (address or {}).get("uri")  # a server that died: its successor takes its port if it can
                address = _start(files, port=int(old.rsplit(":", 1)[1]) if old else 0)
            if root not in _users:
                fd = os.open(files["users"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                _users[root] = fd
                threading.Thread(target=_watch, args=(root,), daemon=True, name="acc-bluesky-server-watch").start()
            server = _servers[root] = LocalServer(root, address["uri"], folder_api_key(root), int(address["pid"]))
        return server


def _watch(root: pathlib.Path) -> None:
    """While this process uses the folder's server: wait for its end (its ``server.alive`` lock) and start it
    again at once, on the same port if free, so that the clients of this process (the writers retrying their
    requests) carry on."""
    files = server_files(root)
    while True:
        with file_lock(files["alive"], exclusive=False):
            pass  # (granted when the server process has ended)
        with _lock:
            if root not in _users:
                return
        try:
            attach(root)
        except Exception as err:  # noqa: BLE001 - the writers back their runs up; try again at the next use
            logger.error("the catalogue server of %s ended and could not be started again: %s", root, err)
            return
        logger.warning("the catalogue server of %s ended: started again", root)


_LAUNCHER = (
    "import subprocess, sys; fd = int(sys.argv[1]); "
    "subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, pass_fds=(fd,), start_new_session=True)"
)


def _start(files: dict[str, pathlib.Path], port: int = 0) -> dict[str, Any]:
    """Start the folder's server (the caller holds ``server.lock``) and wait for its "ready" line."""
    root = files["root"]
    folder_api_key(root)
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    cmd = [sys.executable, "-m", "acc_bluesky.cli.catalog", "catalog", "serve", "--dir", str(root), "--port", str(port),
           "--on-demand", "--ready-fd", str(write_fd), "--idle-timeout", str(idle_timeout())]
    try:
        with open(files["log"], "ab") as log:
            # through a launcher that exits at once: the server belongs to no session's process tree (it is shared;
            # stopping a session or its service, e.g. `acc-bluesky queue stop`, leaves it to its idle timer)
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(write_fd), *cmd], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    proc.wait(60)  # (the launcher only)
    line = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                raise CatalogUnavailableError(
                    f"The catalogue server of {root} did not start within {START_TIMEOUT:.0f} s; see {files['log']}")
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            line += chunk
    finally:
        os.close(read_fd)
    if not line.startswith(b"ready "):
        tail = files["log"].read_text(errors="replace")[-2000:] if files["log"].exists() else ""
        raise CatalogUnavailableError(f"The catalogue server of {root} failed to start: {tail.strip()}")
    address = _read_address(files)
    if address is None:
        raise CatalogUnavailableError(f"The catalogue server of {root} started but wrote no address")
    logger.info("started the catalogue server of %s at %s (pid %s)", root, address["uri"], address["pid"])
    return address


def attached() -> list[pathlib.Path]:
    """The catalogue folders whose servers this process uses."""
    with _lock:
        return list(_users)


def detach(directory: str | os.PathLike) -> None:
    """This process stops being a user of the folder's server (its idle timer starts once nobody uses it)."""
    root = server_files(directory)["root"]
    with _lock:
        _servers.pop(root, None)
        fd = _users.pop(root, None)
        if fd is not None:
            os.close(fd)


def stop_server(directory: str | os.PathLike, *, force: bool = False, timeout: float = 30.0) -> bool:
    """Detach, then stop the folder's server unless another process still uses it (or ``force``). Returns True if
    a server was stopped. Waits for its end (the ``server.alive`` lock)."""
    files = server_files(directory)
    root = files["root"]
    detach(root)
    with _lock, file_lock(files["lock"]):
        address = _read_address(files)
        if address is None or not server_alive(root):
            return False
        with file_lock(files["users"], blocking=False) as free:
            if free is None and not force:
                return False
        try:
            os.kill(int(address["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_dead(files, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(address["pid"]), signal.SIGKILL)
            _wait_dead(files, timeout)
        with contextlib.suppress(FileNotFoundError):
            files["json"].unlink()
        return True


def _wait_dead(files: dict[str, pathlib.Path], timeout: float) -> bool:
    """Wait (on its lock, in a helper thread: flock has no timeout) until the server process has ended."""
    done = threading.Event()

    def wait() -> None:
        with file_lock(files["alive"], exclusive=False):
            done.set()

    threading.Thread(target=wait, daemon=True, name="acc-bluesky-server-end").start()
    return done.wait(timeout)


# ------------------------------------------------------------------------------------------------ server side


class ServerBookkeeping:
    """The server process's side: hold ``server.alive``, publish the address, stop when idle.

    Used by :func:`acc_bluesky.data.server.serve_catalog` with ``on_demand``.
    """

    def __init__(self, directory: str | os.PathLike, idle: float | None) -> None:
        self.files = server_files(directory)
        self.idle = idle
        self.last_request = time.monotonic()
        self.active = 0
        self._alive_fd: int | None = None
        self._stop_lock_fd: int | None = None
        self._stop = threading.Event()

    def acquire(self, timeout: float = 60.0) -> None:
        """Hold ``server.alive`` (waits for a previous server of the folder that is still stopping)."""
        fd = os.open(self.files["alive"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        locked = threading.Event()

        def lock() -> None:  # blocking (flock has no timeout): in a helper thread
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked.set()

        threading.Thread(target=lock, daemon=True, name="acc-bluesky-alive").start()
        if not locked.wait(timeout):
            raise RuntimeError(f"another catalogue server of {self.files['root']} is still running")
        self._alive_fd = fd

    def publish(self, uri: str) -> None:
        tmp = self.files["json"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"uri": uri, "pid": os.getpid(), "started": time.time()}))
        os.replace(tmp, self.files["json"])

    def withdraw(self) -> None:
        address = _read_address(self.files)
        if address is not None and int(address.get("pid", -1)) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.files["json"].unlink()

    def track(self, app: Any) -> Any:
        """The ASGI app, noting when requests come (for the idle timer)."""

        async def tracked(scope: dict, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                await app(scope, receive, send)
                return
            self.active += 1
            self.last_request = time.monotonic()
            try:
                await app(scope, receive, send)
            finally:
                self.active -= 1
                self.last_request = time.monotonic()

        return tracked

    def watch_idle(self, server: Any) -> None:
        """A thread that sets ``server.should_exit`` once nobody uses the server (see the module docs)."""
        if self.idle is None or self.idle <= 0:
            return

        def watch() -> None:
            period = min(max(self.idle / 4, 0.05), 5.0)
            while not self._stop.wait(period):
                if self.active or time.monotonic() - self.last_request < self.idle:
                    continue
                try:
                    fd = os.open(self.files["lock"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except FileNotFoundError:  # the folder was deleted under it: no session can find it any more
                    logger.warning("the catalogue folder %s is gone: stopping its server", self.files["root"])
                    server.should_exit = True
                    return
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a session is attaching or starting: not idle
                    os.close(fd)
                    continue
                with file_lock(self.files["users"], blocking=False) as free:
                    if free is None:
                        os.close(fd)
                        continue
                self.withdraw()
                self._stop_lock_fd = fd  # held until this process ends: the next session waits for our end
                logger.warning("no session used the catalogue server for %.0f s: stopping", self.idle)
                server.should_exit = True
                return

        threading.Thread(target=watch, daemon=True, name="acc-bluesky-idle").start()

    def close(self) -> None:
        self._stop.set()
        self.withdraw()
