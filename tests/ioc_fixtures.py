"""Shared fixtures of the IOC, epics-backend and shadow tests: EPICS on loopback only, IOC subprocesses.

Importing this module (``from ioc_fixtures import *``) sets the Channel Access client environment of the test
process *before* any CA context exists: search only 127.0.0.1 on a pool of random free ports (one per IOC a test
may start), no automatic address list, and pyepics sharing aioca's libca. Every IOC runs in a subprocess serving
on 127.0.0.1 only and is stopped by its fixture (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

__all__ = ["PORTS", "PREFIX", "IocProcess", "TwinIocHandle", "twin_ioc", "ioc_machine", "reset_ioc", "caget", "caput",
           "free_port", "start_ioc", "ioc_env"]


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (CA uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port + 1))  # PVA search port when serving PVA on port
        except OSError:
            continue
        return port
    raise RuntimeError("no free port on 127.0.0.1")


#: One CA server port per IOC role; the client searches all of them (unicast on loopback reaches one socket
#: per port, so two IOCs never share a port).
PORTS = {role: free_port() for role in ("twin", "shadow", "fault", "fault_shadow", "spare", "clients")}

os.environ.update({
    "EPICS_CA_ADDR_LIST": " ".join(f"127.0.0.1:{p}" for p in PORTS.values()),
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_SERVER_PORT": str(PORTS["twin"]),
    "EPICS_CA_REPEATER_PORT": str(free_port()),
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
})
import epicscorelibs.path.pyepics  # noqa: E402,F401 - pyepics uses the same libca as aioca/ophyd-async

#: A prefix no other IOC on this host uses.
PREFIX = f"T{uuid.uuid4().hex[:6].upper()}:"


def ioc_env() -> dict[str, str]:
    """Environment of an IOC subprocess (the loopback EPICS settings above, quiet Python)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class IocProcess:
    """A ``python -m acc_bluesky.ioc ...`` subprocess on 127.0.0.1, logging to a file, stopped on demand."""

    def __init__(self, args: list[str], port: int, name: str, ready: str = "IOC ready"):
        self.args = list(args)
        self.port = port
        self.name = name
        self.ready = ready
        fd, path = tempfile.mkstemp(prefix=f"acc_bluesky_{name}_", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""

    def start(self, timeout: float = 120.0) -> IocProcess:
        cmd = [sys.executable, "-m", "acc_bluesky.ioc", *self.args, "--port", str(self.port), "--interface",
               "127.0.0.1"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ioc_env(),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            for line in text.splitlines():
                if line.startswith(self.ready):
                    self.ready_line = line
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before being ready:\n{text[-3000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash, for fault tests)."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def __del__(self):  # last resort: never leave a process behind
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:  # noqa: BLE001
            pass


def start_ioc(role: str, *args: str, name: str | None = None) -> IocProcess:
    """Start ``python -m acc_bluesky.ioc ARGS`` on the port of ``role`` and wait until it is ready."""
    return IocProcess(list(args), PORTS[role], name or role).start()


class TwinIocHandle:
    """A twin IOC of the EBS profile: process, prefix and PV tables (names from the profile's templates only)."""

    def __init__(self, proc: IocProcess, prefix: str, seed: int):
        from acc_bluesky.devices import pv_names
        from acc_bluesky.ioc import orbit_rms_pv_names, twin_pv_names
        from acc_bluesky.profile import load_profile

        self.proc = proc
        self.prefix = prefix
        self.seed = seed
        self.profile = load_profile("ebs")
        self.pvs = pv_names(self.profile, prefix)
        self.tpvs = twin_pv_names(self.profile, prefix)
        self.opvs = orbit_rms_pv_names(self.profile, prefix)

    def sp(self, family: str, index: int) -> str:
        """Setpoint PV of magnet ``index`` (0-based) of ``family``."""
        from acc_bluesky.ioc import magnet_pv

        return magnet_pv(self.pvs, self.profile, family, index, "setpoint")

    def rb(self, family: str, index: int) -> str:
        """Readback PV of magnet ``index`` (0-based) of ``family``."""
        from acc_bluesky.ioc import magnet_pv

        return magnet_pv(self.pvs, self.profile, family, index, "readback")

    def bpm(self, index: int, plane: str) -> str:
        """PV of BPM ``index`` (0-based), plane ``x`` or ``y``."""
        from acc_bluesky.ioc import bpm_pv

        return bpm_pv(self.pvs, self.profile, index, plane)

    def device(self, family: str, index: int) -> str:
        """The profile's name of magnet ``index`` of ``family``."""
        return self.profile.families[family].device_names[index]

    def command(self, text: str) -> str:
        """Send a TWIN:CMD (waits until its effect is published); returns TWIN:CMD-RESULT."""
        caput(self.tpvs["cmd"], text, wait=True, timeout=30)
        return caget(self.tpvs["cmd_result"], as_string=True)


#: Session singletons: ``from ioc_fixtures import *`` in several modules makes one fixture definition per module,
#: so the fixtures share these (one IOC, one connected machine per session).
_SESSION: dict[str, object] = {}


def _stop_twin_ioc() -> None:
    h = _SESSION.pop("twin_ioc", None)
    _SESSION.pop("ioc_machine", None)
    if h is not None:
        code = h.proc.stop()
        assert code == 0, f"the twin IOC did not stop cleanly (exit code {code}):\n{h.proc.log()[-2000:]}"


@pytest.fixture(scope="session")
def twin_ioc(request):
    """The EBS twin (seed 1, fault injection allowed) served on loopback for the whole session."""
    h = _SESSION.get("twin_ioc")
    if h is None or not h.proc.alive:
        proc = IocProcess(["serve", "ebs", "--seed", "1", "--prefix", PREFIX, "--allow-faults"], PORTS["twin"],
                          "twin_ioc")
        proc.start()
        h = _SESSION["twin_ioc"] = TwinIocHandle(proc, PREFIX, 1)
        request.addfinalizer(_stop_twin_ioc)
    return h


@pytest.fixture
def reset_ioc(twin_ioc):
    """The session IOC back to design setpoints, no anomaly, beam injected (before and after the test)."""
    twin_ioc.command("reset")
    yield twin_ioc
    if twin_ioc.proc.alive:
        twin_ioc.command("reset")


@pytest.fixture(scope="session")
def ioc_machine(twin_ioc):
    """``connect("ebs", mode="epics")`` on the session IOC."""
    from acc_bluesky.machine import connect

    m = _SESSION.get("ioc_machine")
    if m is None:
        m = _SESSION["ioc_machine"] = connect("ebs", mode="epics", prefix=twin_ioc.prefix, timeout=10.0)
    return m


def caget(pv: str, **kw):
    """pyepics ``caget`` that asks the IOC (not pyepics' monitor cache, which may still hold the value from before a
    put that has completed) and raises when the PV does not answer."""
    import epics

    kw.setdefault("timeout", 10.0)
    kw.setdefault("use_monitor", False)
    value = epics.caget(pv, **kw)
    if value is None:
        raise TimeoutError(f"caget {pv}: no answer")
    return value


def caput(pv: str, value, **kw):
    """pyepics ``caput`` that raises when the put does not complete."""
    import epics

    kw.setdefault("wait", True)
    kw.setdefault("timeout", 10.0)
    ok = epics.caput(pv, value, **kw)
    if ok != 1:
        raise TimeoutError(f"caput {pv} = {value!r}: not completed ({ok})")
    return ok
