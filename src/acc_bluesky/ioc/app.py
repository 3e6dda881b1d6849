"""Process entry points: ``acc-bluesky ioc`` / ``acc-bluesky shadow`` and ``python -m acc_bluesky.ioc``.

pythonSoftIOC runs one IOC per process, so the twin IOC and the shadow are separate processes. Both print a line
starting with ``IOC ready`` (:data:`~acc_bluesky.ioc.server.READY_MESSAGE`) once their PVs are served, and stop
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["add_ioc_arguments", "add_shadow_arguments", "run_ioc", "run_shadow", "configure_server_env",
           "drop_realtime_privileges", "main"]

log = logging.getLogger(__name__)


def configure_server_env(port: int | None = None, interface: str | None = None, pva_port: int | None = None) -> None:
    """Set the EPICS server environment before ``iocInit`` reads it.

    Args:
        port: Channel Access server port (``EPICS_CA_SERVER_PORT``/``EPICS_CAS_SERVER_PORT``).
        interface: serve on this address only (``EPICS_CAS_INTF_ADDR_LIST``; beacons go there too), e.g.
            ``127.0.0.1`` for loopback.
        pva_port: PV Access server TCP port (``EPICS_PVAS_SERVER_PORT``); the UDP search port is ``pva_port + 1``.
    """
    env = os.environ
    if port is not None:
        env["EPICS_CA_SERVER_PORT"] = env["EPICS_CAS_SERVER_PORT"] = str(int(port))
    if interface:
        env["EPICS_CAS_INTF_ADDR_LIST"] = interface
        env["EPICS_CAS_BEACON_ADDR_LIST"] = interface
        env["EPICS_CAS_AUTO_BEACON_ADDR_LIST"] = "NO"
        env["EPICS_PVAS_INTF_ADDR_LIST"] = interface
        env["EPICS_PVAS_BEACON_ADDR_LIST"] = interface
        env["EPICS_PVAS_AUTO_BEACON_ADDR_LIST"] = "NO"
    if pva_port is not None:
        env["EPICS_PVAS_SERVER_PORT"] = str(int(pva_port))
        env["EPICS_PVAS_BROADCAST_PORT"] = str(int(pva_port) + 1)


_CAP_IPC_LOCK, _CAP_SYS_NICE = 14, 23


def drop_realtime_privileges() -> bool:
    """Drop CAP_SYS_NICE and CAP_IPC_LOCK from this process (Linux, before EPICS starts its threads).

    EPICS base gives its threads real-time (SCHED_FIFO) priorities and, at ``iocInit``, locks the whole address
    space in RAM (``mlockall``) whenever the process may do so, e.g. as root in a container. A simulator must not:
    locking made every thread stack and malloc arena resident (1.5-3 GB for the twin or the shadow instead of a few
    hundred MB) and real-time threads compete unfairly with everything else on a shared machine. Returns True if
    the capabilities were dropped (False where there is nothing to drop or no capget/capset).
    """
    if not sys.platform.startswith("linux"):
        return False

    class _Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class _Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        hdr, data = _Header(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        if libc.capget(ctypes.byref(hdr), data) != 0:
            return False
        before = [(d.effective, d.permitted) for d in data]
        for bit in (_CAP_SYS_NICE, _CAP_IPC_LOCK):
            data[bit // 32].effective &= ~(1 << (bit % 32))
            data[bit // 32].permitted &= ~(1 << (bit % 32))
        if [(d.effective, d.permitted) for d in data] == before:
            return False
        return libc.capset(ctypes.byref(hdr), data) == 0
    except (AttributeError, OSError):
        return False


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default: ebs)")
    p.add_argument("--prefix", default=None, help="PV prefix of the machine (default: the profile's controls.prefix)")
    p.add_argument("--port", type=int, default=None, help="Channel Access server port (default: EPICS env / 5064)")
    p.add_argument("--interface", default=None,
                   help="serve on this address only, e.g. 127.0.0.1 (EPICS_CAS_INTF_ADDR_LIST)")
    p.add_argument("--pva", action="store_true", help="also serve the records over PV Access")
    p.add_argument("--pva-port", type=int, default=None, help="PV Access server port (with --pva)")
    p.add_argument("--realtime", action="store_true",
                   help="let EPICS use real-time priorities and lock memory (default: dropped; see docs/ioc.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def add_ioc_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the twin IOC."""
    _common(p)
    p.add_argument("--seed", type=int, default=1, help="error seed of the twin (default 1; -1 = ideal machine)")
    p.add_argument("--error-scale", type=float, default=None, help="multiplier on the profile's alignment errors")
    p.add_argument("--max-rate", type=float, default=50.0, help="highest publication rate [Hz] (default 50)")
    p.add_argument("--idle-rate", type=float, default=2.0,
                   help="republication rate [Hz] with fresh noise when nothing changes (default 2; 0 = off)")
    p.add_argument("--allow-faults", action="store_true",
                   help="serve the fault-injection PVs ({prefix}TWIN:CMD, TWIN:CMD-RESULT); off by default")
    p.add_argument("--autosave", metavar="FILE", default=None,
                   help="save every setpoint to FILE (JSON, atomic write) when it changes; restore it at start if "
                        "FILE exists")
    p.add_argument("--autosave-period", type=float, default=1.0,
                   help="seconds between autosave writes while setpoints change (default 1)")
    p.add_argument("--pv-list", metavar="FILE", default=None,
                   help="write every PV (name, record type, units, DESC, kind) to FILE at start: CSV with a header, "
                        "or PV names only, one per line, if FILE ends in .txt")


def add_shadow_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the digital shadow."""
    from .shadow import ShadowConfig

    d = ShadowConfig()
    _common(p)
    p.add_argument("--shadow-prefix", default=None, help="PV prefix of the shadow's PVs (default: {prefix}SHADOW:)")
    p.add_argument("--seed", type=int, default=-1,
                   help="error seed of the shadow's model (default -1: the design machine)")
    p.add_argument("--orbit-threshold", type=float, default=d.orbit_threshold,
                   help=f"rms orbit residual change [m] that raises the anomaly flag (default {d.orbit_threshold:g})")
    p.add_argument("--tune-threshold", type=float, default=d.tune_threshold,
                   help=f"tune residual change that raises the flag (default {d.tune_threshold:g})")
    p.add_argument("--readback-threshold", type=float, default=d.readback_threshold,
                   help=f"|readback - setpoint| [A] that raises the flag (default {d.readback_threshold:g})")
    p.add_argument("--hold", type=float, default=d.hold,
                   help=f"seconds a condition must last to raise or clear the flag (default {d.hold:g})")
    p.add_argument("--reference", choices=("start", "zero"), default=d.reference,
                   help="residuals are compared with those at start-up (default) or with zero")
    p.add_argument("--snapshot-period", type=float, default=d.snapshot_period,
                   help=f"seconds between Tiled snapshots (default {d.snapshot_period:g}; 0 = only on anomalies)")
    p.add_argument("--catalog-dir", default=None,
                   help="embedded Tiled catalogue to write snapshots to (default: the data layer's default)")
    p.add_argument("--tiled", default=None, help="Tiled server URI instead of an embedded catalogue")
    p.add_argument("--no-tiled", action="store_true", help="do not write snapshots")
    p.add_argument("--max-rate", type=float, default=d.max_rate, help="highest model update rate [Hz]")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="seconds to wait for the live machine's PVs")


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(0.5):
        pass


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def run_ioc(args: argparse.Namespace) -> int:
    """Serve a twin as an EPICS IOC until SIGTERM/SIGINT."""
    _logging(args.verbose)
    if not args.realtime:
        drop_realtime_privileges()
    configure_server_env(args.port, args.interface, args.pva_port)
    t0 = time.perf_counter()
    from ..profile import load_profile
    from ..twin import Twin
    from .autosave import AutosaveError, load, restore

    profile = load_profile(args.profile)
    saved, restored = None, "off"
    if not args.autosave_period > 0:
        print(f"error: --autosave-period must be > 0 s, got {args.autosave_period}", file=sys.stderr, flush=True)
        return 2
    if args.autosave:
        path = Path(args.autosave)
        if path.exists():
            try:
                saved = load(path, profile)  # checked before anything starts: a bad file stops the IOC here
            except AutosaveError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 2
        elif not path.parent.is_dir():
            print(f"error: --autosave {path}: folder {path.parent} does not exist; nothing was started",
                  file=sys.stderr, flush=True)
            return 2
        else:
            restored = f"new {path}"
    twin = Twin(profile, seed=None if args.seed is None or args.seed < 0 else args.seed,
                error_scale=args.error_scale)
    if saved is not None:
        restored = f"restored {restore(twin, saved)} setpoints from {args.autosave}"
    from softioc import asyncio_dispatcher, builder, softioc

    from .server import READY_MESSAGE, TwinIoc

    ioc = TwinIoc(twin, args.prefix, max_rate=args.max_rate, idle_rate=args.idle_rate,
                  allow_faults=args.allow_faults, autosave=args.autosave, autosave_period=args.autosave_period)
    n = ioc.build()
    if args.pv_list:
        ioc.write_pv_list(args.pv_list)
    builder.LoadDatabase()
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher, enable_pva=bool(args.pva))
    ioc.start()
    port = os.environ.get("EPICS_CA_SERVER_PORT", "5064")
    print(f"{READY_MESSAGE}: {twin.profile.name} prefix={ioc.prefix!r} seed={twin.seed} records={n} "
          f"ca_port={port} pva={'on' if args.pva else 'off'} faults={'on' if args.allow_faults else 'off'} "
          f"autosave={restored} start={time.perf_counter() - t0:.1f}s", flush=True)
    _wait_for_signal()
    ioc.stop()
    print("IOC stopped", flush=True)
    softioc.safeEpicsExit(0)
    return 0  # pragma: no cover - epicsExit does not return


def run_shadow(args: argparse.Namespace) -> int:
    """Run the digital shadow until SIGTERM/SIGINT."""
    _logging(args.verbose)
    if not args.realtime:
        drop_realtime_privileges()
    configure_server_env(args.port, args.interface, args.pva_port)
    from .shadow import ShadowConfig, serve_shadow

    cfg = ShadowConfig(
        orbit_threshold=args.orbit_threshold, tune_threshold=args.tune_threshold,
        readback_threshold=args.readback_threshold, hold=args.hold, reference=args.reference,
        snapshot_period=args.snapshot_period, max_rate=args.max_rate, connect_timeout=args.connect_timeout,
        catalog_dir=args.catalog_dir, tiled=args.tiled, write_tiled=not args.no_tiled)
    return serve_shadow(args.profile, prefix=args.prefix, shadow_prefix=args.shadow_prefix,
                        seed=None if args.seed is None or args.seed < 0 else args.seed, config=cfg,
                        pva=bool(args.pva))


def main(argv: list[str] | None = None) -> int:
    """``python -m acc_bluesky.ioc {serve,shadow} PROFILE ...``"""
    parser = argparse.ArgumentParser(prog="python -m acc_bluesky.ioc",
                                     description="The twin as an EPICS IOC, and the digital shadow.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a twin as an EPICS IOC")
    add_ioc_arguments(p)
    p.set_defaults(func=run_ioc)
    s = sub.add_parser("shadow", help="follow a live machine with a model and publish residuals")
    add_shadow_arguments(s)
    s.set_defaults(func=run_shadow)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
