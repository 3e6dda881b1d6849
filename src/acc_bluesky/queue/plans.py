"""Queue plans generated from the tool plans: one source for signatures, docstrings and parameter bounds.

A tool plan takes a :class:`~acc_bluesky.machine.Machine`, which a queue item cannot name; its queue plan is the
same plan with the machine bound, and with JSON-friendly parameters the RE Manager validates at submission:

- parameter names, defaults and descriptions are the tool plan's own (its Google-style ``Args:`` rewritten as the
  numpydoc ``Parameters`` section the queue server reads);
- run references (``orm``, ``response``, ``config``, ``target``, ``bba``, ``loco``, ``dispersion``) are strings:
  ``"latest"`` (the newest successful run of that tool on this machine), ``"model"``, ``"measure"`` (measure it
  now, its own run: the tool's ``None``), a run uid, or a configuration's name;
- device names are enums (``correctors``: corrector and corrector-family names; ``bpm``/``bpms``: BPM names;
  ``families``: the families of the tool's kind), so a misspelt name is refused at submission;
- counts and steps carry the bounds of :data:`acc_bluesky.plan_stubs.checks.BOUNDS` with the profile's limits;
  steps in A are bounded by half the family's setpoint span, RF steps by half the RF frequency span.

See ``docs/queue.md`` for how to see every parameter of a plan (``REManagerAPI.plans_allowed()``).
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
from bluesky.utils import MsgGenerator
from bluesky_queueserver import parameter_annotation_decorator

from ..machine import Machine
from ..plan_stubs.checks import bound_of

__all__ = ["QUEUE_DEFAULTS", "RUN_REFERENCES", "queue_plan", "numpydoc", "tool_plan_list"]

LATEST, MODEL, MEASURE = "latest", "model", "measure"

#: Run-reference parameters: the tool(s) whose runs they name (``None``: depends on the plan, see ``_ref_tool``).
RUN_REFERENCES: dict[str, str | None] = {"orm": "orbit_response", "response": None, "config": "config",
                                         "target": "config", "bba": "bba", "loco": "loco",
                                         "dispersion": "dispersion", "trajectory_response": "trajectory_response"}
#: Queue defaults of run references where the tool's default (None: measure now) is not what a queue wants.
QUEUE_DEFAULTS: dict[str, dict[str, str]] = {"correct_orbit": {"orm": LATEST}, "restore_config": {"config": LATEST},
                                             "correct_tune": {"response": MEASURE}, "orbit_bump": {"orm": MODEL}}
#: Ranges of parameters whose meaning depends on the plan.
QUEUE_RANGES: dict[tuple[str, str], tuple[float, float]] = {("correct_tune", "target"): (0.0, 1.0),
                                                            ("correct_chromaticity", "target"): (-100.0, 100.0)}
#: Parameters not offered in the queue (files of the worker's machine).
HIDDEN = ("figure_dir",)


def _ref_tool(plan_name: str, param: str) -> str:
    if param == "response":
        return "chromaticity_response" if "chromaticity" in plan_name else "tune_response"
    return RUN_REFERENCES[param] or param


def tool_plan_list() -> list[Callable]:
    """Every tool plan of :mod:`acc_bluesky.plans` (functions made by the tool scaffold), in module order."""
    from .. import plans

    return [f for n in plans.__all__ if callable(f := getattr(plans, n, None)) and hasattr(f, "tool_name")]


# ------------------------------------------------------------------------------------------------------------
# docstrings
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Returns|Yields|Raises|Example|Examples|Note|Notes):\s*$")


def numpydoc(doc: str, drop: tuple[str, ...] = ("machine",), notes: dict[str, str] | None = None) -> str:
    """A Google-style docstring (``Args:``, ``Returns:``) as numpydoc (``Parameters`` / ``----------``);
    ``notes``: a line added at the end of the description of some parameters."""
    notes = notes or {}
    out: list[str] = []
    section: str | None = None
    indent: int | None = None
    skipping = False
    pending: list[str] = []

    def flush() -> None:
        out.extend("    " + n for n in pending)
        pending.clear()

    for line in inspect.cleandoc(doc or "").splitlines():
        m = _SECTION.match(line)
        if m and not line.startswith(" "):
            flush()
            section = {"Args": "Parameters", "Arguments": "Parameters"}.get(m.group(2), m.group(2))
            out += ["", section, "-" * len(section)]
            indent, skipping = None, False
            continue
        if section is not None and line.strip() and not line.startswith(" "):
            flush()
            section = None  # text after the section
        if section == "Parameters" and line.strip():
            lead = len(line) - len(line.lstrip())
            indent = lead if indent is None else indent
            entry = re.match(r"^\s*([A-Za-z_][\w, ]*):\s*(.*)$", line) if lead == indent else None
            if entry:
                flush()
                keep = [n.strip() for n in entry.group(1).split(",") if n.strip() not in drop]
                skipping = not keep
                if keep:
                    out.append(", ".join(keep))
                    if entry.group(2):
                        out.append("    " + entry.group(2))
                    pending.extend(notes[k] for k in keep if k in notes)
                continue
            if not skipping:
                out.append("    " + line.strip())
            continue
        if section == "Parameters" and not line.strip():
            flush()
        if section == "Returns" and line.strip():
            out.append("    " + line.strip())
            continue
        out.append(line)
    flush()
    return "\n".join(out).strip() + "\n"


# ------------------------------------------------------------------------------------------------------------
# annotations
def _optional(t: Any) -> Any:
    return typing.Optional[t]  # noqa: UP007 - the queue server's annotation format


def _simple(annotation: Any) -> Any:
    """The JSON-friendly type a queue item gives for a parameter of the tool's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in (int, float, bool, str):
        return annotation
    if origin in (typing.Union, __import__("types").UnionType):
        none = type(None) in args
        rest = [a for a in args if a is not type(None)]
        scalar = [a for a in rest if a in (int, float, bool, str)]
        pick = scalar[0] if scalar else (_simple(rest[0]) if rest else str)
        if pick is None:
            return None
        return _optional(pick) if none else pick
    if origin is tuple and args and all(a is float for a in args):
        return tuple[float, ...] if len(args) != 2 else tuple[float, float]
    if origin in (list, tuple, __import__("collections.abc").abc.Sequence):
        inner = args[0] if args else str
        return list[inner if inner in (int, float, bool, str) else str]
    if origin is dict:
        return dict
    return None  # Any, devices, objects: not offered in the queue unless a rule below applies


def _enum_param(machine: Machine, plan: Callable, name: str) -> tuple[str, dict[str, list[str]], bool] | None:
    """(enum type name, enums, is_list) for device-name parameters."""
    cors = [*machine.hcors, *machine.vcors, *(n for f in (*machine.hcors.values(), *machine.vcors.values())
                                            for n in f.names)]
    if name in ("correctors", "exclude_correctors"):
        return "Correctors", {"Correctors": cors}, True
    if name in ("bpm",):
        return "BPMs", {"BPMs": list(machine.bpm.names)}, False
    if name in ("bpms", "exclude_bpms"):
        return "BPMs", {"BPMs": list(machine.bpm.names)}, True
    if name in ("quads",):
        quads = [n for f in machine.quad.values() for n in f.names] + list(machine.quad)
        return "Quadrupoles", {"Quadrupoles": quads}, True
    if name == "skews":  # skew quadrupoles, or the skew windings of sextupoles (LOCO's skew fit)
        pool = [f for f in machine.families.values() if f.type in ("skew", "sextupole")]
        skews = [n for f in pool for n in f.names] + [f.name for f in pool]
        return "SkewMagnets", {"SkewMagnets": skews}, True
    if name == "group":  # LOCO's grouping (a {group: [magnets]} dict is for Python sessions)
        return "Grouping", {"Grouping": ["element", "family"]}, False
    if name == "families":
        kind = getattr(plan, "family_kind", None)
        pool = machine.quad if kind == "quadrupole" else machine.sext if kind == "sextupole" else machine.families
        label = {"quadrupole": "QuadFamilies", "sextupole": "SextFamilies"}.get(kind, "Families")
        return label, {label: list(pool)}, True
    if name == "plane":
        return "Planes", {"Planes": ["x", "y"]}, False
    return None


def _span(machine: Machine, plan: Callable) -> float | None:
    kind = getattr(plan, "family_kind", None)
    fams = [f for f in machine.families.values() if kind is None and f.type in ("hcor", "vcor") or f.type == kind]
    spans = [f.limits.high - f.limits.low for f in fams]
    spans = [s for s in spans if np.isfinite(s)]
    return max(spans) if spans else None


def _range(machine: Machine, plan: Callable, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    b = bound_of(name, machine.profile)
    fixed = QUEUE_RANGES.get((plan.__name__, name))
    if fixed is not None:
        out = {"min": fixed[0], "max": fixed[1]}
    elif b is not None:
        low, high, _ = b
        if low is not None:
            out["min"] = float(low)
        if high is not None:
            out["max"] = float(high)
    elif name == "delta":
        span = _span(machine, plan)
        if span:
            out = {"min": -span / 2, "max": span / 2}
    elif name == "df":
        lim = machine.rf.frequency_limits
        if np.isfinite(lim.high - lim.low):
            out = {"min": 0.0, "max": (lim.high - lim.low) / 2}
    elif name in ("amplitude", "angle", "delta_physics"):
        out = {"min": -0.01, "max": 0.01}
    return out


def _annotation_text(t: Any) -> str:
    s = repr(t).replace("typing.", "typing.") if not isinstance(t, type) else t.__name__
    return (s.replace("list[", "typing.List[").replace("tuple[", "typing.Tuple[").replace("dict", "dict")
            .replace("NoneType", "None"))


# ------------------------------------------------------------------------------------------------------------
def queue_plan(plan: Callable[..., MsgGenerator[str]], machine: Machine,
               resolve_run: Callable[[str, str, str | None], str]) -> Callable[..., MsgGenerator[str]]:
    """The queue plan of tool ``plan`` bound to ``machine``.

    ``resolve_run(value, tool, by_name)`` turns ``"latest"``, a name or a uid into a run uid of the worker's
    catalogue (:class:`~acc_bluesky.queue.startup.RunLookup.resolve`).
    """
    name = plan.__name__
    sig = inspect.signature(plan)
    hints = typing.get_type_hints(inspect.unwrap(plan))
    params: list[inspect.Parameter] = []
    annotations: dict[str, Any] = {}
    refs: dict[str, str] = {}
    for p in sig.parameters.values():
        if p.name == "machine" or p.name in HIDDEN:
            continue
        hint = hints.get(p.name, p.annotation)
        default = p.default
        if p.name in RUN_REFERENCES and _simple(hint) is None:  # a run (or a result object): named by a string
            refs[p.name] = _ref_tool(name, p.name)
            qdefault = QUEUE_DEFAULTS.get(name, {}).get(p.name)
            if qdefault is not None:
                default = qdefault
            elif default is None and p.default is not inspect.Parameter.empty:
                default = MEASURE if p.name in ("orm", "response") else None
            ann = _optional(str) if default is None else str
        elif p.name == "md":
            ann = _optional(dict)
        else:
            enum = _enum_param(machine, plan, p.name)
            ann = _simple(hint)
            if enum is not None:
                label, enums, is_list = enum
                text = f"typing.List[{label}]" if is_list else label
                if p.default is None:
                    text = f"typing.Optional[{text}]"
                annotations[p.name] = {"annotation": text, "enums": enums}
                ann = _optional(list[str] if is_list else str) if p.default is None else (
                    list[str] if is_list else str)
            if ann is None:
                continue  # not offered in the queue
            if isinstance(default, tuple):
                default = list(default)
        rng = _range(machine, plan, p.name)
        if rng:
            annotations.setdefault(p.name, {}).update(rng)
            if "annotation" not in annotations[p.name] and typing.get_origin(ann) is tuple:
                annotations[p.name]["annotation"] = _annotation_text(ann)
        params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY if p.kind is
                                        inspect.Parameter.KEYWORD_ONLY else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=default, annotation=ann))
    qsig = inspect.Signature(params, return_annotation=MsgGenerator[str])

    def convert(kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        for pname, tool_name in refs.items():
            value = out.get(pname)
            if value is None or not isinstance(value, str):
                continue
            if value == MEASURE:
                out[pname] = None
            elif value == MODEL:
                out[pname] = MODEL
            else:
                out[pname] = resolve_run(value, tool_name, "config_name" if tool_name == "config" else None)
        for pname in ("exclude_bpms", "exclude_correctors"):
            if pname in out and out[pname] is None and pname in sig.parameters and sig.parameters[pname].default == ():
                out[pname] = ()
        return out

    def wrapper(*args: Any, **kwargs: Any) -> MsgGenerator[str]:
        bound = qsig.bind(*args, **kwargs)
        bound.apply_defaults()
        return (yield from plan(machine, **convert(dict(bound.arguments))))

    functools.update_wrapper(wrapper, plan, assigned=("__module__", "__name__", "__qualname__"), updated=())
    del wrapper.__wrapped__  # the queue server must see this signature, not the tool plan's
    notes = {k: f"In the queue: {LATEST!r} (the newest successful {t} run of this machine), {MODEL!r}, "
                f"{MEASURE!r} (measure it now, its own run) or a run uid"
                + (" or the name it was saved under" if t == "config" else "") + "." for k, t in refs.items()}
    wrapper.__doc__ = numpydoc(plan.__doc__ or "", drop=("machine", *HIDDEN), notes=notes)
    wrapper.__signature__ = qsig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": MsgGenerator[str]}
    if annotations:
        wrapper = parameter_annotation_decorator({"parameters": annotations})(wrapper)
    return wrapper
