"""``acc-bluesky shadow PROFILE``: follow a live machine with a model; publish predictions, residuals, anomalies."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from ..ioc.app import add_shadow_arguments

    p = sub.add_parser(
        "shadow", help="digital shadow of a live machine",
        description="Follow the live setpoints through EPICS monitors into a model, publish the model's orbit and "
                    "tunes, the residuals (measured - model) and an anomaly flag as PVs on the shadow prefix, "
                    "and write snapshots to Tiled. Stops on SIGTERM/Ctrl-C.")
    add_shadow_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..ioc.app import run_shadow

    return run_shadow(args)
