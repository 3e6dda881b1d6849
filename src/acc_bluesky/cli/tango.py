"""``acc-bluesky tango-server PROFILE``: serve the twin as Tango devices without a Tango database."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from ..tango.app import add_arguments

    p = sub.add_parser(
        "tango-server", help="serve the twin as Tango devices (no Tango database)",
        description="Serve a twin as Tango devices: power supplies, families, BPMs, orbit, RF, tune monitor and beam "
                    "current named by the profile's Tango templates, plus {domain}/twin/control for faults. Reach it "
                    "with connect(profile, mode='tango', address='HOST:PORT'). Stops on SIGTERM/Ctrl-C.")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..tango.app import run_server

    return run_server(args)
