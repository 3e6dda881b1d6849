"""``acc-bluesky profile new LATTICE [-o DIR]``, ``profile check PROFILE``, ``profile show NAME``, ``profile list``.

``profile new`` writes a profile for any lattice (:mod:`acc_bluesky.profile.generate`), sizes its alignment errors to
the machine (the twin's closed-orbit search over seeds, :func:`acc_bluesky.twin.errors.closed_orbit_scale`) and
prints the report of :func:`acc_bluesky.profile.check.check_profile`; ``profile check`` prints the same report for
any profile. Both exit non-zero when the profile cannot drive the tools.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "make_profile", "report_profile"]


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="create, check or inspect facility profiles")
    ps = p.add_subparsers(dest="profile_command", metavar="ACTION")
    new = ps.add_parser("new", help="write a working profile for a lattice file, with its report")
    new.add_argument("lattice", help="lattice file (.mat, .m, .json, MAD-X .seq/.madx, elegant .lte, Tracy .lat)")
    new.add_argument("-o", "--output", help="output folder (default: ./<lattice name>)")
    new.add_argument("--name", help="profile name (default: from the file name)")
    new.add_argument("--facility", help="facility name")
    new.add_argument("--kind", choices=["ring", "line"], help="override the ring/line guess")
    new.add_argument("--twiss-in", nargs="+", metavar="KEY=V1,V2",
                     help="line entrance optics: beta=BX,BY alpha=AX,AY [dispersion=D,DP,0,0] (or a YAML file)")
    new.add_argument("--energy", type=float, help="beam energy [eV] when the file has none")
    new.add_argument("--use", help="the sequence/line/variable of the file to use")
    new.add_argument("--format", dest="lattice_format", help="lattice format when the extension does not say it")
    new.add_argument("--no-strict", dest="strict", action="store_false",
                     help="MAD-X: undefined variables are 0 (as MAD-X does)")
    new.add_argument("--steer-quadrupoles", action="store_true", help="also use kick windings in the quadrupoles")
    new.add_argument("--seeds", type=int, default=5, help="seeds of the error-scale search (default 5; 0: no search)")
    new.set_defaults(func=_new)
    chk = ps.add_parser("check", help="validate a profile and print what the tools will see")
    chk.add_argument("profile", help="profile name or path")
    chk.add_argument("--seed", type=int, default=1, help="seed of the closed-orbit check (default 1)")
    chk.set_defaults(func=_check)
    show = ps.add_parser("show", help="validate a profile and list its families")
    show.add_argument("profile", help="profile name or path")
    show.set_defaults(func=_show)
    ls = ps.add_parser("list", help="list the profiles on the search path")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def make_profile(lattice: str | Path, output: str | Path | None = None, *, seeds: int = 5, **kw: Any):
    """Generate, size the errors of, write and report a profile: ``(path, report)``.

    ``kw`` go to :func:`acc_bluesky.profile.generate.generate_profile` (``name``, ``facility``, ``kind``, ``energy``,
    ``use``, ``strict``, ``lattice_format``, ``twiss_in``, ``steer_quadrupoles``)."""
    from ..profile import load_profile
    from ..profile.generate import _safe, generate_profile, write_profile
    from ..twin.errors import check_closed_orbit, closed_orbit_scale

    lattice = Path(lattice)
    name = kw.pop("name", None) or _safe(lattice.stem).lower()
    facility = kw.pop("facility", None)
    out = Path(output) if output else Path.cwd() / name
    out.mkdir(parents=True, exist_ok=True)
    from ..profile.lattice_io import read_lattice

    opts = {} if kw.get("strict", True) else {"strict": False}
    ring = read_lattice(lattice, energy=kw.get("energy"), use=kw.get("use"), format=kw.get("lattice_format"), **opts)
    prof = generate_profile(lattice, name=name, facility=facility, relative_to=out, lattice=ring, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        design = _design_copy(ring, prof)
        path = write_profile(lattice, out, name=name, profile=prof, design_lattice=design)
        profile = load_profile(path)
        orbit = None
        if seeds > 0 and prof["errors"]["scale"] > 0:  # scale 0: the file carries its own errors
            halved = 0
            while True:
                search = closed_orbit_scale(profile, seeds=range(1, seeds + 1))
                usable = search.scale > 0 and 1 not in search.excluded  # (seed 1: connect's default)
                if usable or halved >= 4 or check_closed_orbit(profile, 1, 0.0).found:
                    break  # (alignment is the cause when the field errors alone keep a closed orbit)
                halved += 1  # the field errors alone leave no closed orbit: halve them
                for m in prof["errors"]["magnets"]:
                    m["field"] = float(f"{m['field'] / 2:.2g}")
                path = write_profile(lattice, out, name=name, profile=prof)
                profile = load_profile(path)
            prof["errors"]["scale"] = search.scale
            note = search.describe()
            if halved:
                note += (f"; the field errors were halved {halved} time(s): at the class table seed 1 had no closed "
                         "orbit with its field errors alone")
            prof["generated"]["errors"] = note
            ring = profile._design_lattice  # the same lattice file: not read a third time
            path = write_profile(lattice, out, name=name, profile=prof, design_lattice=ring)
            profile = load_profile(path)
            orbit = search.check
            known = {next(s for s in search.seeds if s not in search.excluded): orbit}
        else:
            orbit = check_closed_orbit(profile, 1)
            known = {1: orbit}
        size = _size_correctors(profile, prof, seeds=(1, 2, 3), known=known)
        if size:
            prof["generated"]["notes"].append(size)
            ring = profile._design_lattice
            path = write_profile(lattice, out, name=name, profile=prof, design_lattice=ring)
            profile = load_profile(path)
    return path, report_profile(profile, orbit)


def _size_correctors(profile, prof: dict, seeds=(1, 2, 3), margin: float = 2.0, known: dict | None = None) -> str:
    """Raise the corrector limits of ``prof`` to ``margin`` x the largest kick a correction of the default errors
    needs (seeds ``seeds``); returns the note, or "" when the generator's limits are enough. ``known``: seed ->
    its :class:`OrbitCheck` at the profile's errors, already computed (not solved again)."""
    import numpy as np

    from ..profile.generate import corrector_kicks_needed, kick_response
    from ..twin.errors import check_closed_orbit

    if not profile.families_of_type("hcor", "vcor"):
        return ""
    orbits = []
    for seed in seeds:
        c = (known or {}).get(seed) or check_closed_orbit(profile, seed)
        if c.found:
            orbits.append((c.x, c.y))
    if not orbits:
        return ""
    resp, rows = kick_response(profile)
    need = corrector_kicks_needed(resp, orbits)
    raised = []
    for fam in dict.fromkeys(f for f, _ in rows):
        spec = prof["families"][fam]
        cal = float(spec["calibration"]["linear"])
        want = margin * float(max(need[k] for k, (f, _) in enumerate(rows) if f == fam)) / abs(cal)
        lim = float(spec["limits"][1])
        if want > lim:
            new = float(np.ceil(want / 10.0) * 10.0)
            spec["limits"] = [-new, new]
            raised.append(f"{fam} +-{new:g} A ({new * abs(cal) * 1e3:.2g} mrad)")
    if not raised:
        return ""
    return (f"corrector limits raised to {margin:g}x the largest kick a correction of the default errors needs "
            f"(seeds {seeds[0]}-{seeds[-1]}): {', '.join(raised)}")


def _design_copy(ring, prof: dict):
    """The profile's design lattice from the ring read by the generator: its energy, 4D unless asked 6D."""
    r = ring.deepcopy()
    r.energy = float(prof["energy"])
    if prof.get("orbit_model", "4d") == "4d" and r.is_6d:
        r.disable_6d()
    return r


def report_profile(profile, orbit=None, seed: int = 1):
    """The :class:`~acc_bluesky.profile.check.ProfileReport` of a loaded profile (closed orbit of ``seed``)."""
    from ..profile.check import check_profile
    from ..twin.errors import check_closed_orbit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if orbit is None:
            orbit = check_closed_orbit(profile, seed)
        return check_profile(profile, orbit, seed)


def _new(args: argparse.Namespace) -> int:
    from ..profile.generate import parse_twiss_in
    from ..profile.lattice_io import LatticeFileError
    from ..profile.loader import ProfileError

    try:
        twiss = parse_twiss_in(args.twiss_in) if args.twiss_in else None
        path, rep = make_profile(args.lattice, args.output, name=args.name, facility=args.facility, kind=args.kind,
                                 energy=args.energy, use=args.use, strict=args.strict,
                                 lattice_format=args.lattice_format, twiss_in=twiss,
                                 steer_quadrupoles=args.steer_quadrupoles, seeds=args.seeds)
    except (ProfileError, LatticeFileError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - pyAT's reader: AtError, KeyError... on a malformed file
        print(f"error: could not read the lattice {args.lattice}: {type(err).__name__}: {err}. Is it a pyAT lattice "
              "(.m, .mat, .json, .lat...) whose elements all have a Class?", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    print(rep.text())
    return 0 if rep.usable else 1


def _check(args: argparse.Namespace) -> int:
    from ..profile import ProfileError, load_profile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = load_profile(args.profile)
        rep = report_profile(p, seed=args.seed)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(rep.text())
    return 0 if rep.usable else 1


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
