"""The ``acc-bluesky`` command: demo, shell, ioc, shadow, queue, profile, catalog."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

#: Subcommand modules; each has ``add_parser(subparsers)`` setting ``func(args) -> int``.
SUBCOMMANDS = ("demo", "profile", "shell", "catalog", "ioc", "shadow", "queue", "commission", "twin")
SUBCOMMANDS += ("tango",)  # tango: acc-bluesky tango-server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acc-bluesky",
        description="Accelerator middle layer and pyAT digital twin on Bluesky: tools, twin, IOC, queue, catalogue.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
