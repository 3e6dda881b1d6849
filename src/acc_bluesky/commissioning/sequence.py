"""Commissioning sequences as data: a list of tool-plan steps, validated before any worker starts.

A sequence is a YAML file (or the same as a dict): each step names one tool plan of :mod:`acc_bluesky.plans` with
its parameters, and optionally its success criteria on the truth the twin knows::

    name: hmba-default
    error_scale: 1.0            # optional: multiplier on the profile's alignment errors
    steps:
      - measure_lifetime: {}                        # a tool of a later release: skipped (with a note) while
        optional: true                              #   it is not installed
      - measure_orm: {rf: true}
        id: orm                                     # later steps refer to its run as "$orm"
      - correct_orbit: {orm: $orm, fit_rf: true, n_sv: 8}
        success: {orbit_rms: 100.0e-6}              # max over planes of the true rms orbit at the BPMs [m]
      - correct_tune: {target: design, response: model}
        success: {tune_error: 2.0e-3}
      - correct_orbit: {orm: $orm, fit_rf: true, target_rms: 50.0e-6}   # target_<criterion>: the same as success

Step keys: the tool name (its parameters as a mapping), ``id`` (default: the tool name, ``<tool>_<k>`` for its
k-th use), ``success`` (criteria, below), ``required`` (stop the seed when the step misses its criteria; default
False: a missed target is recorded and the chain goes on; an exception or a lost beam ends the seed, except no
beam stored yet while the next step needs none, e.g. threading then the sextupole ramp), ``optional`` (the tool
may be missing from an installation: then the step is skipped with a note; default False: a tool name that is not
registered is refused, with the nearest registered names, so that a typo never passes as a skipped step),
``note``.

Parameter values: plain YAML; ``"$<id>"`` is the run uid of an earlier step of the same seed (``orm: $orm``,
``bba: $measure_bba``, ``target: $apply_bba``); ``design`` as the ``target`` of ``correct_tune`` /
``correct_chromaticity`` is the design lattice's tunes / chromaticities. Numbers written ``50e-6`` (which YAML 1.1
reads as a string) are taken as numbers where the plan wants a number.

Success criteria (:data:`CRITERIA`), judged on the truth after the step: ``beam`` (the beam is stored: a closed orbit
and current), ``orbit_rms`` [m], ``beta_beat`` (rms of dbeta/beta, both planes) [1], ``tune_error`` [1],
``chrom_error`` [1] (each the larger plane, at most), ``transmission`` [1] (fraction of turns the injected beam
survives, at least). Without criteria a step succeeds when its plan completes and does not lose a stored beam (at
full errors a ring may store none before its first turns are threaded: the steps before are judged by their
criteria alone).

Validation (:func:`load_sequence`) refuses, naming the step: an unknown step key, a parameter the tool does not
take, a value of the wrong type or out of its bounds (the tool's annotations and
:mod:`acc_bluesky.plan_stubs.checks`), a reference to no earlier step, an unknown criterion, a tool that is not
registered. A step marked ``optional: true`` whose tool is not registered in this installation (a tool of a later
release) is kept as *skipped*, with a note in the campaign results, so that a shipped sequence uses it as soon as it
lands.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CRITERIA", "CampaignSequence", "SequenceError", "Step", "default_sequence", "default_sequence_path",
           "load_sequence", "registered_tools"]


class SequenceError(ValueError):
    """A sequence that cannot run: nothing was started."""


#: Success criteria: name -> (truth figure(s), comparison, units, meaning).
CRITERIA: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "beam": (("beam",), "==", "", "the beam is stored (closed orbit, current > 0)"),
    "orbit_rms": (("orbit_rms_x", "orbit_rms_y"), "<=", "m", "true rms orbit at the BPMs, larger plane"),
    "centre_rms": (("centre_rms_x", "centre_rms_y"), "<=", "m",
                   "rms distance of the orbit from the quadrupoles' magnetic centres, larger plane"),
    "beta_beat": (("beta_beat_x", "beta_beat_y"), "<=", "", "rms of (beta - beta_design)/beta_design at the BPMs"),
    "tune_error": (("tune_error",), "<=", "", "largest |tune - target| (target: the step's, else design)"),
    "chrom_error": (("chrom_error",), "<=", "", "largest |chromaticity - target| (the step's, else design)"),
    "transmission": (("transmission",), ">=", "", "fraction of the turns the injected beam survives"),
}
_ALIASES = {"target_rms": "orbit_rms", **{f"target_{c}": c for c in CRITERIA}}
_STEP_KEYS = ("id", "success", "required", "optional", "note")
_DESIGN_TARGETS = {("correct_tune", "target"), ("correct_chromaticity", "target")}
#: Parameters a campaign sets itself.
_RESERVED = ("machine", "md")
#: Ranges of parameters whose meaning depends on the plan (as the queue server's).
_RANGES: dict[tuple[str, str], tuple[float, float, str]] = {
    ("correct_tune", "target"): (0.0, 1.0, "fractional tunes"),
    ("correct_chromaticity", "target"): (-100.0, 100.0, "chromaticities"),
}
#: Parameters with a fixed set of values.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("measure_bba", "method"): ("quadcenter", "parallel"),
    ("model_orm", "method"): ("analytic", "tracking"),
}


def registered_tools() -> dict[str, Any]:
    """The tool plans of this installation (functions of :mod:`acc_bluesky.plans` made by the ``@tool``
    scaffold), by plan name, in module order."""
    from .. import plans

    return {n: f for n in plans.__all__ if callable(f := getattr(plans, n, None)) and hasattr(f, "tool_name")}


@dataclass
class Step:
    """One step of a sequence: ``tool`` (plan name) with ``params``; ``skip`` says why it will not run."""

    tool: str
    params: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    success: dict[str, Any] = field(default_factory=dict)
    required: bool = False
    note: str = ""
    skip: str = ""
    optional: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.tool: dict(self.params), "id": self.id}
        if self.success:
            out["success"] = dict(self.success)
        if self.required:
            out["required"] = True
        if self.optional:
            out["optional"] = True
        if self.note:
            out["note"] = self.note
        return out

    def references(self) -> list[str]:
        return [v[1:] for v in self.params.values() if isinstance(v, str) and v.startswith("$")]


@dataclass
class CampaignSequence:
    """A validated sequence: its steps (skipped ones included, with their reason), name, options."""

    steps: list[Step]
    name: str = ""
    error_scale: float | None = None
    truth_turns: int = 100
    source: str = ""

    @property
    def runnable(self) -> list[Step]:
        return [s for s in self.steps if not s.skip]

    @property
    def skipped(self) -> list[Step]:
        return [s for s in self.steps if s.skip]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "steps": [s.as_dict() for s in self.steps],
                               "truth_turns": self.truth_turns}
        if self.error_scale is not None:
            out["error_scale"] = self.error_scale
        return out

    def __str__(self) -> str:
        lines = [f"sequence {self.name or '(unnamed)'}: {len(self.runnable)} step(s) to run"
                 + (f", {len(self.skipped)} skipped" if self.skipped else "")]
        for i, s in enumerate(self.steps, 1):
            par = ", ".join(f"{k}={v!r}" for k, v in s.params.items())
            lines.append(f"  {i:2d}. {s.id:22s} {s.tool}({par})" + (f"  success {s.success}" if s.success else "")
                         + (f"  SKIPPED: {s.skip}" if s.skip else ""))
        return "\n".join(lines)


def default_sequence_path(profile: Any) -> Path:
    """``sequence.yaml`` beside the profile's ``profile.yaml``."""
    from ..profile import load_profile

    return Path(load_profile(profile).path).parent / "sequence.yaml"


def default_sequence(profile: Any) -> CampaignSequence:
    """The sequence shipped with a profile (``sequence.yaml`` beside its ``profile.yaml``), validated."""
    path = default_sequence_path(profile)
    if not path.exists():
        raise SequenceError(f"profile {profile!r} ships no default sequence ({path} does not exist): give one "
                            "with --sequence FILE (see docs/campaigns.md)")
    return load_sequence(path, profile)


def _read(source: Any) -> tuple[Any, str]:
    if isinstance(source, CampaignSequence):
        return source.as_dict(), source.source
    text = isinstance(source, str) and ("\n" in source or (
        ":" in source and not source.rstrip().endswith((".yaml", ".yml")) and not Path(source).exists()))
    if isinstance(source, (str, os.PathLike)) and not text:
        path = Path(source).expanduser()
        if not path.exists():
            raise SequenceError(f"sequence file {path} does not exist")
        import yaml

        try:
            return yaml.safe_load(path.read_text()), str(path)
        except yaml.YAMLError as err:
            raise SequenceError(f"{path}: not valid YAML: {err}") from None
    if isinstance(source, str):
        import yaml

        return yaml.safe_load(source), "<text>"
    return copy.deepcopy(source), "<dict>"


def load_sequence(source: Any, profile: Any = None) -> CampaignSequence:
    """Read and validate a sequence: a YAML file path, YAML text, a dict (``{"steps": [...]}``) or a list of
    steps. With ``profile`` the bounds of counting parameters are the profile's (``tools.limits``).

    Raises:
        SequenceError: naming the file, the step (number, tool) and what is wrong; nothing has started.
    """
    data, where = _read(source)
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, Mapping) or "steps" not in data:
        raise SequenceError(f"{where}: a sequence is a mapping with a 'steps' list (or a list of steps)")
    unknown = sorted(set(data) - {"name", "steps", "error_scale", "truth_turns", "profile", "description"})
    if unknown:
        raise SequenceError(f"{where}: unknown key(s) {unknown}; a sequence has name, description, profile, "
                            "error_scale, truth_turns and steps")
    prof = None
    if profile is not None:
        from ..profile import load_profile

        prof = load_profile(profile)
    tools = registered_tools()
    steps: list[Step] = []
    ids: dict[str, Step] = {}
    counts: dict[str, int] = {}
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SequenceError(f"{where}: 'steps' must be a non-empty list")
    for k, raw in enumerate(raw_steps, 1):
        step = _parse_step(raw, k, where)
        counts[step.tool] = counts.get(step.tool, 0) + 1
        if not step.id:
            step.id = step.tool if counts[step.tool] == 1 else f"{step.tool}_{counts[step.tool]}"
        at = f"{where}: step {k} ({step.tool if step.id == step.tool else f'{step.id}: {step.tool}'})"
        if step.id in ids:
            raise SequenceError(f"{at}: id {step.id!r} is used by an earlier step; give each step its own id")
        plan = tools.get(step.tool)
        if plan is None:
            if not step.optional:
                import difflib

                near = difflib.get_close_matches(step.tool, sorted(tools), n=3, cutoff=0.6)
                raise SequenceError(
                    f"{at}: {step.tool!r} is not a registered tool plan" + (
                        f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else
                        f" (registered: {', '.join(sorted(tools))})") +
                    "; a tool of a later release is written with optional: true (skipped until installed)")
            step.skip = (f"tool {step.tool!r} is not registered in this installation: skipped (it runs once "
                         "the tool is installed)")
        else:
            _check_params(plan, step, prof, at)
        for ref in step.references():
            if ref not in ids:
                raise SequenceError(f"{at}: ${ref} names no earlier step (ids so far: {', '.join(ids) or 'none'})")
            if ids[ref].skip and not step.skip:
                step.skip = f"it uses the run of step {ref!r}, which is skipped"
        ids[step.id] = step
        steps.append(step)
    es = data.get("error_scale")
    if es is not None:
        es = _number(es, f"{where}: error_scale", float)
        if not es >= 0:
            raise SequenceError(f"{where}: error_scale must be >= 0, got {es}")
    turns = _number(data.get("truth_turns", 100), f"{where}: truth_turns", int)
    if not 0 <= turns <= 100000:
        raise SequenceError(f"{where}: truth_turns must be in [0, 100000], got {turns}")
    return CampaignSequence(steps, name=str(data.get("name") or Path(where).stem), error_scale=es,
                            truth_turns=int(turns), source=where)


def _parse_step(raw: Any, k: int, where: str) -> Step:
    if isinstance(raw, str):
        raw = {raw: {}}
    if not isinstance(raw, Mapping):
        raise SequenceError(f"{where}: step {k}: a step is a mapping {{tool: {{parameters}}}}, got {raw!r}")
    raw = dict(raw)
    if "tool" in raw:  # the long form {tool: name, params: {...}}
        name = raw.pop("tool")
        raw[name] = raw.pop("params", {}) or {}
    names = [key for key in raw if key not in _STEP_KEYS]
    if len(names) != 1:
        raise SequenceError(f"{where}: step {k}: one tool per step, besides {', '.join(_STEP_KEYS)}; got "
                            f"{names or 'none'}")
    tool = str(names[0])
    params = raw[tool] if raw[tool] is not None else {}
    if not isinstance(params, Mapping):
        raise SequenceError(f"{where}: step {k} ({tool}): parameters must be a mapping, got {params!r}")
    params = {str(p): v for p, v in params.items()}
    success = raw.get("success") or {}
    if not isinstance(success, Mapping):
        raise SequenceError(f"{where}: step {k} ({tool}): success must be a mapping of criteria, got {success!r}")
    success = dict(success)
    for alias, crit in _ALIASES.items():
        if alias in params:
            success.setdefault(crit, params.pop(alias))
    at = f"{where}: step {k} ({tool})"
    for crit, value in list(success.items()):
        if crit not in CRITERIA:
            raise SequenceError(f"{at}: unknown success criterion {crit!r}; known: {', '.join(CRITERIA)}")
        if crit == "beam":
            if not isinstance(value, bool):
                raise SequenceError(f"{at}: success.beam must be true or false, got {value!r}")
        else:
            v = _number(value, f"{at}: success.{crit}", float)
            if not v >= 0:
                raise SequenceError(f"{at}: success.{crit} must be >= 0 ({CRITERIA[crit][2] or 'no unit'}), got {v}")
            success[crit] = v
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise SequenceError(f"{at}: required must be true or false, got {required!r}")
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise SequenceError(f"{at}: optional must be true or false, got {optional!r}")
    return Step(tool, params, id=str(raw.get("id") or ""), success=success, required=required,
                note=str(raw.get("note") or ""), optional=optional)


def _number(value: Any, what: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise SequenceError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SequenceError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise SequenceError(f"{what} must be a finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise SequenceError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _scalar_kinds(annotation: Any) -> set[type]:
    from ..plan_stubs.checks import _kinds  # the scaffold's own reading of annotations

    return _kinds(annotation)[0]


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML 1.1 reads ``50e-6`` as a string: a numeric string where the plan wants a number is that number."""
    kinds = _scalar_kinds(annotation)
    if isinstance(value, str) and not value.startswith("$") and kinds & {int, float} and str not in kinds:
        try:
            f = float(value)
        except ValueError:
            return value
        return int(f) if int in kinds and float not in kinds and f == int(f) else f
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            out.append(v)
        return out
    return value


def _check_params(plan: Any, step: Step, profile: Any, at: str) -> None:
    from ..plan_stubs.checks import ParameterError, check_parameters

    sig = inspect.signature(plan)
    hints = typing.get_type_hints(plan)
    accepted = [p for p in sig.parameters if p not in _RESERVED]
    for name in list(step.params):
        if name in _RESERVED:
            raise SequenceError(f"{at}: {name!r} is set by the campaign (the seed's machine / run metadata), not "
                                "by the sequence")
        if name not in sig.parameters:
            raise SequenceError(f"{at}: {step.tool} has no parameter {name!r}; it takes {', '.join(accepted)} "
                                f"(success criteria go under success: {', '.join(CRITERIA)})")
        step.params[name] = _coerce(step.params[name], hints.get(name, Any))
    missing = [p.name for p in sig.parameters.values() if p.default is inspect.Parameter.empty
               and p.name not in _RESERVED and p.name not in step.params
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise SequenceError(f"{at}: {step.tool} needs {', '.join(missing)}")
    checked = {}
    for name, value in step.params.items():
        if isinstance(value, str) and value.startswith("$"):
            continue  # a run of an earlier step: resolved on the worker
        if value == "design":
            if (step.tool, name) not in _DESIGN_TARGETS:
                raise SequenceError(f"{at}: 'design' is a value of target in correct_tune / correct_chromaticity "
                                    f"only, not of {name}")
            continue
        choices = _CHOICES.get((step.tool, name))
        if choices is not None and value not in choices:
            raise SequenceError(f"{at}: {name} must be one of {', '.join(choices)}, got {value!r}")
        rng = _RANGES.get((step.tool, name))
        if rng is not None:
            vals = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            lo, hi, meaning = rng
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo < float(v) < hi:
                    raise SequenceError(f"{at}: {name} must be {meaning}, each in ({lo:g}, {hi:g}), got {value!r}")
        checked[name] = value
    try:
        check_parameters(step.tool, hints, checked, profile)
    except ParameterError as err:
        raise SequenceError(f"{at}: {str(err).replace('; nothing was moved', '')}") from None
