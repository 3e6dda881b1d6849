"""``acc-bluesky catalog serve|recover|replay|export|ls``: the Tiled catalogue from the command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser", "main"]


def _open(args: argparse.Namespace) -> Any:
    from acc_bluesky.data import open_catalog

    return open_catalog(tiled=args.tiled, api_key=args.api_key, catalog_dir=args.dir)


def _serve(args: argparse.Namespace) -> int:
    from acc_bluesky.data.catalog import default_catalog_dir
    from acc_bluesky.data.server import ServerKeyError, serve_catalog

    try:
        serve_catalog(
            args.dir if args.dir is not None else default_catalog_dir(),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            read_only_keys=args.read_only_key or (),
            database=args.database,
            log_level=args.log_level,
            on_demand=args.on_demand,
            idle_timeout=args.idle_timeout,
            ready_fd=args.ready_fd,
        )
    except (ServerKeyError, ValueError) as err:
        print(f"acc-bluesky catalog serve: {err}", file=sys.stderr)
        return 2
    return 0


def _recover(args: argparse.Namespace) -> int:
    from acc_bluesky.data import CatalogUnavailableError, recover_catalog

    try:
        report = recover_catalog(args.dir, tiled=args.tiled, api_key=args.api_key, backup_dir=args.backup_dir)
    except CatalogUnavailableError as err:
        print(f"acc-bluesky catalog recover: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    for uid in report.closed:
        print(f"  closed {uid} (exit_status fail: the session ended without closing it)")
    for uid, why in report.failed.items():
        print(f"  failed {uid}: {why}", file=sys.stderr)
    return 0 if not report.failed else 1


def _replay(args: argparse.Namespace) -> int:
    from acc_bluesky.data import CatalogUnavailableError, replay_backup

    try:
        cat = _open(args)
    except CatalogUnavailableError as err:
        print(f"acc-bluesky catalog replay: {err}", file=sys.stderr)
        return 1
    report = replay_backup(args.backup_dir, cat, move=not args.keep)
    print(report.summary())
    for uid, why in report.failed.items():
        print(f"  failed {uid}: {why}", file=sys.stderr)
    return 0 if report.ok else 1


def _export(args: argparse.Namespace) -> int:
    from acc_bluesky.data import CatalogUnavailableError, export_run

    try:
        cat = _open(args)
        run = cat[args.uid]
    except CatalogUnavailableError as err:
        print(f"acc-bluesky catalog export: {err}", file=sys.stderr)
        return 1
    except (KeyError, ValueError) as err:
        print(f"acc-bluesky catalog export: no run {args.uid!r} ({err})", file=sys.stderr)
        return 1
    for path in export_run(run, args.path, streams=args.stream or None, format=args.format):
        print(path)
    return 0


def _ls(args: argparse.Namespace) -> int:
    from acc_bluesky.data import CatalogUnavailableError, find_runs

    try:
        cat = _open(args)
    except CatalogUnavailableError as err:
        print(f"acc-bluesky catalog ls: {err}", file=sys.stderr)
        return 1
    runs = find_runs(cat, tool=args.tool, facility=args.facility, profile=args.profile, mode=args.mode,
                     since=args.since, until=args.until)
    items = list(runs.items().tail(args.limit)) if args.limit else list(runs.items())
    for uid, run in items:
        start = run.metadata.get("start", {})
        stop = run.metadata.get("stop") or {}
        when = _dt.datetime.fromtimestamp(start.get("time", 0)).isoformat(sep=" ", timespec="seconds")
        print(
            f"{uid}  {when}  {start.get('tool', '-'):<20} {start.get('facility', '-')}/"
            f"{(start.get('profile') or {}).get('name', '-')}  {start.get('mode', '-'):<5} "
            f"{stop.get('exit_status', 'open')}"
        )
    return 0


def _add_catalog_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help="catalogue folder (default $ACC_BLUESKY_CATALOG or the user data "
                   "folder); its local server is started if none runs")
    p.add_argument("--tiled", default=None, help="URI of a Tiled server instead of a catalogue folder")
    p.add_argument("--api-key", default=None, help="API key of the Tiled server (default $TILED_API_KEY)")


def add_parser(subparsers: Any) -> None:
    """Register ``catalog`` and its sub-commands on an argparse ``subparsers`` object."""
    cat = subparsers.add_parser("catalog", help="the Tiled catalogue of runs: serve, recover, replay, export, ls")
    sub = cat.add_subparsers(dest="catalog_command", required=True)

    p = sub.add_parser("serve", help="serve a catalogue folder over HTTP with a real Tiled server")
    p.add_argument("--dir", default=None, help="catalogue folder (default $ACC_BLUESKY_CATALOG or the user "
                   "data folder)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free one, printed)")
    p.add_argument("--api-key", default=None, help="read-write API key (default $TILED_SINGLE_USER_API_KEY "
                   "or a random one, printed)")
    p.add_argument("--read-only-key", action="append", default=None, metavar="KEY",
                   help="a read-only API key for analysts (repeatable; hexadecimal keys)")
    p.add_argument("--database", default=None, metavar="URI",
                   help="postgresql://user@host:port/db holding the runs' tree and event tables (team scale; "
                   "arrays stay in DIR/data); default the folder's SQLite files")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.add_argument("--on-demand", action="store_true", help=argparse.SUPPRESS)  # the local server of a folder
    p.add_argument("--idle-timeout", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_serve)

    p = sub.add_parser("recover", help="complete the runs of sessions that died, from their write-ahead logs "
                       "(closed with exit_status fail)")
    _add_catalog_options(p)
    p.add_argument("--backup-dir", default=None, help="with --tiled: the backup folder whose wal/ holds the logs "
                   "(default $ACC_BLUESKY_BACKUP or the user data folder)")
    p.set_defaults(func=_recover)

    p = sub.add_parser("replay", help="write runs backed up while Tiled was unreachable into the catalogue")
    p.add_argument("backup_dir", help="the backup folder (one .jsonl file per run)")
    _add_catalog_options(p)
    p.add_argument("--keep", action="store_true", help="leave replayed files in place (default: move them "
                   "to BACKUP_DIR/replayed/)")
    p.set_defaults(func=_replay)

    p = sub.add_parser("export", help="export a run to HDF5 (NeXus-like) or CSV")
    p.add_argument("uid", help="run uid (or a unique prefix of at least 5 characters)")
    p.add_argument("path", help="output file: .h5/.hdf5/.nxs for HDF5, .csv for CSV (one file per stream)")
    p.add_argument("--stream", action="append", default=None, help="stream to export (repeatable; default all)")
    p.add_argument("--format", choices=["hdf5", "csv"], default=None, help="override the file extension")
    _add_catalog_options(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("ls", help="list runs, optionally filtered")
    _add_catalog_options(p)
    p.add_argument("--tool", default=None)
    p.add_argument("--facility", default=None)
    p.add_argument("--profile", default=None)
    p.add_argument("--mode", default=None, choices=["sim", "epics"])
    p.add_argument("--since", default=None, help="ISO date/time, e.g. 2025-01-31 or 2025-01-31T08:00")
    p.add_argument("--until", default=None, help="ISO date/time")
    p.add_argument("--limit", type=int, default=20, help="show the last N runs (0: all; default 20)")
    p.set_defaults(func=_ls)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``catalog`` sub-commands alone: ``python -m acc_bluesky.cli.catalog serve ...``."""
    parser = argparse.ArgumentParser(prog="acc-bluesky")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
