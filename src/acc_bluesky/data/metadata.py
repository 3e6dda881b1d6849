"""FAIR metadata of every run: what a start document must carry, how to build it, how it is checked.

A run recorded by :func:`acc_bluesky.data.make_run_engine` is refused (before the run opens, so before any
motion inside it) unless its start document carries the keys of :data:`REQUIRED_KEYS`. Plans build them with
:func:`tool_metadata`::

    _md = tool_metadata("dispersion", machine, df=df) | (md or {})

The ``machine`` is duck-typed: this module never imports the device or machine layers.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import getpass
import importlib.metadata
import os
import pathlib
import platform
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LICENSE",
    "FairFiller",
    "ENV_LICENSE",
    "ENV_OPERATOR",
    "MODES",
    "REQUIRED_KEYS",
    "REQUIRED_SUBKEYS",
    "MetadataError",
    "json_safe",
    "machine_metadata",
    "make_md_validator",
    "missing_metadata",
    "operator_name",
    "register_machine",
    "registered_machines",
    "unregister_machine",
    "software_versions",
    "tool_metadata",
    "validate_metadata",
]

#: Keys every start document must carry (``seed`` too, when ``mode == "sim"``).
REQUIRED_KEYS: tuple[str, ...] = (
    "facility",
    "accelerator",
    "profile",
    "lattice",
    "mode",
    "tool",
    "operator",
    "license",
    "software",
)

#: Sub-keys required inside the dictionary-valued keys.
REQUIRED_SUBKEYS: dict[str, tuple[str, ...]] = {
    "profile": ("name", "sha256"),
    "lattice": ("file", "sha256"),
    "software": ("acc-bluesky", "accelerator-toolbox", "bluesky", "ophyd-async"),
}

#: Allowed values of ``mode``.
MODES: tuple[str, ...] = ("sim", "epics", "tango")  # tango: runs on Tango devices

#: Environment variable naming the operator (default: the login name).
ENV_OPERATOR = "ACC_BLUESKY_OPERATOR"
#: Environment variable overriding the data licence written in every run.
ENV_LICENSE = "ACC_BLUESKY_LICENSE"
#: Licence of the recorded data unless told otherwise (an SPDX identifier).
DEFAULT_LICENSE = "CC-BY-4.0"

# Distributions whose versions are recorded in ``software`` (key: distribution name; value: import name).
_SOFTWARE = {
    "acc-bluesky": "acc_bluesky",
    "accelerator-toolbox": "at",
    "bluesky": "bluesky",
    "ophyd-async": "ophyd_async",
    "tiled": "tiled",
    "bluesky-tiled-plugins": "bluesky_tiled_plugins",
    "event-model": "event_model",
    "numpy": "numpy",
}


class MetadataError(ValueError):
    """A start document lacks FAIR metadata. ``missing`` lists the missing (dotted) keys."""

    def __init__(self, missing: list[str], problems: list[str] | None = None) -> None:
        self.missing = list(missing)
        self.problems = list(problems or [])
        parts = []
        if self.missing:
            parts.append("missing metadata keys: " + ", ".join(self.missing))
        parts.extend(self.problems)
        super().__init__(
            "Run refused, " + "; ".join(parts) + ". Build the start document with "
            "acc_bluesky.data.tool_metadata(tool, machine, **parameters) or pass the keys in md=..."
        )


def missing_metadata(md: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The missing keys (dotted, e.g. ``profile.sha256``) and other problems of a start document."""
    missing: list[str] = []
    problems: list[str] = []
    for key in REQUIRED_KEYS:
        value = md.get(key)
        if value is None or value == "" or value == {}:
            missing.append(key)
            continue
        subkeys = REQUIRED_SUBKEYS.get(key, ())
        if subkeys:
            if not isinstance(value, Mapping):
                problems.append(f"{key!r} must be a dictionary with keys {', '.join(subkeys)}")
                continue
            missing.extend(f"{key}.{sub}" for sub in subkeys if value.get(sub) in (None, ""))
    mode = md.get("mode")
    if mode not in (None, "") and mode not in MODES:
        problems.append(f"'mode' is {mode!r}, expected one of {', '.join(MODES)}")
    if mode == "sim" and "seed" not in md:
        missing.append("seed")
    seed = md.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        problems.append(f"'seed' is {seed!r}, expected an integer or None")
    return missing, problems


def validate_metadata(md: Mapping[str, Any]) -> None:
    """Raise :class:`MetadataError` naming every missing key of a start document (``seed`` in sim mode)."""
    missing, problems = missing_metadata(md)
    if missing or problems:
        raise MetadataError(missing, problems)


def check_sample(md: Mapping[str, Any]) -> None:
    """bluesky's own rule on ``sample`` (a string or a dictionary), which replacing its validator would drop."""
    if "sample" in md and not (hasattr(md["sample"], "keys") or isinstance(md["sample"], str)):
        raise ValueError("'sample' metadata must be a string or a dictionary, e.g. sample='dirt' or "
                         "sample={'color': 'red'}, not " + repr(md["sample"]))


def make_md_validator(extra: Callable[[dict], None] | None = None,
                      fill: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> Callable[[dict], None]:
    """A ``RunEngine.md_validator``: bluesky's ``sample`` rule, then :func:`validate_metadata` on the start
    document as ``fill`` completes it (the RunEngine's ``md_normalizer``), then ``extra``."""

    def md_validator(md: dict) -> None:
        check_sample(md)
        full = fill(md) if fill is not None else md
        validate_metadata(full)
        if extra is not None:
            extra(full)

    return md_validator


# --------------------------------------------------------------------------------------------- FAIR by default
class _Registered:
    __slots__ = ("_ids", "_names", "ref")

    def __init__(self, machine: Any) -> None:
        try:
            self.ref: Callable[[], Any] = weakref.ref(machine)
        except TypeError:  # not weak-referenceable (a plain namespace): kept until unregistered
            self.ref = lambda machine=machine: machine
        self._names: set[str] | None = None
        self._ids: set[int] | None = None

    def _walk(self) -> None:
        machine = self.ref()
        names: set[str] = set()
        ids: set[int] = set()
        stack = []
        devices = getattr(machine, "devices", None)
        if callable(devices):
            try:
                stack.extend(devices())
            except Exception:  # noqa: BLE001 - a machine that cannot list its devices: names only
                pass
        if hasattr(machine, "children") and callable(machine.children):
            stack.append(machine)
        while stack:
            dev = stack.pop()
            if id(dev) in ids:
                continue
            ids.add(id(dev))
            name = getattr(dev, "name", None)
            if isinstance(name, str) and name:
                names.add(name)
            children = getattr(dev, "children", None)
            if callable(children):
                try:
                    stack.extend(child for _, child in children())
                except Exception:  # noqa: BLE001
                    pass
        self._names, self._ids = names, ids

    @property
    def names(self) -> set[str]:
        if self._names is None:
            self._walk()
        return self._names or set()

    @property
    def ids(self) -> set[int]:
        if self._ids is None:
            self._walk()
        return self._ids or set()


_machines: list[_Registered] = []
_machines_lock = threading.Lock()


def register_machine(machine: Any) -> None:
    """Make ``machine`` (duck-typed: ``.profile``, ``.mode``, ``.seed``, and ``.devices()`` or an ophyd-async
    ``children()`` tree) known to every RunEngine of :func:`~acc_bluesky.data.make_run_engine`: a run that reads
    its devices then gets its :func:`machine_metadata` and a ``tool`` (the plan's name) without the user typing
    them (``RE(bp.count([m.bpm]))``). ``connect()`` calls it. Kept as a weak reference where possible."""
    with _machines_lock:
        _machines[:] = [r for r in _machines if r.ref() is not None and r.ref() is not machine]
        _machines.append(_Registered(machine))


def unregister_machine(machine: Any) -> None:
    """Forget a machine given to :func:`register_machine`."""
    with _machines_lock:
        _machines[:] = [r for r in _machines if r.ref() is not None and r.ref() is not machine]


def registered_machines() -> list[Any]:
    """The machines :func:`register_machine` knows (still alive), oldest first."""
    with _machines_lock:
        return [m for m in (r.ref() for r in _machines) if m is not None]


def _describe(machine: Any) -> str:
    prof = getattr(machine, "profile", None)
    return f"{getattr(prof, 'name', '?')} ({getattr(machine, 'mode', '?')}, seed {getattr(machine, 'seed', None)})"


class FairFiller:
    """Fills a start document from the registered machine whose devices the run uses (``md_normalizer`` of the
    RunEngines of :func:`~acc_bluesky.data.make_run_engine`; ``preprocessor`` notes the devices a plan's messages
    touch before its run opens).

    Only what is missing is filled: the machine keys (:func:`machine_metadata`) if any of them is absent, and
    ``tool`` from ``plan_name``. The machine is the one whose devices appear in the plan's messages before the run
    opens (``stage``, ``read``, ``set``...), else whose device names are the run's ``detectors``/``motors``, else
    the only registered one. Several candidates with different metadata: :class:`MetadataError` names them.
    """

    MACHINE_KEYS = ("facility", "accelerator", "profile", "lattice", "mode")

    def __init__(self, strict: bool = True) -> None:
        self._seen: set[int] = set()
        self.strict = strict  # False (a RunEngine without validation): an unknown machine fills nothing, silently

    def preprocessor(self, plan: Any) -> Any:
        """A RunEngine preprocessor noting the objects of the messages since the last run opened."""
        from bluesky.preprocessors import msg_mutator

        seen = self._seen
        seen.clear()  # (what the previous plan touched after its last run closed)
        opened = [False]

        def note(msg: Any) -> Any:
            if opened[0]:  # the run opened: its machine is known; start afresh for the next one
                seen.clear()
                opened[0] = False
            if msg.command == "open_run":
                opened[0] = True
            elif msg.obj is not None:
                seen.add(id(msg.obj))
            return msg

        return msg_mutator(plan, note)

    def _machine(self, md: Mapping[str, Any]) -> Any | None:
        with _machines_lock:
            regs = [r for r in _machines if r.ref() is not None]
        if not regs:
            return None
        candidates = [r for r in regs if r.ids & self._seen] if self._seen else []
        if not candidates and not self._seen:  # (names only when no device object was seen: a device of no
            # connected machine may well be called "bpm" too)
            names = {str(n) for key in ("detectors", "motors") for n in (md.get(key) or ())}
            candidates = [r for r in regs if r.names & names] if names else []
        if not candidates:
            # a run that touched devices of no connected machine is not that machine's; one that touched no device
            # at all is the only connected machine's
            candidates = regs if len(regs) == 1 and not self._seen else []
            if not candidates:
                raise MetadataError(
                    [k for k in self.MACHINE_KEYS if k not in md],
                    [f"the run's devices belong to none of the {len(regs)} connected machines "
                     f"({', '.join(_describe(r.ref()) for r in regs)}), so its machine metadata is unknown"])
        machines = [r.ref() for r in candidates]
        mds = [machine_metadata(m) for m in machines]
        if any(x != mds[0] for x in mds[1:]):
            raise MetadataError(
                [k for k in self.MACHINE_KEYS if k not in md],
                [f"the run's devices match {len(machines)} connected machines with different metadata "
                 f"({', '.join(_describe(m) for m in machines)}): pass md=machine_metadata(m) for the one meant"])
        return machines[0]

    def __call__(self, md: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(md)
        if any(out.get(k) in (None, "", {}) for k in self.MACHINE_KEYS):
            try:
                machine = self._machine(out)
            except MetadataError:
                if self.strict:
                    raise
                machine = None
            if machine is not None:
                known = machine_metadata(machine)
                given = [k for k in self.MACHINE_KEYS if out.get(k) not in (None, "", {})]
                if any(out[k] != known.get(k) for k in given):
                    machine = None  # the keys given are another machine's: fill nothing (the validator says what
                    # is missing)
            if machine is not None:
                for key, value in known.items():
                    if key == "seed":
                        out.setdefault("seed", value)  # (None is a value: the ideal machine)
                    elif out.get(key) in (None, "", {}):
                        out[key] = value
        if out.get("tool") in (None, "") and out.get("plan_name"):
            out["tool"] = str(out["plan_name"])
        return out


def operator_name() -> str:
    """The operator: ``$ACC_BLUESKY_OPERATOR``, else the login name, else ``"unknown"``."""
    name = os.environ.get(ENV_OPERATOR)
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


@functools.lru_cache(maxsize=1)
def _static_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for dist, module in _SOFTWARE.items():
        version = None
        mod = sys.modules.get(module)
        if mod is not None:
            version = getattr(mod, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        if version is not None:
            versions[dist] = str(version)
    versions["python"] = platform.python_version()
    return versions


def software_versions() -> dict[str, str]:
    """Versions of the software that records a run: acc-bluesky, accelerator-toolbox (pyAT), bluesky,
    ophyd-async, tiled, bluesky-tiled-plugins, event-model, numpy and Python (absent packages are left out)."""
    return dict(_static_versions())


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of ``value``: numpy scalars and arrays become numbers and lists, paths and
    enums their string/value, devices their ``name``; anything else its ``repr``. Non-finite floats are kept
    (Tiled and the JSON backups accept NaN and inf)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, (pathlib.PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    name = getattr(value, "name", None)
    if isinstance(name, str) and name:
        return name
    return repr(value)


def tool_metadata(
    tool: str,
    machine: Any,
    /,
    *,
    plan_name: str | None = None,
    license: str | None = None,  # noqa: A002 - the metadata key is "license"
    **params: Any,
) -> dict[str, Any]:
    """Build the start-document metadata of a plan run on ``machine``.

    Args:
        tool: what the run measures or does, e.g. ``"orbit_response"``, ``"dispersion"``, ``"bba"``.
        machine: the connected machine (duck-typed). It must have ``machine.profile`` with ``name``,
            ``facility``, ``accelerator``, ``path``, ``sha256``, ``lattice_path``, ``lattice_sha256``, and
            ``machine.mode`` (``"sim"``/``"epics"``) and ``machine.seed`` (int or None).
        plan_name: the plan's name; by default the name of the calling function (the plan).
        license: data licence (SPDX id); default ``$ACC_BLUESKY_LICENSE`` or ``"CC-BY-4.0"``.
        **params: the plan's parameters, in the units of the plan's docstring; stored JSON-safe under
            ``parameters``.

    Returns:
        A dict with ``facility``, ``accelerator``, ``profile`` ({name, sha256, file}), ``lattice``
        ({file, sha256}), ``mode``, ``tool``, ``operator``, ``license``, ``software``, ``parameters``,
        ``plan_name`` and, in sim mode, ``seed``.
    """
    if plan_name is None:
        caller = sys._getframe(1).f_code.co_name
        plan_name = caller if caller.isidentifier() else tool
    md = machine_metadata(machine)
    md.update(
        {
            "tool": tool,
            "operator": operator_name(),
            "license": license or os.environ.get(ENV_LICENSE) or DEFAULT_LICENSE,
            "software": software_versions(),
            "parameters": json_safe(params),
            "plan_name": plan_name,
        }
    )
    return md


def machine_metadata(machine: Any) -> dict[str, Any]:
    """What a run records about the machine: ``facility``, ``accelerator``, ``profile`` ({name, sha256,
    file}), ``lattice`` ({file, sha256}), ``mode`` and, in sim mode, ``seed``. ``machine`` is duck-typed as in
    :func:`tool_metadata`. Used for ``RE.md`` in interactive sessions."""
    profile = machine.profile
    mode = str(machine.mode)
    md: dict[str, Any] = {
        "facility": str(profile.facility),
        "accelerator": str(profile.accelerator),
        "profile": {
            "name": str(profile.name),
            "sha256": str(profile.sha256),
            "file": os.fspath(profile.path),
        },
        "lattice": {
            "file": os.fspath(profile.lattice_path),
            "sha256": str(profile.lattice_sha256),
        },
        "mode": mode,
    }
    if mode == "sim":
        seed = getattr(machine, "seed", None)
        md["seed"] = None if seed is None else int(seed)
    return md
