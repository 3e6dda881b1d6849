"""Find, read and validate a profile; resolve its lattice and element selections."""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from .schema import FamilySpec, ProfileSpec, Selector

__all__ = ["Profile", "ProfileError", "load_profile", "profile_search_path", "available_profiles"]

PROFILE_PATH_ENV = "ACC_BLUESKY_PROFILE_PATH"
_PACKAGE_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


class ProfileError(ValueError):
    """A profile that cannot be used: the message names the file, the key and what was expected."""


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

    @property
    def device_names(self) -> list[str]:
        return [f"{self.name}:{i + 1:03d}" for i in range(len(self.refpts))]

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
        import at

        kw = {"energy": self.spec.energy}
        if self.spec.lattice.name:
            kw["use"] = self.spec.lattice.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ring = at.load_lattice(str(self.lattice_path), **kw)
            except Exception as err:  # noqa: BLE001 - pyAT raises many kinds
                raise ProfileError(f"{self.path}: key 'lattice': pyAT cannot load {self.lattice_path}: {err}") from err
        ring.energy = self.spec.energy
        if self.spec.orbit_model == "4d" and ring.is_6d:
            ring.disable_6d()
        elif self.spec.orbit_model == "6d" and not ring.is_6d:
            ring.enable_6d()
        return ring

    # -- selections -----------------------------------------------------------------------------------
    def select(self, sel: Selector, where: str = "select") -> np.ndarray:
        ring = self._design_lattice
        classes = sel.classes
        name_re = re.compile(sel.name) if sel.name else None
        excl_re = re.compile(sel.exclude) if sel.exclude else None
        idx = []
        for i, e in enumerate(ring):
            if classes and type(e).__name__ not in classes:
                continue
            if name_re is not None and not name_re.fullmatch(e.FamName):
                continue
            if excl_re is not None and excl_re.fullmatch(e.FamName):
                continue
            idx.append(i)
        if not idx:
            raise ProfileError(
                f"{self.path}: key '{where}': selects no element of {self.lattice_path.name} "
                f"(class={classes or 'any'}, name={sel.name!r}); "
                f"element classes present: {sorted({type(e).__name__ for e in ring})}"
            )
        return np.asarray(idx, dtype=np.uint32)

    def _bad(self, names: list[str], bad: list[int | str], where: str) -> frozenset[int]:
        out = set()
        for b in bad:
            if isinstance(b, int):
                if not 0 <= b < len(names):
                    raise ProfileError(f"{self.path}: key '{where}': index {b} out of range 0..{len(names) - 1}")
                out.add(b)
            elif b in names:
                out.add(names.index(b))
            else:
                raise ProfileError(f"{self.path}: key '{where}': unknown device {b!r}; valid: {names[:5]}...")
        return frozenset(out)

    @functools.cached_property
    def families(self) -> dict[str, Family]:
        ring = self._design_lattice
        out = {}
        for fname, spec in self.spec.families.items():
            refs = self.select(spec.select, f"families.{fname}.select")
            attr, index = spec.field_parts
            for i in refs[:1]:
                e = ring[int(i)]
                if attr not in ("K", "H", "KickAngle", "PolynomB", "PolynomA") and not hasattr(e, attr):
                    raise ProfileError(
                        f"{self.path}: key 'families.{fname}.field': element {e.FamName} has no attribute {attr!r}"
                    )
            fam = Family(fname, spec, refs, tuple(ring[int(i)].FamName for i in refs))
            bad = self._bad(fam.device_names, spec.status.get("bad", []), f"families.{fname}.status.bad")
            out[fname] = Family(fname, spec, refs, fam.element_names, bad)
        return out

    @functools.cached_property
    def bpm_refpts(self) -> np.ndarray:
        return self.select(self.spec.bpm.select, "bpm.select")

    @property
    def bpm_names(self) -> list[str]:
        return [f"BPM:{i + 1:03d}" for i in range(len(self.bpm_refpts))]

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
        return dict(self.spec.tools.get(tool, {}))

    def s_positions(self, refpts) -> np.ndarray:
        """s [m] of lattice elements (their entrance) in the design lattice."""
        spos = self.__dict__.get("_spos_all")
        if spos is None:
            ring = self._design_lattice
            spos = self.__dict__["_spos_all"] = np.asarray(ring.get_s_pos(range(len(ring) + 1)), dtype=float)
        return spos[np.asarray(refpts, dtype=int)]


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
    return Profile(spec, path)


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load a profile by name (a folder under the search path) or by path to a ``profile.yaml``.

    Raises:
        ProfileError: naming the file, the key and what was expected.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = _resolve(name_or_path)
    return _load_cached(path, path.stat().st_mtime)
