"""Process entry point: ``acc-bluesky tango-server PROFILE`` and ``python -m acc_bluesky.tango``.

The server prints a line starting with ``Tango server ready`` (:data:`~acc_bluesky.tango.server.READY_MESSAGE`)
once its devices are served, and stops cleanly on SIGTERM or SIGINT (Tango's own signal handling ends its loop).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time

__all__ = ["add_arguments", "run_server", "main", "free_port"]


def free_port(interface: str = "127.0.0.1") -> int:
    """A TCP port free on ``interface`` now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((interface if interface not in ("", "0.0.0.0", "*") else "", 0))
        return int(s.getsockname()[1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the twin's Tango server (those of ``acc-bluesky ioc`` where they apply)."""
    p.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default: ebs)")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port of the device server (default: a free one, printed in the ready line)")
    p.add_argument("--interface", default="127.0.0.1",
                   help="serve on this address only (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--domain", default=None, help="Tango domain (default: the profile's controls.tango_domain)")
    p.add_argument("--seed", type=int, default=1, help="error seed of the twin (default 1; -1 = ideal machine)")
    p.add_argument("--error-scale", type=float, default=None, help="multiplier on the profile's alignment errors")
    p.add_argument("--allow-faults", action="store_true",
                   help="let the twin control device's Cmd command inject faults (tests, training)")
    p.add_argument("--max-rate", type=float, default=50.0, help="highest publication rate [Hz] (default 50)")
    p.add_argument("--idle-rate", type=float, default=2.0,
                   help="republication rate [Hz] with fresh noise when nothing changes (default 2; 0 = off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (and Tango at level 4)")


def run_server(args: argparse.Namespace) -> int:
    """Serve a twin as Tango devices until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    t0 = time.perf_counter()
    from ..twin import Twin
    from .server import READY_MESSAGE, TwinTangoServer

    twin = Twin(args.profile, seed=None if args.seed is None or args.seed < 0 else args.seed,
                error_scale=args.error_scale)
    server = TwinTangoServer(twin, args.domain, allow_faults=args.allow_faults, max_rate=args.max_rate,
                             idle_rate=args.idle_rate)
    interface = args.interface or "127.0.0.1"
    port = args.port if args.port else free_port(interface)

    def ready() -> None:
        print(f"{READY_MESSAGE}: {twin.profile.name} domain={server.domain!r} seed={twin.seed} "
              f"devices={server.n_devices} attributes={server.n_attributes} address={interface}:{port} "
              f"faults={'on' if server.allow_faults else 'off'} start={time.perf_counter() - t0:.1f}s", flush=True)

    server.serve(port, interface, on_ready=ready, verbose=args.verbose)
    print("Tango server stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m acc_bluesky.tango PROFILE ...``"""
    parser = argparse.ArgumentParser(prog="python -m acc_bluesky.tango",
                                     description="Serve the twin as Tango devices without a Tango database.")
    add_arguments(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
