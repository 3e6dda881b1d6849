"""Startup code of an RE Manager worker (or an IPython session) for one profile.

``profiles/<name>/startup.py`` calls :func:`build_namespace`, which builds, in this order,

1. ``RE``: :func:`acc_bluesky.data.make_run_engine` (TiledWriter, FAIR metadata validator). It comes first: the
   RunEngine starts the bluesky event loop that the ophyd-async devices connect on;
2. ``m``: the machine, :func:`acc_bluesky.machine.connect` (sim twin or EPICS);
3. the queue plans of :func:`queue_plans` and the top-level devices (``bpm``, ``rf``, ``tune``, ``beam`` and
   every magnet family by name);
4. the queue function :func:`sim_fault` (sim mode: faults of the twin for rehearsals).

Settings come from arguments, else from the environment that ``acc-bluesky queue start`` sets:
``ACC_BLUESKY_PROFILE``, ``ACC_BLUESKY_MODE`` (sim/epics), ``ACC_BLUESKY_SEED`` (int or ``none``),
``ACC_BLUESKY_PREFIX`` (epics: the PV prefix, default the profile's), ``ACC_BLUESKY_TANGO_ADDRESS`` (tango: the
device server's host:port, else the database of ``$TANGO_HOST``),
and the data layer's ``ACC_BLUESKY_CATALOG`` (an embedded catalogue folder or a Tiled server URI; API key from
``TILED_API_KEY``).

The tool plans take a :class:`~acc_bluesky.machine.Machine`, which a queue item cannot name. The queue plans are
thin wrappers that bind the machine and expose only JSON-friendly, typed parameters (numbers, strings, lists of
corrector/BPM/family names as enums), so the RE Manager validates a submission completely before it is queued.
Their docstrings are numpydoc (the format the queue server reads parameter descriptions from). Only the wrappers
are generator functions in the namespace: the tool modules are imported as modules, never their functions.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bluesky.utils import MsgGenerator
from bluesky_queueserver import parameter_annotation_decorator

from ..data import find_runs, make_run_engine
from ..machine import Machine, connect
from .manager import ENV_MODE, ENV_PREFIX, ENV_PROFILE, ENV_SEED, ENV_TANGO_ADDRESS, QUEUE_MODES
from .plans import LATEST, MEASURE, MODEL, queue_plan, tool_plan_list

__all__ = ["build_namespace", "queue_plans", "queue_functions", "settings_from_env", "RunLookup"]

__all__ += ["LATEST", "MEASURE", "MODEL"]


def settings_from_env(profile: str | os.PathLike | None = None, mode: str | None = None,
                      seed: Any = "env") -> dict[str, Any]:
    """Resolve profile, mode and seed: explicit arguments first, then the ``ACC_BLUESKY_*`` environment.

    ``seed="env"`` reads ``ACC_BLUESKY_SEED`` (default 1; ``none`` = ideal machine).
    """
    profile = profile or os.environ.get(ENV_PROFILE) or "ebs"
    mode = mode or os.environ.get(ENV_MODE) or "sim"
    if mode not in QUEUE_MODES:  # tango
        raise ValueError(f"{ENV_MODE} must be one of {', '.join(QUEUE_MODES)}, got {mode!r}")
    if seed == "env":
        text = os.environ.get(ENV_SEED, "1").strip().lower()
        if text in ("", "none", "null", "ideal"):
            seed = None
        else:
            try:
                seed = int(text)
            except ValueError:
                raise ValueError(f"{ENV_SEED} must be an integer or 'none', got {text!r}") from None
    out = {"profile": profile, "mode": mode, "seed": seed, "prefix": os.environ.get(ENV_PREFIX) or None}
    if mode == "tango":  # tango: the device server (host:port), else the database of $TANGO_HOST
        out["address"] = os.environ.get(ENV_TANGO_ADDRESS) or None
    return out


class RunLookup:
    """Resolves ``"latest"``, a configuration name or a run uid to a run uid of the catalogue the RE writes to.

    ``latest`` means the newest run of the given tool recorded on the same profile and mode (and seed, in sim
    mode): an ORM of another machine is never picked up by accident.
    """

    def __init__(self, machine: Machine, catalog: Callable[[], Any]):
        self.machine = machine
        self._catalog = catalog

    def catalog(self):
        return self._catalog()

    def _match(self) -> dict[str, Any]:
        m = self.machine
        match: dict[str, Any] = {"profile": m.profile.name, "mode": m.mode}
        if m.mode == "sim":
            match["seed"] = m.seed
        return match

    def latest(self, tool: str, **extra: Any) -> str:
        """uid of the newest successful run of ``tool`` on this machine (``extra``: more start-document matches).

        Failed or aborted runs (stop document ``exit_status`` other than ``success``) are skipped.
        """
        match = self._match() | extra
        runs = find_runs(self.catalog(), tool=tool, **match)
        for uid in reversed(list(runs)):  # the catalogue keeps runs in the order they were written
            if (runs[uid].metadata.get("stop") or {}).get("exit_status") == "success":
                return runs[uid].metadata["start"]["uid"]
        where = ", ".join(f"{k}={v!r}" for k, v in match.items())
        raise LookupError(f"no successful {tool!r} run in the catalogue for {where}: run the measurement "
                          f"first (e.g. queue it before this plan) or pass a run uid")

    def resolve(self, value: str, tool: str, *, by_name: str | None = None) -> str:
        """``"latest"`` -> newest ``tool`` run; ``by_name``: a name searched in that start-document key; else the
        uid itself (checked to exist)."""
        if value == LATEST:
            return self.latest(tool)
        if by_name is not None and not _looks_like_uid(value):
            return self.latest(tool, **{by_name: value})
        cat = self.catalog()
        try:
            run = cat[value]
        except KeyError:
            raise LookupError(f"no run {value!r} in the catalogue; give a run uid, {LATEST!r}"
                              + (f" or a {by_name}" if by_name else "")) from None
        got = run.metadata["start"].get("tool")
        if got != tool:
            raise LookupError(f"run {value} is a {got!r} run, expected a {tool!r} run")
        return run.metadata["start"]["uid"]


_UID = re.compile(r"^[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}$")


def _looks_like_uid(text: str) -> bool:
    return bool(_UID.match(text))


def queue_plans(m: Machine, lookup: RunLookup) -> dict[str, Callable[..., MsgGenerator[str]]]:
    """The queue-facing plans bound to machine ``m``: name -> generator function.

    ``count`` (bluesky's, on device names) and one queue plan per tool plan of :mod:`acc_bluesky.plans`,
    generated from the tool's own signature and docstring (:func:`acc_bluesky.queue.plans.queue_plan`). Every
    plan returns the uid of its run and restores what it changed when it fails or is aborted.
    """
    readable = {d.name: d for d in (m.bpm, m.tune, m.beam, m.rf)}

    @parameter_annotation_decorator({
        "parameters": {
            "detectors": {"annotation": "typing.List[Readables]", "devices": {"Readables": list(readable)},
                          "default": ["bpm"]},
            "num": _range(m, "num"),
            "delay": _range(m, "delay"),
        }})
    def count(detectors: list = ["bpm"], num: int = 1, delay: float = 0.0,  # noqa: B006 - queue default
              md: dict | None = None) -> MsgGenerator[str]:
        """Read detectors num times (one event each) and record the readings with FAIR metadata.

        Parameters
        ----------
        detectors
            devices to read: bpm (orbit x, y [m]), tune (fractional tunes), beam (current [A], lifetime [s]),
            rf (frequency [Hz], voltage [V]).
        num
            number of readings.
        delay
            time between readings [s].
        md
            metadata merged into the start document.
        """
        import bluesky.plans as bp

        from ..data.metadata import tool_metadata
        from ..plan_stubs.checks import check_parameters

        check_parameters("count", {"num": int, "delay": float}, {"num": num, "delay": delay}, m.profile)
        dets = [readable[d] if isinstance(d, str) else d for d in detectors]
        _md = tool_metadata("count", m, plan_name="count", detectors=[d.name for d in dets], num=num,
                            delay=delay) | {"num_points": int(num)} | (md or {})
        return (yield from bp.count(dets, num=int(num), delay=float(delay), md=_md))

    plans: dict[str, Callable[..., MsgGenerator[str]]] = {"count": count}
    for tool_plan in tool_plan_list():
        plans[tool_plan.__name__] = queue_plan(tool_plan, m, lambda v, t, b: lookup.resolve(v, t, by_name=b))
    return plans


def _range(m: Machine, name: str) -> dict[str, float]:
    from ..plan_stubs.checks import bound_of

    low, high, _ = bound_of(name, m.profile)
    return {k: float(v) for k, v in (("min", low), ("max", high)) if v is not None}


def submitter_metadata(plan: Any) -> Any:
    """A RunEngine preprocessor of the queue worker: every run records the user and group who submitted the queue
    item (``operator``, ``user_group``), whatever client submitted it (qserver, REManagerAPI, a GUI)."""
    import bluesky.preprocessors as bpp

    from .._compat.queueserver import running_item

    def mutate(msg):
        if msg.command != "open_run":
            return msg
        item = running_item()
        if not item or not item.get("user"):
            return msg
        return msg._replace(kwargs={**msg.kwargs, "operator": item["user"], "user_group": item["user_group"],
                                    "queue_item_uid": item["item_uid"]})

    return bpp.msg_mutator(plan, mutate)


def queue_functions(m: Machine) -> dict[str, Callable[..., Any]]:
    """Functions the queue may execute (``api.function_execute``): :func:`sim_fault` in sim mode."""
    kinds = ("lose_beam", "inject", "dead_bpm", "noisy_bpm", "frozen_bpm", "stuck", "dead", "trip", "clear")

    def sim_fault(kind: str, family: str | None = None, index: int | None = None, on: bool = True,
                  rms: float = 5e-6) -> dict:
        """Switch a fault of the simulated machine (sim mode only), e.g. to rehearse how plans recover.

        kind: 'lose_beam' (until 'inject'), 'inject', 'dead_bpm' / 'frozen_bpm' (index), 'noisy_bpm' (index,
        ``rms`` [m] of extra noise), 'stuck'/'dead' (family, index), 'trip' (family), 'clear' (every fault).
        ``on=False`` switches a fault off. Returns the active faults.
        """
        if m.twin is None:
            raise RuntimeError(f"sim_fault needs the simulated machine; this worker runs in {m.mode!r} mode")
        if kind not in kinds:
            raise ValueError(f"unknown fault {kind!r}; kinds: {', '.join(kinds)}")
        an = m.twin.anomalies
        if kind == "lose_beam":
            an.lose_beam()
        elif kind == "inject":
            m.twin.inject()
        elif kind == "clear":
            an.clear()
        elif kind in ("dead_bpm", "frozen_bpm", "noisy_bpm"):
            if index is None:
                raise ValueError(f"{kind} needs index (BPM index, 0-based)")
            if kind == "noisy_bpm":
                an.noisy_bpm(int(index), float(rms), on)
            else:
                getattr(an, kind)(int(index), on)
        elif kind == "trip":
            if family is None:
                raise ValueError("trip needs family")
            an.trip(family, on)
        else:
            if family is None or index is None:
                raise ValueError(f"{kind} needs family and index (0-based)")
            getattr(an, kind)(family, int(index), on)
        active = an.active()
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
                for k, v in active.items()}

    return {"sim_fault": sim_fault}


def build_namespace(profile: str | os.PathLike | None = None, *, mode: str | None = None, seed: Any = "env",
                    catalog_dir: str | os.PathLike | None = None, tiled: str | None = None,
                    progress: bool | None = None) -> dict[str, Any]:
    """Build ``RE`` (first), the machine ``m``, its devices, the queue plans and functions.

    Args:
        profile: profile name or path (default ``$ACC_BLUESKY_PROFILE``, else ``ebs``).
        mode: ``"sim"``, ``"epics"`` or ``"tango"`` (default ``$ACC_BLUESKY_MODE``, else sim).
        seed: sim error seed; ``"env"`` reads ``$ACC_BLUESKY_SEED`` (default 1, ``none`` = ideal).
        catalog_dir: embedded Tiled catalogue folder; with ``tiled``, both default to ``$ACC_BLUESKY_CATALOG``
            (a folder or a URI), else the data layer's default folder.
        tiled: Tiled server URI instead (API key from ``$TILED_API_KEY``).
        progress: progress bars; default: off in a queue worker (its output goes to a log), on in IPython.

    Returns:
        The namespace: ``RE``, ``m``, the devices by name, the queue plans and functions (``RE.catalog`` is the
        Tiled client the runs go to).
    """
    s = settings_from_env(profile, mode, seed)
    if progress is None:
        from bluesky_queueserver import is_re_worker_active

        progress = not is_re_worker_active()
    RE = make_run_engine(tiled=tiled, catalog_dir=catalog_dir, progress=progress)  # noqa: N806 - bluesky's name
    RE.wait_written = True  # a queue client reads the runs of an item as soon as the queue says it completed
    m = connect(s["profile"], mode=s["mode"], seed=s["seed"], prefix=s["prefix"],
                **({"address": s["address"]} if "address" in s else {}))  # tango: the device server

    def catalog():
        if RE.catalog is None:
            raise LookupError("the Tiled catalogue is not reachable (runs go to the backup folder "
                              f"{RE.backup_dir}); pass a run uid the plan can use without it")
        return RE.catalog

    lookup = RunLookup(m, catalog)
    RE.preprocessors.append(submitter_metadata)
    ns: dict[str, Any] = {"RE": RE, "m": m}
    for dev in m.devices():
        ns[dev.name] = dev
    ns.update(queue_plans(m, lookup))
    if m.mode == "sim":
        ns.update(queue_functions(m))
    ns.update(_ipython_extras(RE))
    return ns


def _ipython_extras(RE: Any) -> dict[str, Any]:  # noqa: N803 - bluesky's name
    """In an IPython session (``%run -i startup.py``, or the file as an IPython startup file): the catalogue
    ``cat``, the tool plans ``ap`` (``ap.measure_orm(m)``; the bare names are the queue's machine-bound wrappers),
    bluesky's ``bp``/``bps`` and a subscribed BestEffortCallback ``bec`` (live tables; plots with a display).
    Nothing in a queue worker or when the queue server lists the plans."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return {}
    if get_ipython() is None:
        return {}
    import importlib

    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    from bluesky.callbacks.best_effort import BestEffortCallback

    from ..data import LiveReadings

    bec = BestEffortCallback()
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        bec.disable_plots()
    bec.disable_table()
    RE.subscribe(bec)
    RE.subscribe(LiveReadings())
    return {"cat": RE.catalog, "bec": bec, "ap": importlib.import_module("acc_bluesky.plans"), "bp": bp, "bps": bps}


def profile_from_startup_file(file: str | None, default: str) -> str:
    """The profile of a ``profiles/<name>/startup.py``: its folder's ``profile.yaml`` when the file is known."""
    if file:
        p = Path(file).resolve().parent / "profile.yaml"
        if p.is_file():
            return str(p)
    return default
