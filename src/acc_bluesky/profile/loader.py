"""Find, read and validate a profile; resolve its lattice and element selections."""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from .lattice_io import LatticeFileError, read_lattice
from .schema import FamilySpec, ProfileSpec, Selector, format_device_name

__all__ = [
    "ASSUMED_RF_FREQUENCY",
    "Profile",
    "ProfileError",
    "ProfileWarning",
    "assumed_harmonic_number",
    "available_profiles",
    "load_profile",
    "profile_search_path",
]

PROFILE_PATH_ENV = "ACC_BLUESKY_PROFILE_PATH"
_PACKAGE_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


#: the RF frequency [Hz] assumed for a ring whose lattice has no cavity and whose profile gives no
#: ``rf.harmonic_number``: most light sources run near 500 MHz (ESRF-EBS: 352 MHz)
ASSUMED_RF_FREQUENCY = 500e6


def assumed_harmonic_number(revolution_frequency: float) -> int:
    """The harmonic number whose RF frequency (``h x revolution_frequency`` [Hz]) is nearest
    :data:`ASSUMED_RF_FREQUENCY`."""
    f = float(revolution_frequency)
    if not (np.isfinite(f) and f > 0):
        raise ValueError(f"the revolution frequency must be a positive number of Hz, got {revolution_frequency!r}")
    return max(1, round(ASSUMED_RF_FREQUENCY / f))


class ProfileError(ValueError):
    """A profile that cannot be used: the message names the file, the key and what was expected."""


class ProfileWarning(UserWarning):
    """A profile that loads but has a questionable entry (named with file and key)."""


#: the main field of each element class (what ``select.strength`` compares without a family field)
_MAIN_FIELD = {"Quadrupole": ("PolynomB", 1), "Sextupole": ("PolynomB", 2), "Octupole": ("PolynomB", 3),
               "Dipole": ("BendingAngle", None), "Bend": ("BendingAngle", None), "Corrector": ("KickAngle", 0)}
_ALIASES = {"K": ("PolynomB", 1), "H": ("PolynomB", 2)}
#: the fields a family type drives (anything else has no effect as that kind of magnet)
_TYPE_FIELDS = {
    "hcor": {("KickAngle", 0), ("PolynomB", 0)},
    "vcor": {("KickAngle", 1), ("PolynomA", 0)},
    "quadrupole": {("PolynomB", 1)},
    "sextupole": {("PolynomB", 2)},
    "octupole": {("PolynomB", 3)},
    "dipole": {("PolynomB", 0), ("BendingAngle", None)},
}
_TYPE_HINT = {"hcor": "KickAngle[0] (or PolynomB[0])", "vcor": "KickAngle[1] (or PolynomA[0])",
              "quadrupole": "PolynomB[1] (or K)", "sextupole": "PolynomB[2] (or H)", "octupole": "PolynomB[3]",
              "dipole": "PolynomB[0] or BendingAngle", "skew": "PolynomA[n]"}


def _acts(passmethod: str, attr: str) -> bool:
    """Whether a pass method uses the field ``attr`` (PolynomA/B, KickAngle)."""
    pm = passmethod or ""
    if attr == "KickAngle":
        return "MPole" in pm or "Multipole" in pm or "Corrector" in pm or "Bend" in pm
    if attr in ("PolynomA", "PolynomB"):
        return "MPole" in pm or "Multipole" in pm or "Bend" in pm
    return True


def design_tilt_angle(r1: Any) -> float | None:
    """The angle [rad] of an element's entrance rotation ``R1`` when it is a design tilt, not an error: a pure x-y
    rotation by a multiple of 45 degrees (a skew quadrupole built as a rolled normal one, a vertical bend rolled by
    90 degrees); else None. pyAT's convention (``at.tilt_elem``): ``R1[0, 2] = sin(angle)``."""
    if r1 is None:
        return None
    r = np.asarray(r1, dtype=float)
    if r.shape != (6, 6):
        return None
    theta = math.atan2(r[0, 2], r[0, 0])
    quarter = math.pi / 4
    if abs(theta / quarter - round(theta / quarter)) > 1e-6:
        return None
    c, s = math.cos(theta), math.sin(theta)
    rot = np.eye(6)
    rot[0, 0] = rot[1, 1] = rot[2, 2] = rot[3, 3] = c
    rot[0, 2] = rot[1, 3] = s
    rot[2, 0] = rot[3, 1] = -s
    return theta if np.allclose(r, rot, atol=1e-9) else None


def rotated_skew(e) -> bool:
    """A quadrupole rolled by an odd multiple of 45 degrees (by design): its normal gradient is a skew one."""
    theta = design_tilt_angle(getattr(e, "R1", None))
    return theta is not None and round(theta / (math.pi / 4)) % 2 == 1


def _field_value(e, attr: str, index: int | None) -> float:
    v = getattr(e, attr, None)
    if v is None:
        return float("nan")
    if index is None:
        return float(v)
    v = np.asarray(v, dtype=float).reshape(-1)
    return float(v[index]) if index < len(v) else 0.0


def profile_search_path() -> list[Path]:
    """Folders searched for ``<name>/profile.yaml``: ``$ACC_BLUESKY_PROFILE_PATH`` then the shipped profiles."""
    extra = [Path(p) for p in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, _PACKAGE_PROFILES]


def available_profiles() -> list[str]:
    names = set()
    for d in profile_search_path():
        if d.is_dir():
            names.update(p.parent.name for p in d.glob("*/profile.yaml"))
    return sorted(names)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid profile ({err.error_count()} problem(s)):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top>"
        got = e.get("input")
        got_s = repr(got)
        if len(got_s) > 80:
            got_s = got_s[:77] + "..."
        lines.append(f"  - key '{key}': {e['msg']} (got {got_s})")
    return "\n".join(lines)


@dataclass(frozen=True)
class Family:
    """A resolved family: the spec plus the lattice indices it drives."""

    name: str
    spec: FamilySpec
    refpts: np.ndarray  # uint32 lattice indices
    element_names: tuple[str, ...]
    bad: frozenset[int] = field(default_factory=frozenset)
    names: tuple[str, ...] = ()  # device names (from spec.device_names); filled by the loader

    def __post_init__(self) -> None:
        if not self.names:
            tpl = self.spec.device_names
            object.__setattr__(self, "names", tuple(
                format_device_name(tpl, self.name, i + 1, e) for i, e in enumerate(self.element_names)))

    @property
    def device_names(self) -> list[str]:
        """One name per device, used everywhere (devices, runs, ``status.bad``, the PVs' ``{device}``)."""
        return list(self.names)

    @property
    def good(self) -> np.ndarray:
        """Boolean mask of devices in service."""
        m = np.ones(len(self.refpts), dtype=bool)
        m[list(self.bad)] = False
        return m

    def __len__(self) -> int:
        return len(self.refpts)


class Profile:
    """A validated profile. ``spec`` holds the data; the rest is derived from it and the lattice."""

    def __init__(self, spec: ProfileSpec, path: Path, name: str | None = None):
        self.spec = spec
        self.path = path
        self.name = name or path.parent.name
        self.sha256 = _sha256(path)
        self.warnings: list[str] = []  # questionable entries found by validate()

    # -- identity -------------------------------------------------------------------------------------
    facility = property(lambda self: self.spec.facility)
    accelerator = property(lambda self: self.spec.accelerator)
    energy = property(lambda self: self.spec.energy)
    kind = property(lambda self: self.spec.kind)

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, facility={self.facility!r}, accelerator={self.accelerator!r})"

    @functools.cached_property
    def lattice_path(self) -> Path:
        src = self.spec.lattice
        if src.path is not None:
            p = Path(src.path)
            p = p if p.is_absolute() else (self.path.parent / p)
            if not p.exists():
                raise ProfileError(f"{self.path}: key 'lattice.path': file {p} does not exist")
            return p.resolve()
        try:
            mod = importlib.import_module(src.package)
        except ImportError as err:
            raise ProfileError(
                f"{self.path}: key 'lattice.package': cannot import package {src.package!r} ({err})"
            ) from err
        p = Path(mod.__file__).parent / src.file
        if not p.exists():
            raise ProfileError(f"{self.path}: key 'lattice.file': {src.file!r} is not in package {src.package!r}")
        return p

    @functools.cached_property
    def lattice_sha256(self) -> str:
        return _sha256(self.lattice_path)

    def load_lattice(self):
        """A fresh copy of the design lattice (4D: radiation and cavities off unless the profile asks 6D)."""
        return self._design_lattice.deepcopy()

    @functools.cached_property
    def _design_lattice(self):
        pre = _PRELOADED.pop(self.path, None)
        if pre is not None:
            return pre
        src = self.spec.lattice
        opts = src.options.kwargs()
        if self.spec.rf.harmonic_number and "harmonic_number" not in opts:
            opts["harmonic_number"] = self.spec.rf.harmonic_number
        try:
            ring = read_lattice(self.lattice_path, format=src.format, energy=self.spec.energy, use=src.name, **opts)
        except LatticeFileError as err:
            raise ProfileError(f"{self.path}: key 'lattice': {err}") from err
        ring.energy = self.spec.energy
        if self.spec.orbit_model == "4d" and ring.is_6d:
            ring.disable_6d()
        elif self.spec.orbit_model == "6d" and not ring.is_6d:
            ring.enable_6d()
        return ring

    # -- selections -----------------------------------------------------------------------------------
    @functools.cached_property
    def _element_table(self) -> tuple[list[str], list[str]]:
        ring = self._design_lattice
        return [type(e).__name__ for e in ring], [e.FamName for e in ring]

    @functools.cached_property
    def _by_class(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, c in enumerate(self._element_table[0]):
            out.setdefault(c, []).append(i)
        return out

    def select(self, sel: Selector, where: str = "select", field: tuple[str, int | None] | None = None,
               empty_ok: bool = False) -> np.ndarray:
        """Lattice indices selected by ``sel`` (class, name regex, exclude regex, design strength).

        ``field`` (attribute, index) is what ``sel.strength`` compares (a family's field); default: the main
        multipole of each element's class."""
        ring = self._design_lattice
        cls_names, fam_names = self._element_table
        classes = set(sel.classes)
        name_re = re.compile(sel.name) if sel.name else None
        excl_re = re.compile(sel.exclude) if sel.exclude else None
        idx = []
        cand = sorted(i for c in classes for i in self._by_class.get(c, ())) if classes else range(len(cls_names))
        for i in cand:
            cn, fn = cls_names[i], fam_names[i]
            if name_re is not None and not name_re.fullmatch(fn):
                continue
            if excl_re is not None and excl_re.fullmatch(fn):
                continue
            if sel.strength is not None:
                attr, index = field if field is not None else _MAIN_FIELD.get(cn, (None, None))
                v = _field_value(ring[i], *_ALIASES.get(attr, (attr, index))) if attr else float("nan")
                if not abs(v - sel.strength) <= sel.rtol * max(abs(sel.strength), 1.0 if sel.strength == 0 else 0):
                    continue
            idx.append(i)
        if not idx and not empty_ok:
            raise ProfileError(
                f"{self.path}: key '{where}': selects no element of {self.lattice_path.name} "
                f"(class={sel.classes or 'any'}, name={sel.name!r}"
                + (f", strength={sel.strength!r}" if sel.strength is not None else "") + "); "
                f"element classes present: {sorted(set(cls_names))}"
            )
        return np.asarray(idx, dtype=np.uint32)

    def _bad(self, names: list[str], bad: list[int | str], where: str) -> frozenset[int]:
        out = set()
        index = {n: i for i, n in enumerate(names)}
        for b in bad:
            if isinstance(b, int):
                if not 0 <= b < len(names):
                    raise ProfileError(f"{self.path}: key '{where}': index {b} out of range 0..{len(names) - 1} "
                                       "(0-based; or give the device name)")
                out.add(b)
            elif b in index:
                out.add(index[b])
            else:
                raise ProfileError(f"{self.path}: key '{where}': unknown device {b!r}; device names look like "
                                   f"{names[0]!r} ... {names[-1]!r} (or give a 0-based index)")
        return frozenset(out)

    def _check_field(self, fname: str, spec: FamilySpec, refs: np.ndarray) -> None:
        """Refuse a field that cannot act on the selected elements or that is not what the family type drives."""
        ring = self._design_lattice
        key = f"families.{fname}.field"
        attr, index = spec.field_parts
        attr, index = _ALIASES.get(attr, (attr, index))
        want = _TYPE_FIELDS.get(spec.type)
        if want is not None and (attr, index) not in want:
            raise ProfileError(
                f"{self.path}: key '{key}': {spec.field!r} has no effect as the field of a {spec.type} family "
                f"{fname!r} (a {spec.type} family drives {_TYPE_HINT[spec.type]}); fix the field, or use type: "
                "magnet for another multipole")
        if spec.type == "skew" and attr != "PolynomA" and not (
                (attr, index) == ("PolynomB", 1) and all(rotated_skew(ring[int(r)]) for r in refs.tolist())):
            raise ProfileError(f"{self.path}: key '{key}': {spec.field!r} is not a skew field of family {fname!r} "
                               "(a skew family drives PolynomA[n])")
        seen: set[str] = set()
        for r in refs.tolist():
            e = ring[r]
            cls = type(e).__name__
            if cls in seen:
                continue
            seen.add(cls)
            pm = getattr(e, "PassMethod", "")
            if attr in ("KickAngle", "PolynomA", "PolynomB"):
                if not _acts(pm, attr):
                    raise ProfileError(
                        f"{self.path}: key '{key}': {spec.field!r} has no effect on {cls} element {e.FamName!r} "
                        f"(PassMethod {pm}) of family {fname!r}: select magnets whose pass method uses {attr}")
                if attr != "KickAngle" and index is not None and index > getattr(e, "MaxOrder", index):
                    msg = (f"{self.path}: key '{key}': {spec.field!r} is above the MaxOrder "
                           f"({getattr(e, 'MaxOrder', '?')}) of {cls} {e.FamName!r} in family {fname!r}: the twin "
                           "raises MaxOrder so the field acts; check it is the field you mean")
                    self.warnings.append(msg)
                    warnings.warn(msg, ProfileWarning, stacklevel=4)
            elif not hasattr(e, attr):
                raise ProfileError(f"{self.path}: key '{key}': {cls} element {e.FamName!r} of family {fname!r} has no "
                                   f"attribute {attr!r}")

    @functools.cached_property
    def families(self) -> dict[str, Family]:
        ring = self._design_lattice
        out = {}
        for fname, spec in self.spec.families.items():
            attr, index = spec.field_parts
            refs = self.select(spec.select, f"families.{fname}.select", field=(attr, index))
            self._check_field(fname, spec, refs)
            fam = Family(fname, spec, refs, tuple(ring[int(i)].FamName for i in refs))
            bad = self._bad(fam.device_names, spec.status.get("bad", []), f"families.{fname}.status.bad")
            out[fname] = Family(fname, spec, refs, fam.element_names, bad, fam.names)
        return out

    @functools.cached_property
    def bpm_refpts(self) -> np.ndarray:
        return self.select(self.spec.bpm.select, "bpm.select")

    @functools.cached_property
    def bpm_element_names(self) -> tuple[str, ...]:
        """The lattice FamName of each BPM."""
        _, fam_names = self._element_table
        return tuple(fam_names[int(i)] for i in self.bpm_refpts)

    @functools.cached_property
    def _bpm_names(self) -> tuple[str, ...]:
        tpl = self.spec.bpm.device_names
        return tuple(format_device_name(tpl, "BPM", i + 1, e) for i, e in enumerate(self.bpm_element_names))

    @property
    def bpm_names(self) -> list[str]:
        """One name per BPM (``bpm.device_names``, default ``BPM_001`` ...), used everywhere."""
        return list(self._bpm_names)

    def locate(self, device: str) -> tuple[str, int]:
        """``(family, index)`` of a device name (``("BPM", i)`` for a BPM); ``KeyError`` naming valid names."""
        hit = self._device_index.get(str(device))
        if hit is None:
            fam = next(iter(self.families.values()))
            raise KeyError(f"unknown device {device!r}; names look like {fam.device_names[0]!r} or "
                           f"{self.bpm_names[0]!r} (profile {self.name!r})")
        return hit

    @functools.cached_property
    def _device_index(self) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {n: ("BPM", i) for i, n in enumerate(self.bpm_names)}
        for fname, fam in self.families.items():
            for i, n in enumerate(fam.names):
                out.setdefault(n, (fname, i))
        return out

    # -- names and PV templates ---------------------------------------------------------------------------
    def pv_fields(self, family: str, index: int) -> dict[str, object]:
        """Placeholders of a magnet's PV templates: prefix, family, index (1-based), device, element, name."""
        fam = self.families[family]
        e = fam.element_names[index]
        return {"prefix": self.spec.controls.prefix, "family": family, "index": index + 1,
                "device": fam.names[index], "element": e, "name": e}

    def bpm_pv_fields(self, index: int) -> dict[str, object]:
        """Placeholders of a BPM's PV templates: prefix, family (BPM), index (1-based), device, element, name."""
        e = self.bpm_element_names[index]
        return {"prefix": self.spec.controls.prefix, "family": "BPM", "index": index + 1,
                "device": self._bpm_names[index], "element": e, "name": e}

    def validate(self) -> Profile:
        """Resolve everything that needs the lattice and refuse what cannot work (at load).

        Families and BPMs select elements; fields act on them; device names are unique across the machine;
        every device gets its own PVs; limits hold the design values. Raises :class:`ProfileError`."""
        fams = self.families
        _ = self.bpm_refpts
        self.bpm_bad  # noqa: B018 - resolves status.bad
        # one name per device across the whole machine
        owners: dict[str, list[str]] = {}
        for n in self.bpm_names:
            owners.setdefault(n, []).append("bpm")
        for fname, fam in fams.items():
            for n in fam.names:
                owners.setdefault(n, []).append(f"families.{fname}")
        dup = {n: w for n, w in owners.items() if len(w) > 1}
        if dup:
            shown = "; ".join(f"{n!r} in {', '.join(sorted(set(w)))}" for n, w in list(dup.items())[:5])
            keys = sorted({k for w in dup.values() for k in w})
            raise ProfileError(
                f"{self.path}: key '{keys[0]}.device_names': device names must be unique across the machine; "
                f"{len(dup)} repeat(s): {shown}. Use the default '{{family}}_{{n:03d}}', or '{{element}}' only where "
                "every device has its own lattice name")
        self._check_pvs()
        for msg in self.design_outside_limits + self._rf_warnings():
            self.warnings.append(msg)
            warnings.warn(msg, ProfileWarning, stacklevel=3)
        return self

    @functools.cached_property
    def rf_harmonic_number(self) -> tuple[int | None, str]:
        """``(h, source)``: the RF harmonic number of a ring and where it comes from (``"cavity"``: the lattice's
        cavity, ``"profile"``: ``rf.harmonic_number``, ``"lattice"``: the lattice's attribute, ``"assumed"``: the
        harmonic nearest :data:`ASSUMED_RF_FREQUENCY`); ``(None, "line")`` for a line."""
        if self.kind != "ring":
            return None, "line"
        import at

        ring = self._design_lattice
        if len(ring.get_uint32_index(at.RFCavity)):
            h = getattr(ring, "harmonic_number", None)  # None: a cavity pyAT cannot relate to the revolution
            if h:
                return int(h), "cavity"
        if self.spec.rf.harmonic_number:
            return int(self.spec.rf.harmonic_number), "profile"
        h = getattr(ring, "harmonic_number", None)
        if h:
            return int(h), "lattice"
        return assumed_harmonic_number(ring.revolution_frequency), "assumed"

    @functools.cached_property
    def rf_nominal_frequency(self) -> float:
        """The nominal RF frequency [Hz] of a ring: its cavity's, else ``h x`` the revolution frequency with the
        harmonic number of :attr:`rf_harmonic_number` (always > 0); 0.0 for a line."""
        h, src = self.rf_harmonic_number
        if h is None:
            return 0.0
        ring = self._design_lattice
        if src == "cavity":
            try:
                f = float(ring.get_rf_frequency())
            except Exception:  # noqa: BLE001
                f = 0.0
            if np.isfinite(f) and f > 0:
                return f
        return float(h * ring.revolution_frequency)

    def _rf_warnings(self) -> list[str]:
        """An assumed harmonic number, and a nominal RF frequency outside ``rf.frequency_limits``."""
        h, src = self.rf_harmonic_number
        if h is None:
            return []
        out = []
        f = self.rf_nominal_frequency
        if src == "assumed":
            out.append(
                f"{self.path}: key 'rf.harmonic_number': the lattice {self.lattice_path.name} has no RF cavity and the "
                f"profile gives no harmonic number: h = {h} is assumed (f_RF = {f / 1e6:.4f} MHz, the harmonic "
                f"nearest {ASSUMED_RF_FREQUENCY / 1e6:g} MHz); the dispersion, the ORM's RF column and the "
                "chromaticity step the RF frequency: set rf.harmonic_number (and rf.frequency_limits) to the "
                "machine's")
        lim = self.spec.rf.frequency_limits
        if not lim.low <= f <= lim.high:
            out.append(f"{self.path}: key 'rf.frequency_limits': the nominal RF frequency {f:.6g} Hz (h = {h}, "
                       f"{src}) is outside [{lim.low:.6g}, {lim.high:.6g}] Hz: every RF move will be refused; fix "
                       "the limits or rf.harmonic_number")
        return out

    def design_hw(self, family: str) -> np.ndarray:
        """The design setpoints of a family in hardware units: its field in the design lattice through its
        calibration (what a twin starts at)."""
        fam = self.family(family)
        attr, index = fam.spec.field_parts
        attr, index = _ALIASES.get(attr, (attr, index))
        ring = self._design_lattice
        design = np.array([_field_value(ring[int(r)], attr, index) for r in fam.refpts.tolist()], dtype=float)
        if attr == "KickAngle":  # an element without KickAngle gets one at zero
            design = np.nan_to_num(design, nan=0.0)
        return np.asarray(fam.spec.calibration.physics2hw(design, self.energy, self.energy), dtype=float).reshape(-1)

    @functools.cached_property
    def design_outside_limits(self) -> list[str]:
        """One message per family whose design setpoints are outside its limits: the tools refuse to move those
        magnets (a setpoint past its limit is refused), so a wrong calibration or limit shows here first."""
        out = []
        for fname, fam in self.families.items():
            if not len(fam):
                continue
            lim, units = fam.spec.limits, fam.spec.units
            try:
                hw = self.design_hw(fname)
            except Exception as err:  # noqa: BLE001 - a calibration that cannot invert the design value
                out.append(f"{self.path}: key 'families.{fname}.calibration': the design strengths cannot be "
                           f"converted to {units} ({err}); fix the calibration")
                continue
            bad = ~np.isfinite(hw) | (hw < lim.low) | (hw > lim.high)
            if not np.any(bad):
                continue
            i = int(np.argmax(np.where(bad, np.abs(np.nan_to_num(hw, nan=np.inf)), -1.0)))
            out.append(
                f"{self.path}: key 'families.{fname}.limits': {int(np.count_nonzero(bad))} of {len(fam)} design "
                f"setpoints are outside the limits [{lim.low:g}, {lim.high:g}] {units} (up to {hw[i]:.4g} {units} "
                f"at {fam.names[i]}): the tools refuse to move those magnets. Widen the limits or fix the "
                "calibration (physics units per hardware unit)")
        return out

    def _check_pvs(self) -> None:
        c = self.spec.controls
        seen: dict[str, str] = {}

        def add(pv: str, key: str) -> None:
            other = seen.get(pv)
            if other is not None:
                raise ProfileError(
                    f"{self.path}: key '{key}': PV {pv!r} is also the PV of {other}: every device needs its own PV "
                    "(use {device} or {index} in per-device templates, different x and y templates)")
            seen[pv] = key

        def fmt(t: str, kw: dict, key: str) -> str:
            try:
                return t.format(**kw)
            except (KeyError, ValueError, IndexError, TypeError) as err:
                raise ProfileError(f"{self.path}: key '{key}': PV template {t!r} cannot be formatted ({err})") from None

        for fname, fam in self.families.items():
            pv = fam.spec.pv
            for what, default in (("setpoint", c.magnet_setpoint), ("readback", c.magnet_readback)):
                t = pv.get(what, default)
                key = f"families.{fname}.pv.{what}" if what in pv else f"controls.magnet_{what}"
                for i in range(len(fam)):
                    add(fmt(t, self.pv_fields(fname, i), key), f"{key} ({fam.names[i]})")
            for what, default in (("setpoints", c.family_setpoints), ("readbacks", c.family_readbacks)):
                t = pv.get(what, default)
                key = f"families.{fname}.pv.{what}" if what in pv else f"controls.family_{what}"
                add(fmt(t, {"prefix": c.prefix, "family": fname}, key), f"{key} ({fname})")
        bpv = self.spec.bpm.pv
        for plane in ("x", "y"):
            t = bpv.get(plane, getattr(c, f"bpm_{plane}"))
            key = f"bpm.pv.{plane}" if plane in bpv else f"controls.bpm_{plane}"
            for i in range(len(self.bpm_refpts)):
                add(fmt(t, self.bpm_pv_fields(i), key), f"{key} ({self._bpm_names[i]})")

    @functools.cached_property
    def bpm_bad(self) -> frozenset[int]:
        return self._bad(self.bpm_names, self.spec.bpm.status.get("bad", []), "bpm.status.bad")

    def families_of_type(self, *types: str) -> dict[str, Family]:
        return {n: f for n, f in self.families.items() if f.spec.type in types}

    def family(self, name: str) -> Family:
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(f"unknown family {name!r}; valid families: {sorted(self.families)}") from None

    def tool_defaults(self, tool: str) -> dict:
        """The profile's default parameters of ``tool`` (``tools.<tool>``), typed at load."""
        return dict(self.spec.tools.get(tool, {}))

    def s_positions(self, refpts) -> np.ndarray:
        """s [m] of lattice elements (their entrance) in the design lattice."""
        spos = self.__dict__.get("_spos_all")
        if spos is None:
            ring = self._design_lattice
            spos = self.__dict__["_spos_all"] = np.asarray(ring.get_s_pos(range(len(ring) + 1)), dtype=float)
        return spos[np.asarray(refpts, dtype=int)]


_PRELOADED: dict[Path, object] = {}


def preload_lattice(path: str | os.PathLike, lattice) -> None:
    """Give the next load of the profile at ``path`` its design lattice already read (the generator rewrites a
    profile of the same lattice: no need to read the file again). Used once, then forgotten."""
    _PRELOADED[Path(path).resolve()] = lattice


def _resolve(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            p = p / "profile.yaml"
        if not p.exists():
            raise ProfileError(f"{p}: profile file does not exist")
        return p.resolve()
    for d in profile_search_path():
        cand = d / str(name_or_path) / "profile.yaml"
        if cand.exists():
            return cand.resolve()
    raise ProfileError(
        f"no profile named {str(name_or_path)!r}; known profiles: {available_profiles()} "
        f"(searched {[str(d) for d in profile_search_path()]}; add folders with ${PROFILE_PATH_ENV})"
    )


@functools.lru_cache(maxsize=32)
def _load_cached(path: Path, mtime: float) -> Profile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = ProfileSpec.model_validate(data)
    except ValidationError as err:
        raise ProfileError(_format_validation(path, err)) from None
    return Profile(spec, path).validate()


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load a profile by name (a folder under the search path) or by path to a ``profile.yaml``.

    Raises:
        ProfileError: naming the file, the key and what was expected.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = _resolve(name_or_path)
    return _load_cached(path, path.stat().st_mtime)
