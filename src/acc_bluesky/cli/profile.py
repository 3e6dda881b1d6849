"""``acc-bluesky profile new LATTICE_FILE [-o DIR]`` and ``profile show NAME``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="create or inspect facility profiles")
    ps = p.add_subparsers(dest="profile_command", metavar="ACTION")
    new = ps.add_parser("new", help="write a working profile for a pyAT lattice file")
    new.add_argument("lattice", help="lattice file (.m, .mat, .json, .seq, ... anything pyAT loads)")
    new.add_argument("-o", "--output", help="output folder (default: ./<lattice name>)")
    new.add_argument("--name", help="profile name (default: from the file name)")
    new.add_argument("--facility", help="facility name")
    new.add_argument("--kind", choices=["ring", "line"], help="override the ring/line guess")
    new.set_defaults(func=_new)
    show = ps.add_parser("show", help="validate a profile and list its families")
    show.add_argument("profile", help="profile name or path")
    show.set_defaults(func=_show)
    ls = ps.add_parser("list", help="list the profiles on the search path")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _new(args: argparse.Namespace) -> int:
    from ..profile.generate import write_profile
    from ..profile.loader import ProfileError

    try:
        path = write_profile(args.lattice, args.output, name=args.name, facility=args.facility, kind=args.kind)
    except (ProfileError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - pyAT's reader: AtError, KeyError... on a malformed file
        print(f"error: could not read the lattice {args.lattice}: {type(err).__name__}: {err}. Is it a pyAT lattice "
              "(.m, .mat, .json, .lat...) whose elements all have a Class?", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..profile import ProfileError, load_profile

    try:
        p = load_profile(args.profile)
        fams = p.families
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{p.name}: {p.facility} {p.accelerator} ({p.kind}), {p.energy / 1e9:g} GeV, lattice {p.lattice_path}")
    print(f"  {len(p.bpm_refpts)} BPMs")
    for n, f in fams.items():
        print(f"  {n:10s} {f.spec.type:11s} {len(f):4d} x {f.spec.field:13s} {f.spec.calibration.kind}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..profile import available_profiles

    print("\n".join(available_profiles()))
    return 0
