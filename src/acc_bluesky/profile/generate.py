"""Write a working profile for any pyAT lattice (ring or line): ``acc-bluesky profile new LATTICE_FILE``.

Families are guessed from element classes and names: BPMs are ``Monitor`` elements (else markers named like BPMs,
else the quadrupoles); correctors are ``Corrector`` elements (split into H and V by name when the names say so),
else kick windings (``KickAngle``) in the sextupoles, else in the quadrupoles; quadrupoles and sextupoles are grouped
by family name. Calibrations are linear, sized so that the largest design strength sits near 100 A.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["generate_profile", "write_profile", "guess_kind"]

_BPM_NAME = re.compile(r"(?i).*(bpm|pu|monitor).*")
_HCOR = re.compile(r"(?i)^(h|ch|hc|hcm|hcor|hst|sh|xcor|cx).*|.*(hcor|hkick|_h)$")
_VCOR = re.compile(r"(?i)^(v|cv|vc|vcm|vcor|vst|sv|ycor|cy).*|.*(vcor|vkick|_v)$")


def _load(path: Path):
    import at

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.load_lattice(str(path))


def guess_kind(ring) -> str:
    """``ring`` if the geometry closes (total bending 2 pi), else ``line``."""
    total = sum(float(getattr(e, "BendingAngle", 0.0)) for e in ring) * getattr(ring, "periodicity", 1)
    return "ring" if abs(abs(total) - 2 * math.pi) < 1e-3 else "line"


def _classes(ring, name: str) -> list[int]:
    return [i for i, e in enumerate(ring) if type(e).__name__ == name]


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return s if s and not s[0].isdigit() else f"F{s}"


def _round1(x: float) -> float:
    """One significant digit (calibrations read well in a profile)."""
    if x == 0 or not np.isfinite(x):
        return 1.0
    e = math.floor(math.log10(abs(x)))
    return round(x / 10**e) * 10**e


def _magnet_families(ring, cls: str, index: int, ftype: str, units: str) -> dict[str, Any]:
    by_name: dict[str, list[float]] = {}
    for i in _classes(ring, cls):
        e = ring[i]
        pb = np.asarray(getattr(e, "PolynomB", [0.0]), dtype=float)
        by_name.setdefault(e.FamName, []).append(float(pb[index]) if len(pb) > index else 0.0)
    fams: dict[str, Any] = {}
    for fam, vals in by_name.items():
        vmax = max(abs(v) for v in vals) or 1.0
        cal = _round1(vmax / 100.0)
        lim = float(max(10.0, math.ceil(1.5 * vmax / cal / 10.0) * 10.0))
        fams[_safe(fam)] = {
            "type": ftype, "select": {"class": cls, "name": re.escape(fam)}, "field": f"PolynomB[{index}]",
            "calibration": {"linear": cal}, "physics_units": units, "limits": [-lim, lim],
        }
    return fams


def generate_profile(lattice_file: str | Path, *, name: str | None = None, facility: str | None = None,
                     kind: str | None = None, relative_to: Path | None = None) -> dict[str, Any]:
    """Build a profile dict for ``lattice_file`` (any format pyAT loads). See the module docstring."""
    path = Path(lattice_file).resolve()
    ring = _load(path)
    kind = kind or guess_kind(ring)
    notes: list[str] = []

    # lattice reference: a file shipped in an importable package is referenced by package
    lat: dict[str, str]
    try:
        import machine_data

        md_dir = Path(machine_data.__file__).resolve().parent
    except ImportError:  # pragma: no cover
        md_dir = None
    if md_dir is not None and path.parent == md_dir:
        lat = {"package": "machine_data", "file": path.name}
    elif relative_to is not None:
        try:
            lat = {"path": str(path.relative_to(relative_to.resolve()))}
        except ValueError:
            lat = {"path": str(path)}
    else:
        lat = {"path": str(path)}

    # BPMs
    if _classes(ring, "Monitor"):
        bpm = {"select": {"class": "Monitor"}}
    elif any(type(e).__name__ == "Marker" and _BPM_NAME.fullmatch(e.FamName) for e in ring):
        bpm = {"select": {"class": "Marker", "name": r"(?i).*(bpm|pu|monitor).*"}}
        notes.append("BPMs: no Monitor elements; markers named like BPMs are used")
    else:
        bpm = {"select": {"class": "Quadrupole"}}
        notes.append("BPMs: no Monitor or BPM marker in the lattice; one BPM per quadrupole is assumed")

    families: dict[str, Any] = {}
    kick_cal, kick_lim = 1.0e-5, 40.0  # rad/A, A (0.4 mrad)
    cors = _classes(ring, "Corrector")
    if cors:
        names = {ring[i].FamName for i in cors}
        hn = {n for n in names if _HCOR.fullmatch(n) and not _VCOR.fullmatch(n)}
        vn = {n for n in names if _VCOR.fullmatch(n) and not _HCOR.fullmatch(n)}
        if hn and vn and hn | vn == names:
            hsel = {"class": "Corrector", "name": "|".join(re.escape(n) for n in sorted(hn))}
            vsel = {"class": "Corrector", "name": "|".join(re.escape(n) for n in sorted(vn))}
        else:
            hsel = vsel = {"class": "Corrector"}
        host = "Corrector"
    else:
        host = "Sextupole" if _classes(ring, "Sextupole") else "Quadrupole"
        hsel = vsel = {"class": host}
        notes.append(f"correctors: no Corrector elements; kick windings (KickAngle) in every {host}")
    common = {"calibration": {"linear": kick_cal}, "physics_units": "rad", "limits": [-kick_lim, kick_lim]}
    families["HCM"] = {"type": "hcor", "select": hsel, "field": "KickAngle[0]", **common,
                       "description": f"horizontal correctors ({host})"}
    families["VCM"] = {"type": "vcor", "select": vsel, "field": "KickAngle[1]", **common,
                       "description": f"vertical correctors ({host})"}
    families.update(_magnet_families(ring, "Quadrupole", 1, "quadrupole", "m^-2"))
    families.update(_magnet_families(ring, "Sextupole", 2, "sextupole", "m^-3"))

    prof: dict[str, Any] = {
        "facility": facility or (getattr(ring, "name", "") or path.stem),
        "accelerator": f"{path.stem} {kind}",
        "description": f"Generated by acc-bluesky profile new from {path.name}. " + "; ".join(notes),
        "energy": float(ring.energy),
        "lattice": lat,
        "kind": kind,
        "orbit_model": "4d",
        "bpm": bpm,
        "families": families,
    }
    try:
        f0 = float(ring.get_rf_frequency())
        prof["rf"] = {"frequency_limits": [f0 * (1 - 1e-4), f0 * (1 + 1e-4)], "voltage_limits": [0.0, 1e8]}
    except Exception:  # noqa: BLE001 - a lattice without a cavity
        pass
    prof["errors"] = {
        "truncation": 2.5, "scale": 1.0,
        "magnets": [
            {"select": {"class": "Quadrupole"}, "dx": 30e-6, "dy": 30e-6, "roll": 100e-6, "field": 5e-4},
            *([{"select": {"class": "Sextupole"}, "dx": 20e-6, "dy": 20e-6, "roll": 100e-6, "field": 1e-3}]
              if _classes(ring, "Sextupole") else []),
        ],
        "bpm": {"offset": 50e-6, "gain": 0.01, "roll": 1e-3, "noise": 1e-7, "tbt_noise": 10e-6},
        "corrector_calibration": 0.02, "tune_noise": 1e-5,
    }
    prof["controls"] = {"prefix": f"{_safe(name or path.stem).upper()}:"}
    if kind == "line":
        prof["twiss_in"] = {"beta": [10.0, 10.0], "alpha": [0.0, 0.0]}
        prof["description"] += " Line: set twiss_in to the real initial optics."
    return prof


def write_profile(lattice_file: str | Path, out_dir: str | Path | None = None, *, name: str | None = None,
                  facility: str | None = None, kind: str | None = None) -> Path:
    """Generate and write ``<out_dir>/profile.yaml``; returns its path (validated by loading it back)."""
    from .loader import load_profile

    lattice_file = Path(lattice_file)
    name = name or _safe(lattice_file.stem).lower()
    out = Path(out_dir) if out_dir else Path.cwd() / name
    out.mkdir(parents=True, exist_ok=True)
    prof = generate_profile(lattice_file, name=name, facility=facility, kind=kind, relative_to=out)
    path = out / "profile.yaml"
    header = (f"# acc_bluesky profile generated from {lattice_file.name}: one line per family.\n"
              "# Edit calibrations, limits, PV templates and errors to match the real machine.\n")
    path.write_text(header + yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=120))
    load_profile(path).families  # noqa: B018 - validate selections now, with the profile's own messages
    return path
