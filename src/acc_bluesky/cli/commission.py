"""``acc-bluesky commission PROFILE --seeds 1-20 [--sequence FILE] [--workers N | --address tcp://...]``: a
virtual commissioning campaign of the real tool plans on Dask; a summary table (success rate per step) and PNG
histograms/CDFs of the truth figures."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "parse_seeds"]


def parse_seeds(text: str) -> list[int]:
    """``"1-4,7,9-10"`` -> [1, 2, 3, 4, 7, 9, 10]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise argparse.ArgumentTypeError(f"seed range {part!r}: end before start")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds: {part!r} is not a seed or a range (e.g. 1-8,12)") from None
    if not out:
        raise argparse.ArgumentTypeError("no seed given")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"seeds repeat in {text!r}")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("commission", help="virtual commissioning campaign: a sequence of tool plans over error "
                                          "seeds on Dask")
    p.add_argument("profile", nargs="?", default="ebs")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 1-8 or 1,3,5 (default 1-4)")
    p.add_argument("--sequence", help="sequence YAML file (default: the profile's sequence.yaml)")
    p.add_argument("--error-scale", type=float, default=None, help="multiplier on the profile's alignment errors")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    where.add_argument("--address", help="scheduler address of a running Dask cluster (tcp://host:8786)")
    p.add_argument("--catalog", help="catalogue folder or Tiled URI (default $ACC_BLUESKY_CATALOG, else yours)")
    p.add_argument("--resume", metavar="UID", help="resume campaign UID: run only its seeds without a record")
    p.add_argument("--out", default="acc_bluesky_campaign", help="folder of the PNG figures and summary.json")
    p.add_argument("--check", action="store_true", help="only validate the sequence and print it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..commissioning import SequenceError, load_sequence, run_campaign
    from ..commissioning.sequence import default_sequence_path

    try:
        seq = load_sequence(args.sequence or default_sequence_path(args.profile), args.profile) \
            if (args.sequence or not args.resume) else None
    except SequenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if seq is not None:
        print(seq)
        for s in seq.skipped:
            print(f"note: step {s.id} skipped: {s.skip}")
    if args.check:
        return 0
    seeds = args.seeds if args.seeds is not None else (None if args.resume else parse_seeds("1-4"))
    res = run_campaign(args.profile, seeds, seq, error_scale=args.error_scale, n_workers=args.workers,
                       address=args.address, catalog=args.catalog, resume=args.resume,
                       progress=not args.no_progress)
    print(res.table())
    out = Path(args.out)
    paths = res.plot(out)
    summary = {"campaign": res.uid, "profile": res.profile, "seeds": res.seeds, "missing": res.missing,
               "success_rate": {sid: res.success_rate(sid) for sid in res.step_ids},
               "results": {str(s): r.as_dict() for s, r in res.results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"figures: {', '.join(str(p) for p in paths)}")
    print(f"read it back: CampaignResult.from_catalog({res.uid!r}); resume: acc-bluesky commission "
          f"{args.profile} --resume {res.uid}")
    return 0 if not res.missing else 1
