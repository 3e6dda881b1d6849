"""Autosave of the twin IOC's setpoints, and the PV list: files written atomically, checked when read.

The autosave file (``acc-bluesky ioc PROFILE --autosave FILE``) is JSON: every family's setpoints (hardware
units, in the order of ``profile.families[f].device_names``) and the RF frequency and voltage::

    {"format": "acc_bluesky.ioc.autosave/1", "profile": "ebs", "saved": "2026-01-01T12:00:00+00:00",
     "families": {"HST": {"units": "A", "devices": ["HST:001", ...], "setpoints": [0.0, ...]}, ...},
     "rf": {"frequency": 352202000.0, "voltage": 6000000.0}}

Floats are written with ``repr`` precision, so a restore gives back the exact values. A file that does not fit
the profile (another profile, an unknown family, a wrong count, a value outside the limits or not finite) is
refused as a whole with an :class:`AutosaveError` naming the file, the key and what is expected: an IOC must
not start half restored. A family missing from the file keeps its design setpoints (logged).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..profile import Profile
from ..twin import Twin

__all__ = ["FORMAT", "PV_LIST_COLUMNS", "AutosaveError", "PvRow", "atomic_write", "load", "read_pv_list", "restore",
           "save", "snapshot", "write_pv_list"]

log = logging.getLogger(__name__)

FORMAT = "acc_bluesky.ioc.autosave/1"


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc; 022 elsewhere): files get the mode open() gives."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


class AutosaveError(ValueError):
    """An autosave file that cannot be restored: the message names the file, the key and what is expected."""


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, flushed to disk, then renamed
    over ``path`` (readers see the old or the new file, never a partial one, even if the process dies)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself on disk
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def snapshot(twin: Twin) -> dict[str, Any]:
    """Every setpoint of the twin, as written to an autosave file."""
    prof = twin.profile
    fams = {}
    for fname in twin.family_names:
        fams[fname] = {"units": twin.family(fname).spec.units, "devices": list(prof.families[fname].device_names),
                       "setpoints": [float(v) for v in np.asarray(twin.get_setpoint(fname), dtype=float)]}
    return {"format": FORMAT, "profile": prof.name,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "families": fams,
            "rf": {"frequency": float(twin.rf_frequency_setpoint), "voltage": float(twin.rf_voltage_setpoint)}}


def save(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write a :func:`snapshot` to ``path`` atomically."""
    return atomic_write(path, json.dumps(data, indent=1) + "\n")


def _fail(path: Path, key: str, what: str) -> AutosaveError:
    return AutosaveError(f"autosave file {path}: {key}: {what}. Fix the file or move it away to start from the "
                         "design setpoints; nothing was restored.")


def load(path: str | os.PathLike, profile: Profile) -> dict[str, Any]:
    """Read and check an autosave file against ``profile`` (raises :class:`AutosaveError`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise AutosaveError(f"autosave file {path}: cannot be read ({err})") from err
    except json.JSONDecodeError as err:
        raise _fail(path, f"line {err.lineno}", f"not valid JSON ({err.msg})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _fail(path, "format", f"expected {FORMAT!r}, got {got!r}")
    if data.get("profile") != profile.name:
        raise _fail(path, "profile", f"saved for profile {data.get('profile')!r}, this IOC serves {profile.name!r}")
    fams = data.get("families")
    if not isinstance(fams, dict):
        raise _fail(path, "families", "expected a mapping of family name -> setpoints")
    for fname, entry in fams.items():
        if fname not in profile.families:
            raise _fail(path, f"families.{fname}", f"unknown family; this profile has {sorted(profile.families)}")
        fam = profile.families[fname]
        vals = entry.get("setpoints") if isinstance(entry, dict) else None
        if not isinstance(vals, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in vals):
            raise _fail(path, f"families.{fname}.setpoints", "expected a list of numbers")
        if len(vals) != len(fam):
            raise _fail(path, f"families.{fname}.setpoints", f"{len(vals)} values, the family has {len(fam)} magnets")
        try:
            fam.spec.limits.check(fname, np.asarray(vals, dtype=float), fam.spec.units, names=fam.device_names)
        except ValueError as err:
            raise _fail(path, f"families.{fname}.setpoints", str(err).split("; nothing")[0]) from err
    rf = data.get("rf", {})
    if not isinstance(rf, dict):
        raise _fail(path, "rf", "expected {frequency: Hz, voltage: V}")
    spec = profile.spec.rf
    for key, lim, units in (("frequency", spec.frequency_limits, "Hz"), ("voltage", spec.voltage_limits, "V")):
        if key in rf:
            v = rf[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise _fail(path, f"rf.{key}", f"expected a finite number [{units}], got {v!r}")
            try:
                lim.check(f"RF {key}", float(v), units)
            except ValueError as err:
                raise _fail(path, f"rf.{key}", str(err).split("; nothing")[0]) from err
    return data


def restore(twin: Twin, data: dict[str, Any]) -> int:
    """Apply a :func:`load`-ed autosave to the twin; returns how many setpoints were restored."""
    n = 0
    for fname in twin.family_names:
        entry = data["families"].get(fname)
        if entry is None:
            log.warning("autosave has no setpoints of family %s: it keeps its design setpoints", fname)
            continue
        twin.set_setpoint(fname, np.asarray(entry["setpoints"], dtype=float))
        n += len(entry["setpoints"])
    rf = data.get("rf", {})
    if "frequency" in rf:
        twin.set_rf_frequency(float(rf["frequency"]))
        n += 1
    if "voltage" in rf:
        twin.set_rf_voltage(float(rf["voltage"]))
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------
# PV list
@dataclass(frozen=True)
class PvRow:
    """One record of the IOC: name, EPICS record type, units, description (DESC), and what it is for:
    ``setpoint`` (operators write it), ``readback``, ``status``, ``command`` (fault injection) or ``internal``
    (fanouts that distribute the waveforms: not worth archiving)."""

    pv: str
    record_type: str
    units: str
    description: str
    kind: str


PV_LIST_COLUMNS = ("pv", "record_type", "units", "description", "kind")


def write_pv_list(path: str | os.PathLike, rows: Iterable[PvRow]) -> Path:
    """Write the PV list atomically: CSV with a header (:data:`PV_LIST_COLUMNS`), one PV per line; a name ending
    in ``.txt`` gets the PV names only, one per line (the Archiver Appliance's bulk archive form)."""
    path = Path(path)
    rows = list(rows)
    if path.suffix.lower() == ".txt":
        return atomic_write(path, "".join(r.pv + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PV_LIST_COLUMNS)
    for r in rows:
        w.writerow([r.pv, r.record_type, r.units, r.description, r.kind])
    return atomic_write(path, buf.getvalue())


def read_pv_list(path: str | os.PathLike) -> list[PvRow]:
    """Read a CSV PV list written by :func:`write_pv_list`."""
    with open(path, newline="", encoding="utf-8") as f:
        return [PvRow(**{k: row[k] for k in PV_LIST_COLUMNS}) for row in csv.DictReader(f)]
