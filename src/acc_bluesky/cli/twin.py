"""``acc-bluesky twin PROFILE``: print a summary of the twin (errors, orbit, tunes, chromaticity)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("twin", help="print a summary of the simulated machine")
    p.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default: ebs)")
    p.add_argument("--seed", type=int, default=1, help="error seed (default 1; -1 = ideal machine)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..twin import Twin

    twin = Twin(args.profile, seed=None if args.seed < 0 else args.seed)
    print(twin.summary())
    return 0
