"""The scaffold every tool plan is written on: one run with FAIR metadata, a beam check before anything moves,
the machine restored when the plan is interrupted, the result stored in the run, figures saved.

A tool plan reads as its measurement::

    @tool("dispersion", restore=rf_only, ring_only="the RF frequency sets the beam energy only in a ring")
    def measure_dispersion(machine: Machine, df: float | None = None, n_avg: int = 1,
                           md: dict | None = None) -> MsgGenerator[str]:
        \"\"\"Measure the dispersion ... Args with units ...\"\"\"
        f0 = yield from bps.rd(machine.rf.frequency)
        yield from open_tool_run(bpm_names=machine.bpm.names)     # the run opens here, FAIR metadata and all
        ...                                                       # moves and events
        return Dispersion(...)                                    # stored in the run; its uid is returned

What :func:`tool` does around the body, in order:

1. refuses a ring-only tool on a transfer line, naming the tool and why;
2. checks the beam (current and a finite orbit at in-service BPMs) before anything moves (``needs_beam``);
3. snapshots what the tool may move (``restore``: families, RF, injection trims) and puts it back exactly when the
   plan is aborted, stopped or fails (``finalize_wrapper``), and also when it completes unless ``keep=True``
   (corrections keep their result);
4. opens the run when the body calls :func:`open_tool_run` (or right before storing the result if it never
   does), with ``tool_metadata`` (facility, profile, lattice, mode, seed, operator, licence, software), the
   plan's parameters (JSON-safe), the body's extra keys, the figure paths and the user's ``md``;
5. stores the body's return value in the run's ``results`` stream (``to_results()`` with units and
   descriptions), writes its figures (those marked :func:`thread_safe_figure` in the figure worker thread, while
   the run closes and is written: ``RE(plan)`` returns once they exist), closes the run (``fail``/``abort`` with
   the reason if the body raised);
6. remembers the result under the run uid for this session (:func:`remembered`) and returns the uid.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg, MsgGenerator, RunEngineControlException

from ..data import figures as _figures
from ..data.metadata import json_safe, tool_metadata
from .checks import ParameterError, check_parameters
from .machine import BeamLostError, move, restore_setpoints, snapshot_setpoints
from .results import store_result
from .trajectory import injection_trims

__all__ = [
    "NO_RESTORE",
    "Restore",
    "ToolError",
    "ToolResult",
    "all_settings",
    "correctors_and_rf",
    "figure_directory",
    "open_tool_run",
    "remember",
    "remembered",
    "rf_only",
    "thread_safe_figure",
    "tool",
]

OPEN = "acc_open_tool_run"
_REMEMBERED: OrderedDict[str, Any] = OrderedDict()
_REMEMBER_MAX = 64


class ToolError(ParameterError):
    """A tool refused to start (a parameter, the kind of machine): nothing moved, no run opened."""


@dataclass
class ToolResult:
    """What a tool body may return when it has no result class: arrays stored in the run, with units and
    descriptions, and ``value`` (any object) remembered for the session (default: the arrays); ``figure``: what
    the tool's figure functions draw from beyond the stored arrays (positions, names), neither stored nor kept."""

    results: Mapping[str, Any]
    units: Mapping[str, str] = field(default_factory=dict)
    descriptions: Mapping[str, str] = field(default_factory=dict)
    value: Any = None
    figure: Any = None

    def to_results(self) -> dict[str, Any]:
        return dict(self.results)


@dataclass(frozen=True)
class Restore:
    """What a tool may move, snapshotted before it starts: magnet ``families`` (names; ``None`` = all), the
    RF frequency and voltage (``rf``) and the injection trims x, px, y, py (``injection``: a transfer line's
    steering at its entrance; only on a machine with injection devices)."""

    families: tuple[str, ...] | None = ()
    rf: bool = False
    injection: bool = False


NO_RESTORE = Restore()


def rf_only(machine, args: Mapping[str, Any]) -> Restore:
    return Restore((), rf=True)


def correctors_and_rf(machine, args: Mapping[str, Any]) -> Restore:
    return Restore(tuple(sorted([*machine.hcors, *machine.vcors])), rf=True)


def all_settings(machine, args: Mapping[str, Any]) -> Restore:
    return Restore(None, rf=True)


def figure_directory(figure_dir: str | os.PathLike | None = None) -> Path:
    """Where tools write their PNG figures: ``figure_dir``, else ``$ACC_BLUESKY_FIGURE_DIR``, else ``figures``
    in the user's acc_bluesky data folder."""
    if figure_dir is not None:
        return Path(figure_dir).expanduser()
    env = os.environ.get("ACC_BLUESKY_FIGURE_DIR") or os.environ.get("ACC_BLUESKY_FIGURES")
    if env:
        return Path(env).expanduser()
    from ..data import default_catalog_dir

    return default_catalog_dir().parent / "figures"


def remember(uid: str, result: Any, tool_name: str = "") -> None:
    """Keep a tool's result for this session under its run uid (the last 64)."""
    _REMEMBERED[uid] = (tool_name, result)
    _REMEMBERED.move_to_end(uid)
    while len(_REMEMBERED) > _REMEMBER_MAX:
        _REMEMBERED.popitem(last=False)


def remembered(uid: str) -> tuple[str, Any] | None:
    """``(tool, result)`` a tool of this session stored in run ``uid`` (``None`` if not remembered: read the run)."""
    return _REMEMBERED.get(str(uid))


def open_tool_run(**extra: Any) -> MsgGenerator[str]:
    """Open the tool's run now, with ``extra`` keys in its start document; returns the run uid.

    Call it once the body knows what it will do (and has refused bad input): moves after it are recorded. Only
    valid inside a plan decorated with :func:`tool`.
    """
    return (yield Msg(OPEN, None, **extra))


def _plan_parameters(sig: inspect.Signature, bound: inspect.BoundArguments) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if name in ("machine", "md"):
            continue
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: _param_value(v) for k, v in value.items()})
        else:
            out[name] = _param_value(value)
    return out


def _param_value(v: Any) -> Any:
    """A parameter as the start document shows it: runs and results by uid, devices by name, arrays as lists."""
    if isinstance(v, str) or v is None or isinstance(v, (bool, int, float)):
        return v
    uid = getattr(v, "uid", None)
    if isinstance(uid, str) and uid:
        return uid
    md = getattr(v, "metadata", None)
    if md is not None:
        try:
            return md["start"]["uid"]
        except (KeyError, TypeError):
            pass
    if hasattr(v, "name") and hasattr(v, "connect"):  # an ophyd-async device
        return v.name
    if isinstance(v, np.ndarray) and v.size > 64:
        return f"<array {v.shape}>"
    if isinstance(v, (list, tuple)) and len(v) and all(hasattr(x, "name") and hasattr(x, "connect") for x in v):
        return [x.name for x in v]
    try:
        return json_safe(v)
    except Exception:  # noqa: BLE001 - an object with no JSON form: its type
        return f"<{type(v).__name__}>"


def _check_beam(machine, tool_name: str) -> MsgGenerator[None]:
    """Refuse to start without beam: current 0 or every in-service BPM reading NaN (a ring) / nothing (a line)."""
    ret = yield Msg("read", machine.beam)
    if ret is None:  # iterated without a RunEngine
        return
    current = float(ret[machine.beam.current.name]["value"])
    ret = yield Msg("read", machine.bpm)
    x = np.asarray(ret[machine.bpm.x.name]["value"], dtype=float)
    y = np.asarray(ret[machine.bpm.y.name]["value"], dtype=float)
    good = np.asarray(machine.bpm.good, dtype=bool)
    seen = good & np.isfinite(x) & np.isfinite(y)
    ring = machine.profile.kind == "ring"
    if (ring and (not current > 0 or not np.any(seen))) or (not ring and not np.any(seen)):
        why = ""
        if machine.twin is not None and machine.twin.beam_lost:
            why = f" The twin says: {machine.twin.loss_reason}."
        what = (f"the beam current is {current:.3g} A and {int(np.count_nonzero(seen))} of "
                f"{int(np.count_nonzero(good))} in-service BPMs read a position" if ring
                else "no in-service BPM of the line reads a position")
        raise BeamLostError(
            f"{tool_name} did not start: no beam ({what}).{why} Nothing was moved and no run was recorded. "
            "Inject (on the twin: machine.twin.inject()), or thread the first turns (plans.thread_first_turns) "
            "when the ring has no closed orbit yet, then retry.")


def _store(result: Any, units: Mapping[str, str], descriptions: Mapping[str, str]) -> MsgGenerator[None]:
    """The result in the run's ``results`` stream: a :class:`ToolResult`, an object with ``to_results()`` (and
    class attributes ``UNITS``, ``DESCRIPTIONS``), or a mapping of arrays."""
    if result is None:
        return
    if isinstance(result, ToolResult):
        res, u, d = dict(result.results), {**units, **result.units}, {**descriptions, **result.descriptions}
    elif hasattr(result, "to_results"):
        res = dict(result.to_results())
        u = {**getattr(result, "UNITS", {}), **units}
        d = {**getattr(result, "DESCRIPTIONS", {}), **descriptions}
    elif isinstance(result, Mapping):
        res, u, d = dict(result), dict(units), dict(descriptions)
    else:
        raise TypeError(f"a tool body returns a result with to_results(), a mapping or None, got {type(result)}")
    if res:
        yield from store_result(res, units={k: u.get(k, "") for k in res},
                                descriptions={k: d.get(k, k.replace("_", " ")) for k in res})


def thread_safe_figure(fn: Callable[[Any, Path], Any]) -> Callable[[Any, Path], Any]:
    """Mark a figure function of :func:`tool` as safe to draw in the figure worker thread
    (:mod:`acc_bluesky.data.figures`): it uses matplotlib's object API only (``matplotlib.figure.Figure``,
    ``fig.savefig``), no pyplot. The run then closes without waiting for it; ``RE(plan)`` still returns once the
    PNG exists. Unmarked figure functions are drawn in the plan, after the results are stored."""
    fn.thread_safe = True  # type: ignore[attr-defined]
    return fn


def is_thread_safe_figure(fn: Any) -> bool:
    return bool(getattr(fn, "thread_safe", False))


def _draw(fn: Callable[[Any, Path], Any], result: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fn(result, path)


def tool(name: str, *, restore: Restore | Callable[[Any, Mapping[str, Any]], Restore] = NO_RESTORE,
         keep: bool = False, ring_only: str | None = None, needs_beam: bool = True,
         figures: Mapping[str, Callable[[Any, Path], Any]] | None = None,
         units: Mapping[str, str] | None = None, descriptions: Mapping[str, str] | None = None,
         validate: Callable[[Any, Mapping[str, Any]], None] | None = None,
         family_kind: str | None = None) -> Callable:
    """Make a generator function into a tool plan (see the module docstring).

    Args:
        name: the tool's name (``tool`` in the start document: ``orbit_response``, ``dispersion`` ...).
        restore: what the tool may move (a :class:`Restore`, or ``f(machine, arguments) -> Restore``).
        keep: keep the new settings when the plan completes (corrections); they are restored only when it fails.
        ring_only: the reason the tool needs a ring: on a transfer line it refuses to start with it.
        needs_beam: check the beam before anything moves.
        figures: ``{figure name: f(result, path)}``: figures written from the result after the measurement;
            their paths are in the start document (``figures``). A plan parameter ``figure_dir`` (``False``:
            no figure) chooses the folder. Functions marked :func:`thread_safe_figure` are drawn in the figure
            worker thread once the results are stored (the run closes at once; ``RE(plan)`` returns when they
            exist), others in the plan.
        units, descriptions: of the result keys, when the result class does not say them.
        validate: ``f(machine, arguments)``, raising on bad input, before anything else.
        family_kind: the kind of magnet family its ``families`` parameter takes (``"quadrupole"`` ...).
    """

    def decorate(body: Callable[..., MsgGenerator[Any]]) -> Callable[..., MsgGenerator[str]]:
        sig = inspect.signature(body)
        if "md" not in sig.parameters:
            raise TypeError(f"tool plan {body.__name__} must take md=None last")
        hints: dict[str, Any] = {}

        def annotations() -> dict[str, Any]:
            if not hints:
                import typing

                hints.update(typing.get_type_hints(body))
            return hints

        @functools.wraps(body)
        def plan(*args: Any, **kwargs: Any) -> MsgGenerator[str]:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise ToolError(f"{body.__name__}: {err}") from None
            bound.apply_defaults()
            machine = bound.arguments.get("machine", args[0] if args else None)
            if not (hasattr(machine, "profile") and hasattr(machine, "bpm")):
                raise ToolError(f"{body.__name__}: the first argument must be the connected machine "
                                f"(acc_bluesky.connect(...)), got {type(machine).__name__}")
            check_parameters(body.__name__, annotations(), bound.arguments, machine.profile)
            user_md = dict(bound.arguments.get("md") or {})
            if validate is not None:
                validate(machine, bound.arguments)
            if ring_only and machine.profile.kind != "ring":
                raise ToolError(f"{body.__name__} is not available for a transfer line (profile "
                                f"{machine.profile.name!r} is kind: {machine.profile.kind}): {ring_only}.")
            fig_dir_arg = bound.arguments.get("figure_dir")
            want_figures = bool(figures) and fig_dir_arg is not False
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
            fig_paths: dict[str, Path] = {}
            if want_figures:
                folder = figure_directory(fig_dir_arg if isinstance(fig_dir_arg, (str, os.PathLike)) else None)
                fig_paths = {k: folder / f"{body.__name__}_{stamp}_{k}.png" for k in figures}
            what = restore(machine, bound.arguments) if callable(restore) else restore
            state: dict[str, Any] = {"uid": None, "open": False, "done": False, "snap": None, "trims": None}

            def open_run(extra: Mapping[str, Any]) -> MsgGenerator[str]:
                if state["open"]:
                    raise RuntimeError(f"{body.__name__}: open_tool_run called twice")
                md = tool_metadata(name, machine, plan_name=body.__name__,
                                   **{k: v for k, v in _plan_parameters(sig, bound).items()})
                md.update({k: json_safe(v) for k, v in extra.items()})
                if fig_paths:
                    md["figures"] = {k: str(p) for k, p in fig_paths.items()}
                md.update(user_md)
                uid = yield from bps.open_run(md=md)
                state["uid"], state["open"] = uid, True
                return uid

            def intercept(msg: Msg):
                if msg.command == OPEN and not state["open"]:
                    return open_run(msg.kwargs), None
                return None, None

            def measured() -> MsgGenerator[str]:
                if needs_beam:
                    yield from _check_beam(machine, body.__name__)
                if what.families != () or what.rf:
                    state["snap"] = yield from snapshot_setpoints(
                        machine, None if what.families is None else list(what.families), rf=what.rf)
                if what.injection and getattr(machine, "injection", None) is not None:
                    now = yield from injection_trims(machine)
                    state["trims"] = list(zip(machine.injection.knobs()[:4], now))
                result = yield from bpp.plan_mutator(body(*bound.args, **bound.kwargs), intercept)
                if not state["open"]:
                    yield from open_run({})
                yield from _store(result, units or {}, descriptions or {})
                for key, path in fig_paths.items():
                    label = f"{body.__name__}: figure {key!r}"
                    if is_thread_safe_figure(figures[key]):  # drawn while the run closes and is written
                        _figures.submit(_draw, figures[key], result, path, what=label)
                        continue
                    try:
                        _draw(figures[key], result, path)
                    except Exception as err:  # noqa: BLE001 - a figure never loses a measurement
                        warnings.warn(f"{label} not written ({err})", stacklevel=2)
                state["done"] = True
                state["result"] = result
                return state["uid"]

            def close_failed(err: Exception) -> MsgGenerator[None]:
                if state["open"]:
                    state["open"] = False
                    if isinstance(err, RunEngineControlException):
                        yield from bps.close_run(exit_status=err.exit_status)
                    else:
                        yield from bps.close_run(exit_status="fail", reason=f"{type(err).__name__}: {err}")

            def close_ok() -> MsgGenerator[None]:
                if state["open"]:
                    state["open"] = False
                    yield from bps.close_run()

            def cleanup() -> MsgGenerator[None]:
                snap, trims = state["snap"], state["trims"]
                if state["done"] and keep:
                    return
                try:
                    if snap is not None:
                        yield from restore_setpoints(machine, snap)
                finally:
                    if trims is not None:  # the trims that moved, back where they were
                        back = []
                        for k, v in trims:
                            if float((yield from bps.rd(k))) != v:
                                back += [k, v]
                        if back:
                            yield from move(*back)

            inner = bpp.contingency_wrapper(measured(), except_plan=close_failed, else_plan=close_ok)
            uid = yield from bpp.finalize_wrapper(inner, cleanup())
            if uid is not None:
                value = state.get("result")
                if isinstance(value, ToolResult) and value.value is not None:
                    value = value.value
                if value is not None:
                    if hasattr(value, "uid") and not isinstance(value, Mapping):
                        try:
                            value.uid = uid
                        except AttributeError:
                            pass
                    remember(uid, value, name)
            return uid

        plan.tool_name = name  # type: ignore[attr-defined]
        plan.needs_beam = needs_beam  # type: ignore[attr-defined]
        plan.family_kind = family_kind  # type: ignore[attr-defined]
        plan.__signature__ = sig  # type: ignore[attr-defined]
        return plan

    return decorate


def tool_plans(module: Any) -> dict[str, Callable]:
    """The tool plans of a module (functions made by :func:`tool`), by name."""
    return {n: f for n, f in vars(module).items() if callable(f) and hasattr(f, "tool_name")}


def families_named(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
