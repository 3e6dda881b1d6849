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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LICENSE",
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


def make_md_validator(extra: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """A ``RunEngine.md_validator``: bluesky's own checks, then :func:`validate_metadata`, then ``extra``."""
    try:  # bluesky's own check ('sample' must be a str or a dict); private, so optional
        from bluesky.run_engine import _default_md_validator
    except ImportError:  # pragma: no cover
        _default_md_validator = None

    def md_validator(md: dict) -> None:
        if _default_md_validator is not None:
            _default_md_validator(md)
        validate_metadata(md)
        if extra is not None:
            extra(md)

    return md_validator


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
