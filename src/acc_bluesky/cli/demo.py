"""``acc-bluesky demo``: a virtual commissioning of the default ring on the embedded defaults."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="virtual commissioning of the default ring (twin with errors, embedded Tiled)")
    p.add_argument("--profile", default="ebs", help="profile name or path (default: ebs)")
    p.add_argument("--seed", type=int, default=1, help="error seed (default: 1)")
    p.add_argument("--error-scale", type=float, default=None,
                   help="multiply the profile's alignment error table (1.0: all of it; the demo threads the first "
                        "turns where no closed orbit exists). Default: the profile's errors.scale")
    p.add_argument("--full", action="store_true",
                   help="also beam-based alignment of every BPM and an orbit correction to the golden orbit")
    p.add_argument("--catalog-dir", help="embedded Tiled catalogue folder (default: your user data folder)")
    p.add_argument("--out", default="acc_bluesky_demo", help="folder for the PNG figures (default: ./acc_bluesky_demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..commissioning import run_demo

    try:
        res = run_demo(args.profile, args.seed, catalog_dir=args.catalog_dir, out_dir=args.out,
                       progress=not args.no_progress, error_scale=args.error_scale, full=args.full)
    except Exception as err:  # noqa: BLE001 - the demo reports, it does not dump a traceback on users
        print(f"demo failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    print()
    print(f"Virtual commissioning of {res.profile!r}, error seed {res.seed}: done in {res.seconds['total']:.0f} s")
    print(res.table())
    print("\nRuns in the Tiled catalogue" + (f" ({args.catalog_dir})" if args.catalog_dir else "") + ":")
    for step, uid in res.uids.items():
        print(f"  {step:22s} {uid}   ({res.seconds[step]:.1f} s)")
    cat_arg = f"catalog_dir={args.catalog_dir!r}" if args.catalog_dir else ""
    orm = res.uids.get("orbit_response", "UID")
    print("\nLoad them back, e.g. in Python:")
    print(f"  import acc_bluesky as ab\n  cat = ab.open_catalog({cat_arg})\n"
          f"  resp = ab.analysis.OrbitResponse.from_run(cat[{orm!r}])")
    print("\nFigures:")
    for name, path in res.figures.items():
        print(f"  {name:14s} {path}")
    return 0
