"""``acc-bluesky ioc PROFILE``: serve the twin as a live EPICS IOC (Channel Access; PV Access with ``--pva``)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from ..ioc.app import add_ioc_arguments

    p = sub.add_parser(
        "ioc", help="serve the twin as an EPICS IOC",
        description="Serve a twin as an EPICS IOC: magnets, BPMs, orbit, RF, tunes and beam on PVs named by the "
                    "profile's templates, with units, DESC, ranges and alarm limits; refused puts fail at the client. "
                    "--autosave keeps the setpoints across restarts, --pv-list writes every PV for the archiver, the "
                    "alarm server and Phoebus, --allow-faults adds {prefix}TWIN:CMD to drive anomalies. "
                    "Stops on SIGTERM/Ctrl-C.")
    add_ioc_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..ioc.app import run_ioc

    return run_ioc(args)
