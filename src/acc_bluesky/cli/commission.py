"""``acc-bluesky commission PROFILE --seeds 1-8 [--workers 2 | --address tcp://...]``: a Dask campaign."""

from __future__ import annotations

import argparse
import json

import numpy as np

__all__ = ["add_parser", "parse_seeds"]


def parse_seeds(text: str) -> list[int]:
    """``"1-4,7,9-10"`` -> [1, 2, 3, 4, 7, 9, 10]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"seed range {part!r}: end before start")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError("no seed given")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("commission", help="virtual commissioning of many error seeds on Dask")
    p.add_argument("profile", nargs="?", default="ebs")
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("1-4"), help="e.g. 1-8 or 1,3,5 (default 1-4)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument("--address", help="scheduler address of an existing Dask cluster (instead of a LocalCluster)")
    p.add_argument("--json", help="write the per-seed results to this JSON file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..commissioning import run_campaign

    res = run_campaign(args.profile, args.seeds, address=args.address, n_workers=args.workers, progress=True)
    print(f"{'seed':>5s} {'x before':>10s} {'x after':>9s} {'y before':>10s} {'y after':>9s}  [um rms, truth]")
    for r in res:
        flag = "  BEAM LOST" if r["beam_lost"] else ""
        print(f"{r['seed']:5d} {r['orbit_x_before'] * 1e6:10.1f} {r['orbit_x_after'] * 1e6:9.1f} "
              f"{r['orbit_y_before'] * 1e6:10.1f} {r['orbit_y_after'] * 1e6:9.1f}{flag}")
    ok = [r for r in res if not r["beam_lost"]]
    if ok:
        print(f"median after: x {np.median([r['orbit_x_after'] for r in ok]) * 1e6:.1f} um, "
              f"y {np.median([r['orbit_y_after'] for r in ok]) * 1e6:.1f} um over {len(ok)} seeds")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0
