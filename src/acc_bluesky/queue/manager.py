"""Start and stop a real Redis + bluesky-queueserver RE Manager for one profile, on loopback.

:func:`start_queue_server` launches ``redis-server`` (no persistence) and ``start-re-manager`` (a watchdog with
the manager and the worker as children), opens the worker environment and checks that it really exists (a failed
open is reported as a success by the manager). The worker builds ``RE`` and the machine from
``profiles/<name>/startup.py`` with the profile, mode, seed and catalogue passed in environment variables
(:data:`ENV_PROFILE`, :data:`ENV_MODE`, :data:`ENV_SEED`, and ``ACC_BLUESKY_CATALOG``, the data layer's own
variable: an embedded catalogue folder or a Tiled server URI).

The running server is described by ``server.json`` in its run folder (default
``$ACC_BLUESKY_QUEUE_DIR/<profile>`` or ``~/.local/state/acc_bluesky/queue/<profile>``), so ``acc-bluesky queue
stop/status/submit`` in another shell find it. The run folder also holds the logs (``redis.log``,
``re_manager.log``) and the manager's working copy of the list of plans and devices (refreshed when the
environment opens, so the shipped file is never written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..profile import load_profile

__all__ = [
    "ENV_CATALOG",
    "ENV_MODE",
    "ENV_PREFIX",
    "ENV_PROFILE",
    "ENV_SEED",
    "ENV_TANGO_ADDRESS",
    "PLANS_FILE",
    "PERMISSIONS_FILE",
    "QueueServer",
    "QueueServerError",
    "default_run_dir",
    "free_port",
    "gen_lists",
    "load_queue_server",
    "start_queue_server",
]

ENV_PROFILE = "ACC_BLUESKY_PROFILE"
ENV_MODE = "ACC_BLUESKY_MODE"
ENV_SEED = "ACC_BLUESKY_SEED"
ENV_PREFIX = "ACC_BLUESKY_PREFIX"  # epics mode: the PV prefix (default: the profile's controls.prefix)
# --- tango: tango mode's device server (host:port, no database) or Tango database (with $TANGO_HOST) ---
ENV_TANGO_ADDRESS = "ACC_BLUESKY_TANGO_ADDRESS"
QUEUE_MODES = ("sim", "epics", "tango")
# --- end tango ---
ENV_CATALOG = "ACC_BLUESKY_CATALOG"  # the data layer's: a catalogue folder or a Tiled URI
ENV_QUEUE_DIR = "ACC_BLUESKY_QUEUE_DIR"

PLANS_FILE = "existing_plans_and_devices.yaml"
PERMISSIONS_FILE = "user_group_permissions.yaml"
STARTUP_FILE = "startup.py"
STATE_FILE = "server.json"
#: Device tree depth listed for the queue (top-level devices and their direct signals/channels).
DEVICE_MAX_DEPTH = 2


class QueueServerError(RuntimeError):
    """The queue server could not be started, reached or stopped; the message says why and what to do."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_run_dir(profile_name: str) -> Path:
    """Run folder of the queue server of ``profile_name``: ``$ACC_BLUESKY_QUEUE_DIR/<name>`` or XDG state."""
    base = os.environ.get(ENV_QUEUE_DIR)
    if not base:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = str(Path(state) / "acc_bluesky" / "queue")
    return Path(base) / profile_name


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def _pid_alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (guards against PID reuse)."""
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    if not cmd.strip():  # zombie
        return False
    return marker in cmd


def _terminate(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM ``pid`` (only if it is still the process we started), then SIGKILL its group after ``timeout``."""
    if not _pid_alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if not _pid_alive(pid, marker):
            return
        time.sleep(0.05)
    # started with start_new_session=True: the group id is the pid; this ends the worker too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def _end_group(pgid: int, timeout: float) -> None:
    """Wait until every process of the group ``pgid`` (the manager's session) has exited; SIGKILL the group after
    ``timeout`` [s]. The worker's catalogue writer process is in it: it ends once it has written what it holds."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if not _group_running(pgid):  # zombies only, waiting for whoever reaps them
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (is not a zombie); True where /proc cannot tell."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _wait_for_redis(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import redis

    t_end = time.monotonic() + timeout
    err: Exception | None = None
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise QueueServerError(f"redis-server exited with code {proc.returncode} on port {port}:\n{_tail(log)}")
        try:
            if redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping():
                return
        except redis.RedisError as e:
            err = e
        time.sleep(0.05)
    raise QueueServerError(f"redis-server on 127.0.0.1:{port} did not answer within {timeout} s ({err}):\n"
                           f"{_tail(log)}")


def _start_redis(port: int, log: Path, timeout: float) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        raise QueueServerError(
            "redis-server is not installed: the queue server keeps its queue and history in Redis. Install it "
            "with `apt-get install redis-server` (Debian/Ubuntu), `dnf install redis`, `brew install redis` or "
            "`conda install -c conda-forge redis`, then run the command again.")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--dir", str(log.parent)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_redis(port, proc, log, timeout)
    except BaseException:
        _terminate(proc.pid, "redis-server", 5.0)
        raise
    return proc


def _manager_exe() -> list[str]:
    exe = Path(sys.executable).parent / "start-re-manager"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("start-re-manager")
    if found is None:
        raise QueueServerError("start-re-manager not found: install bluesky-queueserver in this environment "
                               "(`pip install bluesky-queueserver`)")
    return [found]


def _seed_str(seed: int | None) -> str:
    return "none" if seed is None else str(int(seed))


def worker_environment(profile: str, mode: str, seed: int | None, catalog_dir: str | os.PathLike | None = None,
                       tiled: str | None = None, prefix: str | None = None,
                       address: str | None = None) -> dict[str, str]:
    """The environment variables that tell :mod:`acc_bluesky.queue.startup` what to build.

    ``tiled`` (a server URI) wins over ``catalog_dir``; with neither, the worker inherits ``ACC_BLUESKY_CATALOG``
    or uses the data layer's default folder.
    """
    env = {ENV_PROFILE: str(profile), ENV_MODE: mode, ENV_SEED: _seed_str(seed), "PYTHONUNBUFFERED": "1",
           "MPLBACKEND": "Agg"}
    if tiled is not None:
        env[ENV_CATALOG] = tiled
    elif catalog_dir is not None:
        env[ENV_CATALOG] = str(Path(catalog_dir).expanduser().resolve())
    if prefix is not None:
        env[ENV_PREFIX] = prefix
    if address is not None:  # tango
        env[ENV_TANGO_ADDRESS] = address
    return env


def _startup_dir(profile_dir: Path, run_dir: Path) -> Path:
    """The profile folder if it has a ``startup.py``; else a generated one-file startup folder in ``run_dir``."""
    if (profile_dir / STARTUP_FILE).is_file():
        return profile_dir
    d = run_dir / "startup"
    d.mkdir(parents=True, exist_ok=True)
    (d / STARTUP_FILE).write_text(
        '"""Generated by acc-bluesky queue: the generic startup, for the profile named in $ACC_BLUESKY_PROFILE."""\n'
        "from acc_bluesky.queue.startup import build_namespace as _build_namespace\n\n"
        "globals().update(_build_namespace())\n")
    return d


def gen_lists(profile: str | os.PathLike = "ebs", *, out_dir: str | os.PathLike | None = None, mode: str = "sim",
              seed: int | None = 1, catalog_dir: str | os.PathLike | None = None) -> Path:
    """Generate ``existing_plans_and_devices.yaml`` for ``profile`` with the queue server's own generator.

    Loads the profile's startup code in a child process (as the worker would), lists its plans (with their
    parameter annotations: types, enums of family and corrector names, ranges) and devices, and writes the file.

    Args:
        profile: profile name or path.
        out_dir: folder for the file (default: the profile folder, which is what ``queue start`` ships).
        mode: ``"sim"`` (default; the list does not depend on the mode) or ``"epics"`` (needs the IOC).
        seed: sim error seed used while listing.
        catalog_dir: catalogue the startup's RunEngine opens while listing (default: a temporary folder).

    Returns:
        The path of the written file.
    """
    import tempfile

    prof = load_profile(profile)
    profile_dir = prof.path.parent
    out = Path(out_dir) if out_dir is not None else profile_dir
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acc_bluesky_genlists_") as tmp:
        startup = _startup_dir(profile_dir, Path(tmp))
        env = os.environ.copy()
        env.update(worker_environment(str(prof.path), mode, seed, catalog_dir or Path(tmp) / "catalog"))
        # A fresh interpreter: the generator forks, and this process may already run EPICS threads.
        code = ("import sys\nfrom bluesky_queueserver import gen_list_of_plans_and_devices\n"
                "gen_list_of_plans_and_devices(startup_dir=sys.argv[1], file_dir=sys.argv[2], file_name=sys.argv[3],"
                f" overwrite=True, device_max_depth={DEVICE_MAX_DEPTH})\n")
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(startup), str(out), PLANS_FILE], env=env,
                                  capture_output=True, text=True)
        finally:
            if catalog_dir is None:  # the temporary catalogue's server (the startup's RunEngine started it)
                from ..data.local import stop_server

                stop_server(Path(tmp) / "catalog", force=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise QueueServerError(f"could not list the plans and devices of profile {prof.name!r} "
                                   f"(startup {startup / STARTUP_FILE}):\n{tail}")
    return out / PLANS_FILE


@dataclasses.dataclass
class QueueServer:
    """A running Redis + RE Manager pair on loopback (what :func:`start_queue_server` returns).

    Use it as a context manager, or call :meth:`stop`. :meth:`api` gives a connected
    ``bluesky_queueserver_api.zmq.REManagerAPI``.
    """

    profile: str
    mode: str
    seed: int | None
    run_dir: str
    startup_dir: str
    redis_port: int
    redis_prefix: str
    zmq_control_addr: str
    zmq_info_addr: str
    redis_pid: int
    manager_pid: int
    catalog_dir: str | None = None
    tiled: str | None = None
    started_at: float = 0.0

    # -- persistence ---------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return Path(self.run_dir) / STATE_FILE

    @property
    def manager_log(self) -> Path:
        return Path(self.run_dir) / "re_manager.log"

    @property
    def redis_log(self) -> Path:
        return Path(self.run_dir) / "redis.log"

    def save(self) -> Path:
        self.state_file.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return self.state_file

    # -- control -------------------------------------------------------------------------------------------------
    def api(self, *, timeout: float = 5.0):
        """A ZMQ ``REManagerAPI`` on this server (``timeout``: seconds to wait for each reply)."""
        from .client import connect_api

        return connect_api(self.zmq_control_addr, self.zmq_info_addr, timeout=timeout)

    def is_running(self) -> bool:
        """Whether the manager watchdog and Redis are both alive."""
        return _pid_alive(self.manager_pid, "start-re-manager") and _pid_alive(self.redis_pid, "redis-server")

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.manager_log, lines)

    def stop(self, *, timeout: float = 20.0) -> None:
        """Stop the RE Manager (SIGTERM to the watchdog ends manager and worker) and Redis; forget the state."""
        alive = _pid_alive(self.manager_pid, "start-re-manager")
        _terminate(self.manager_pid, "start-re-manager", timeout)
        if alive:  # the worker's catalogue writer process: let it finish writing, then end the session's group
            _end_group(self.manager_pid, timeout)
        _terminate(self.redis_pid, "redis-server", 5.0)
        with contextlib.suppress(FileNotFoundError):
            if self.state_file.is_file() and json.loads(self.state_file.read_text()).get(
                    "manager_pid") == self.manager_pid:
                self.state_file.unlink()

    def __enter__(self) -> QueueServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return (f"QueueServer({self.profile!r}, mode={self.mode!r}, seed={self.seed}, {state}, "
                f"control={self.zmq_control_addr}, redis=127.0.0.1:{self.redis_port}, run_dir={self.run_dir!r})")


def load_queue_server(run_dir: str | os.PathLike | None = None, profile: str = "ebs") -> QueueServer:
    """The server described in ``run_dir/server.json`` (default: :func:`default_run_dir` of ``profile``).

    Raises:
        QueueServerError: no state file, or its processes are gone (the stale file is removed).
    """
    name = Path(str(profile)).resolve().parent.name if str(profile).endswith((".yaml", ".yml")) else str(profile)
    rd = Path(run_dir) if run_dir is not None else default_run_dir(name)
    f = rd / STATE_FILE
    if not f.is_file():
        raise QueueServerError(f"no queue server is running for {rd} (no {f}); start one with "
                               f"`acc-bluesky queue start {profile}` or pass --run-dir")
    qs = QueueServer(**json.loads(f.read_text()))
    if not qs.is_running():
        qs.stop(timeout=2.0)  # kill a half-dead pair, remove the stale state file
        raise QueueServerError(f"the queue server recorded in {f} is not running any more (stale state removed); "
                               f"start it again with `acc-bluesky queue start {qs.profile}`")
    return qs


def _wait_for_manager(api, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    err: Exception | None = None
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise QueueServerError(f"start-re-manager exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            api.status(reload=True)
            return
        except Exception as e:  # noqa: BLE001 - CommTimeoutError and friends while the manager starts
            err = e
            time.sleep(0.1)
    raise QueueServerError(f"RE Manager did not answer within {timeout} s ({err}):\n{_tail(log)}")


def open_environment(api, *, timeout: float = 120.0, log: Path | None = None) -> dict[str, Any]:
    """Open the worker environment and check it exists (a failed open is reported as a success otherwise).

    Returns:
        The manager status after opening.
    """
    st = api.status(reload=True)
    if st["worker_environment_exists"]:
        return st
    api.environment_open()
    api.wait_for_condition(lambda s: s["manager_state"] != "creating_environment"
                           and (s["worker_environment_exists"] or s["manager_state"] == "idle"),
                           timeout=timeout)
    st = api.status(reload=True)
    if not st["worker_environment_exists"]:
        where = f":\n{_tail(log, 60)}" if log is not None else ""
        raise QueueServerError(
            "the RE Worker environment failed to open (the startup code raised; see the traceback below). Fix the "
            f"profile or the startup, then start the queue server again{where}")
    return st


def start_queue_server(profile: str | os.PathLike = "ebs", *, mode: str = "sim", seed: int | None = 1,
                       redis_port: int | None = None, zmq_control_port: int | None = None,
                       zmq_info_port: int | None = None, catalog_dir: str | os.PathLike | None = None,
                       tiled: str | None = None, run_dir: str | os.PathLike | None = None,
                       redis_prefix: str | None = None, open_env: bool = True,
                       extra_env: dict[str, str] | None = None, timeout: float = 120.0,
                       prefix: str | None = None, address: str | None = None) -> QueueServer:
    """Start Redis and an RE Manager for ``profile`` on 127.0.0.1, open the worker environment.

    Args:
        profile: profile name or path to its ``profile.yaml``.
        mode: ``"sim"`` (the twin runs in the worker), ``"epics"`` (live PVs) or ``"tango"`` (Tango devices).
        seed: sim error seed (``None``: ideal machine, no noise).
        redis_port, zmq_control_port, zmq_info_port: TCP ports on 127.0.0.1 (default: free ports).
        catalog_dir: embedded Tiled catalogue the worker's RunEngine writes to (default: ``$ACC_BLUESKY_CATALOG``
            or the data layer's default folder).
        tiled: URI of a Tiled server instead of the embedded catalogue (API key from ``$TILED_API_KEY``).
        run_dir: folder for logs and the state file (default :func:`default_run_dir`).
        prefix: epics mode: the PV prefix of the machine (default: the profile's ``controls.prefix``).
        address: tango mode: ``host:port`` of the device server without a database (``acc-bluesky tango-server``);
            without it the worker uses the Tango database of ``$TANGO_HOST``.
        redis_prefix: Redis key prefix (default: unique per start, so queues never mix).
        open_env: open the worker environment (build RE + machine) before returning.
        extra_env: more environment variables for the worker (e.g. ``ACC_BLUESKY_BACKUP``,
            ``ACC_BLUESKY_FIGURE_DIR``, ``ACC_BLUESKY_OPERATOR``).
        timeout: seconds allowed for each stage (Redis, manager, environment).

    Returns:
        The running :class:`QueueServer` (also saved to ``run_dir/server.json``).

    Raises:
        QueueServerError: redis-server missing, a server already running in ``run_dir``, a process that exits,
            or an environment that fails to open (with the log tail); everything started is stopped first.
    """
    if mode not in QUEUE_MODES:  # tango
        raise ValueError(f"mode must be one of {', '.join(QUEUE_MODES)}, got {mode!r}")
    prof = load_profile(profile)
    profile_dir = prof.path.parent
    rd = Path(run_dir) if run_dir is not None else default_run_dir(prof.name)
    rd.mkdir(parents=True, exist_ok=True)
    if (rd / STATE_FILE).is_file():
        try:
            running = load_queue_server(rd)
        except QueueServerError:
            pass  # stale: removed
        else:
            raise QueueServerError(f"a queue server is already running for {rd}: {running!r}; stop it with "
                                   f"`acc-bluesky queue stop --run-dir {rd}` or choose another --run-dir")

    perms = profile_dir / PERMISSIONS_FILE
    if not perms.is_file():
        from .permissions import write_permissions

        perms = write_permissions(rd / PERMISSIONS_FILE)
    startup = _startup_dir(profile_dir, rd)
    plans_src = profile_dir / PLANS_FILE
    plans = rd / PLANS_FILE
    if plans_src.is_file():
        shutil.copyfile(plans_src, plans)
    else:
        gen_lists(prof.path, out_dir=rd, mode="sim", seed=seed)

    redis_port = redis_port or free_port()
    control = f"tcp://127.0.0.1:{zmq_control_port or free_port()}"
    info = f"tcp://127.0.0.1:{zmq_info_port or free_port()}"
    redis_name = redis_prefix or f"acc_bluesky_{prof.name}_{uuid.uuid4().hex[:10]}"
    env = os.environ.copy()
    env.update(worker_environment(prof.name if startup == profile_dir else str(prof.path), mode, seed,
                                  catalog_dir, tiled, prefix, address))
    env.update(extra_env or {})
    for k in ("QSERVER_ZMQ_CONTROL_ADDRESS_FOR_SERVER", "QSERVER_ZMQ_INFO_ADDRESS_FOR_SERVER",
              "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"):
        env.pop(k, None)

    redis_log = rd / "redis.log"
    manager_log = rd / "re_manager.log"
    manager_log.write_text("")
    cmd = [*_manager_exe(), "--startup-dir", str(startup), "--existing-plans-devices", str(plans),
           "--update-existing-plans-devices", "ENVIRONMENT_OPEN", "--user-group-permissions", str(perms),
           "--redis-addr", f"127.0.0.1:{redis_port}", "--redis-name-prefix", redis_name,
           "--zmq-control-addr", control, "--zmq-info-addr", info, "--zmq-publish-console", "ON",
           "--device-max-depth", str(DEVICE_MAX_DEPTH)]
    redis_proc = _start_redis(redis_port, redis_log, timeout)
    try:
        with open(manager_log, "ab") as out:
            mproc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=str(rd), start_new_session=True)
    except BaseException:
        _terminate(redis_proc.pid, "redis-server", 5.0)
        raise
    qs = QueueServer(profile=prof.name, mode=mode, seed=seed, run_dir=str(rd), startup_dir=str(startup),
                     redis_port=redis_port, redis_prefix=redis_name, zmq_control_addr=control, zmq_info_addr=info,
                     redis_pid=redis_proc.pid, manager_pid=mproc.pid,
                     catalog_dir=None if tiled else env.get(ENV_CATALOG), tiled=tiled, started_at=time.time())
    try:
        qs.save()  # from now on `queue stop` finds it, also while the environment opens
        api = qs.api()
        try:
            _wait_for_manager(api, mproc, manager_log, timeout)
            if open_env:
                open_environment(api, timeout=timeout, log=manager_log)
        finally:
            api.close()
    except BaseException:
        qs.stop()
        raise
    return qs
