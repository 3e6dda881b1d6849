"""The ``acc-bluesky`` command: demo, shell, ioc, shadow, queue, profile, catalog."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

#: Subcommand modules; each has ``add_parser(subparsers)`` setting ``func(args) -> int``.
SUBCOMMANDS = ("demo", "profile", "shell", "catalog", "ioc", "shadow", "queue", "commission", "twin")
SUBCOMMANDS += ("tango",)  # tango: acc-bluesky tango-server


#: Commands whose name is not their module's
_COMMAND_MODULES = {"tango-server": "tango"}


def _module_of(argv: list[str]) -> str | None:
    """The subcommand module of ``argv``'s command (its first word), or None (no command, an option such as
    ``--help``, or an unknown word: then the whole parser is built, to list the commands)."""
    if not argv or argv[0].startswith("-"):
        return None
    name = _COMMAND_MODULES.get(argv[0], argv[0])
    return name if name in SUBCOMMANDS else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``acc-bluesky`` parser; ``only``: register that subcommand module alone (what :func:`main` does for a
    command line that names a command: the other modules' parsers import the twin, pyAT or the IOC, seconds that a
    ``catalog`` or ``queue`` command does not need)."""
    parser = argparse.ArgumentParser(
        prog="acc-bluesky",
        description="Accelerator middle layer and pyAT digital twin on Bluesky: tools, twin, IOC, queue, catalogue.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS if only is None else (only,):
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_module_of(argv))
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
