"""``acc-bluesky shell [PROFILE] [--mode sim|epics] [--seed N]``: an IPython RunEngine session.

The namespace (:func:`build_namespace`) holds ``RE`` (runs recorded in Tiled, progress bars), ``m`` (the
machine), ``ap`` (the plans, ``acc_bluesky.plans``), ``cat`` (the catalogue), ``bec`` (bluesky's
BestEffortCallback: live tables, and plots when there is a display), ``bp``/``bps``/``bpp`` (bluesky's plans,
stubs and preprocessors), ``np`` and the data helpers (``find_runs``, ``read_results``, ``read_stream``...).

IPython and asyncio: the RunEngine runs its plans on its own event loop in a background thread (bluesky's
default), and ophyd-async devices are connected on that loop; IPython's ``autoawait`` only runs top-level
``await`` cells on the main thread, and ``RE(...)`` blocks the main thread (running the Qt event loop when
matplotlib uses Qt, via bluesky's default ``during_task``), so the two never share a loop.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser", "build_namespace", "has_display", "main"]

_BANNER = """acc-bluesky session: RE (RunEngine -> Tiled), m (machine), ap (plans), cat (catalogue), bec
  uid = RE(ap.measure_orm(m))          plans return their run uid; cat[uid] reads it back
  RE(bp.count([m.bpm, m.tune], 5))     bluesky's own plans are recorded with the machine's FAIR metadata
  RE(bps.mv(m.hcor["HST_004"].strength, 1e-5))   set in physics units (rad); m.device("BPM_005")
"""


def has_display() -> bool:
    """True if plots can open windows (a graphical session)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def build_namespace(
    profile: str | None = "ebs",
    mode: str = "sim",
    seed: int | None = None,
    *,
    machine: bool = True,
    tiled: str | None = None,
    api_key: str | None = None,
    catalog_dir: str | os.PathLike | None = None,
    plots: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The user namespace of an interactive session.

    Args:
        profile: profile name or path of a ``profile.yaml`` (``acc_bluesky.load_profile``).
        mode: ``"sim"`` (the twin) or ``"epics"`` (live PVs).
        seed: error seed of the twin (sim mode).
        machine: connect the machine (``m``); False gives ``m = None`` (catalogue/analysis sessions).
        tiled, api_key, catalog_dir: where runs go (see :func:`acc_bluesky.data.make_run_engine`).
        plots: live plots of BestEffortCallback; default: only with a display.
        progress: bluesky progress bars.

    Returns:
        The namespace: ``RE``, ``m``, ``ap``, ``cat``, ``bec`` and helpers.
    """
    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    import bluesky.preprocessors as bpp
    import numpy as np
    from bluesky.callbacks.best_effort import BestEffortCallback

    from acc_bluesky import data

    # The RunEngine first: ophyd-async devices connect on the event loop it starts.
    RE = data.make_run_engine(tiled=tiled, api_key=api_key, catalog_dir=catalog_dir, progress=progress)
    bec = BestEffortCallback()
    if plots is None:
        plots = has_display()
    if not plots:
        bec.disable_plots()
    bec.disable_table()  # the live table with units instead (arrays as their rms)
    RE.subscribe(bec)
    RE.subscribe(data.LiveReadings())
    # Orbits are arrays: the live table shows the scalars and says once per key that it skips arrays. Quiet.
    warnings.filterwarnings("ignore", message=r"The key .* will be skipped because LiveTable")
    cat = RE.catalog  # the same catalogue the runs go to

    ns: dict[str, Any] = {
        "RE": RE,
        "bec": bec,
        "cat": cat,
        "m": None,
        "bp": bp,
        "bps": bps,
        "bpp": bpp,
        "np": np,
        "find_runs": data.find_runs,
        "read_results": data.read_results,
        "read_stream": data.read_stream,
        "run_metadata": data.run_metadata,
        "export_run": data.export_run,
        "tool_metadata": data.tool_metadata,
    }
    try:
        ns["ap"] = ns["plans"] = importlib.import_module("acc_bluesky.plans")
    except ImportError as err:
        if machine:
            raise
        print(f"acc-bluesky shell: plans not available ({err})", file=sys.stderr)
    if machine:
        import acc_bluesky as ab

        m = ab.connect(ab.load_profile(profile), mode=mode, seed=seed)
        ns["m"] = m
        ns["ab"] = ab
        # Ad-hoc runs (bp.count, ...) then carry facility, profile, lattice, mode and seed; they add a tool.
        RE.md.update(data.metadata.machine_metadata(m))
    return ns


def _shell(args: argparse.Namespace) -> int:
    import IPython

    ns = build_namespace(
        args.profile,
        args.mode,
        args.seed,
        machine=not args.no_machine,
        tiled=args.tiled,
        api_key=args.api_key,
        catalog_dir=args.dir,
        plots=False if args.no_plots else None,
    )
    argv: list[str] = []
    if args.simple_prompt:
        argv += ["--simple-prompt", "--TerminalInteractiveShell.confirm_exit=False"]
    if not args.no_plots and has_display():
        argv.append("--matplotlib")
    if not args.quiet:
        print(_BANNER, flush=True)
    IPython.start_ipython(argv=argv, user_ns=ns)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``shell`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser("shell", help="IPython session with RE, the machine m, plans ap and catalogue cat")
    p.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default ebs)")
    p.add_argument("--mode", choices=["sim", "epics"], default="sim", help="twin or live PVs (default sim)")
    p.add_argument("--seed", type=int, default=None, help="error seed of the twin")
    p.add_argument("--no-machine", action="store_true", help="do not connect a machine (m = None)")
    p.add_argument("--no-plots", action="store_true", help="no live plots (tables only)")
    p.add_argument("--simple-prompt", action="store_true", help="plain prompt (pipes, Emacs, CI)")
    p.add_argument("--quiet", action="store_true", help="no banner")
    p.add_argument("--dir", default=None, help="embedded catalogue folder")
    p.add_argument("--tiled", default=None, help="URI of a Tiled server")
    p.add_argument("--api-key", default=None, help="API key of the Tiled server (default $TILED_API_KEY)")
    p.set_defaults(func=_shell)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m acc_bluesky.cli.shell [PROFILE] [options]``."""
    parser = argparse.ArgumentParser(prog="acc-bluesky")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["shell", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
