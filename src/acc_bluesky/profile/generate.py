"""Write a working profile for any pyAT lattice (ring or line): ``acc-bluesky profile new LATTICE_FILE``.

How the generator decides (docs/profiles.md has the table and the one-line override of each guess):

- **Families** of quadrupoles, sextupoles, octupoles and skew quadrupoles: elements of one class sharing a
  ``FamName`` are one family. Elements named per device (a unique ``FamName``, e.g. ``ARS01_MQUA_0550``) are
  grouped by their name with the device/cell numbers stripped (``ARS*_MQUA_*``) and split by equal design
  strength: one family per (name stem, strength). Skew quadrupoles are recognised by name (``SQ``, ``QS``,
  ``skew``...), thin multipoles by their main field.
- **BPMs**: ``Monitor`` elements and markers named like BPMs (``bpm``...); loss monitors, screens, current monitors,
  girder markers and other instruments are excluded by name, each listed under ``generated.excluded`` with why.
- **Correctors**: ``Corrector`` elements that steer (not injection kickers, septa, chicanes, bumps, nor the edge
  kicks named after a magnet), the plane from the name (MAD-X ``hkicker``/``vkicker`` give ``KickAngle=[0,0]``:
  ``MCOX``/``MCOY``, ``CH``/``CV``, ``HCM``/``VCM``, ``CORH``...); names without a plane are two-plane correctors
  when most correctors are so (AT ``corrector``s), else excluded; kick windings (``KickAngle`` in the file) on
  multipoles and sextupoles; zero-angle bends named like correctors as trims; quadrupoles only if asked.
  Without any steerer, windings in the sextupoles are assumed (a warning says so).
- **Lines** (the geometry does not close): the entrance Twiss from the file (pyAT ``twiss_in``, MML ``TwissData``)
  or the caller (``--twiss-in``), else a loud warning in the profile.
- **Errors**: a class table (EBS design study, REFERENCE.md); ``cli/profile.py`` scales it to the machine with the
  twin's closed-orbit search and records how in ``generated.errors``.

Calibrations are linear, sized so that the largest design strength sits near 100 A; limits hold 1.5x the design.
The YAML has one line per family and no anchors or aliases.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .lattice_io import read_lattice
from .loader import ASSUMED_RF_FREQUENCY, assumed_harmonic_number, design_tilt_angle, rotated_skew

__all__ = ["generate_profile", "write_profile", "dump_profile", "guess_kind", "plane_from_name", "parse_twiss_in",
           "carries_misalignments", "kick_response", "corrector_kicks_needed", "BPM_NAME", "NOT_BPM_NAME"]

#: names of beam position monitors (strong: a Monitor or a Marker so named is a BPM)
BPM_NAME = re.compile(r"(?i).*(bpm|pick.?up|beam.?pos).*")
#: weaker BPM names, believed only on Monitor elements
_BPM_WEAK = re.compile(r"(?i)(pu|mon|monitor|bpc|bp[hvxy]?)[_.:\-]?\d*[a-z]?\d*")
#: diagnostics that are not BPMs (loss monitors, screens, current monitors, wire scanners, girder markers...)
NOT_BPM_NAME = re.compile(
    r"(?i).*(blm|loss|screen|scr|otr|yag|flag|viewer|\btv|^tv|dcct|ict|fct|cur|acmon|dcmon|wire|scan|strpl|"
    r"stripline|cav|kick|ki[ef]|wider|lsw|tune|sync|emit|girder|^g[se]$|^mk|^f[hml]\d).*")
#: corrector elements that do not steer the orbit
_NOT_STEERER = re.compile(r"(?i).*(kik|kicker|inj|septum|sept|sep(?![a-z])|extr|chicane|bump|bmp|dump).*")
_BARE_KICKER = re.compile(r"(?i)^k(ick(er)?)?\d*[a-z]?$")
_CORRECTOR_WORD = re.compile(r"(?i).*(cor|trim|steer|kick|ch\d|cv\d|^[hv]c).*")
_SKEW_NAME = re.compile(r"(?i)^(sq|qs|skew|mqsk|qsk|sk)[^a-z]?.*|.*[_.](sq|qs|mqsk|qsk|skew)([_.\d].*)?$")
_OCT_NAME = re.compile(r"(?i).*(oct|moct).*|^o\d.*")
_ID_NAME = re.compile(r"(?i).*(und|uind|wig|\bid\b|ivu|epu).*")
_PREFIX_PLANE = re.compile(r"^([hvxy])(c|cm|cor|corr|st|str|steer|k|kick|t|trim)")
_SUFFIX_PLANE = re.compile(r"(c|co|cm|cor|corr|st|k|kick|trim|m)([hvxy])$")

_KICK_CAL, _KICK_LIM, _KICK_LIM_LINE = 1.0e-5, 40.0, 100.0  # rad/A; A: +-0.4 mrad in rings, +-1 mrad in lines


def _load(path: Path, **kw):
    return read_lattice(path, **kw)


def carries_misalignments(ring) -> int:
    """How many elements of ``ring`` the file already shifts or rolls (T1/T2 not zero, R1 not identity), design
    tilts aside (:func:`~acc_bluesky.profile.loader.design_tilt_angle`: rotations by multiples of 45 degrees)."""
    n = 0
    eye = np.eye(6)
    for e in ring:
        for a in ("T1", "T2"):
            v = getattr(e, a, None)
            if v is not None and np.any(np.asarray(v) != 0):
                n += 1
                break
        else:
            v = getattr(e, "R1", None)
            if v is not None and not np.array_equal(np.asarray(v), eye) and design_tilt_angle(v) is None:
                n += 1
    return n


def guess_kind(ring) -> str:
    """``ring`` if the geometry closes (total bending 2 pi), else ``line``."""
    total = sum(float(getattr(e, "BendingAngle", 0.0)) for e in ring) * getattr(ring, "periodicity", 1)
    return "ring" if abs(abs(total) - 2 * math.pi) < 1e-3 else "line"


def plane_from_name(name: str) -> str | None:
    """``"x"``, ``"y"`` or ``None``: the steering plane a corrector's name gives (``MCOX``, ``CH``, ``VCM``...)."""
    for tok in re.split(r"[^A-Za-z0-9]+", name):
        letters = re.sub(r"\d+", "", tok).lower()
        if not letters:
            continue
        for rx, grp in ((_PREFIX_PLANE, 1), (_SUFFIX_PLANE, 2)):
            m = rx.search(letters)
            if m:
                return "x" if m.group(grp) in "hx" else "y"
        h, v = "h" in letters, "v" in letters
        if h != v:
            return "x" if h else "y"
        if not (h or v):
            x, y = "x" in letters, "y" in letters
            if x != y:
                return "x" if x else "y"
    return None


# ------------------------------------------------------------------------------------------------------------
# selectors that select exactly a set of elements
class _Table:
    """The lattice as columns: class name and FamName of every element, field values on demand."""

    def __init__(self, ring):
        self.ring = ring
        self.cls = [type(e).__name__ for e in ring]
        self.name = [e.FamName for e in ring]
        common = Counter(t for n in set(self.name) for t in set(_alpha_tokens(n)))
        nn = max(1, len(set(self.name)))
        self.common_tokens = {t for t, c in common.items() if c > 0.5 * nn}

    def of(self, *classes: str) -> list[int]:
        cs = set(classes)
        return [i for i, c in enumerate(self.cls) if c in cs]

    def value(self, i: int, attr: str, index: int | None) -> float:
        v = getattr(self.ring[i], attr, None)
        if v is None:
            return float("nan")
        if index is None:
            return float(v)
        v = np.asarray(v, dtype=float).reshape(-1)
        return float(v[index]) if index < len(v) else 0.0

    def select(self, sel: Mapping[str, Any], field: tuple[str, int | None] | None = None) -> list[int]:
        classes = sel.get("class")
        classes = {classes} if isinstance(classes, str) else set(classes or ())
        name_re = re.compile(sel["name"]) if sel.get("name") else None
        excl_re = re.compile(sel["exclude"]) if sel.get("exclude") else None
        s = sel.get("strength")
        out = []
        for i, (c, n) in enumerate(zip(self.cls, self.name)):
            if classes and c not in classes:
                continue
            if name_re is not None and not name_re.fullmatch(n):
                continue
            if excl_re is not None and excl_re.fullmatch(n):
                continue
            if s is not None and field is not None:
                v = self.value(i, *field)
                if not abs(v - s) <= 1e-6 * max(abs(s), 1.0 if s == 0 else 0):
                    continue
            out.append(i)
        return out


def _alpha_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^A-Za-z]+", re.sub(r"\d+", " ", name)) if t]


def _stem_regex(name: str) -> str:
    """``ARS01_MQUA_0550`` -> ``ARS\\d+_MQUA_\\d+``: the name with its numbers generalised."""
    parts = re.split(r"(\d+)", name)
    return "".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts if p)


def _prefix_regex(name: str, upto_token: int) -> str:
    """The name up to and including its ``upto_token``-th alphanumeric token, numbers generalised, then ``.*``."""
    toks = re.split(r"([^A-Za-z0-9]+)", name)
    keep, count = [], 0
    for t in toks:
        keep.append(t)
        if t and re.fullmatch(r"[A-Za-z0-9]+", t):
            count += 1
            if count > upto_token:
                break
    head = "".join(keep)
    rest = name[len(head):]
    return _stem_regex(head) + (".*" if rest else "")


def _alternation(parts: Iterable[str]) -> str:
    uniq = list(dict.fromkeys(parts))
    return uniq[0] if len(uniq) == 1 else "|".join(uniq)


def _exact_selector(table: _Table, idx: Sequence[int], classes: Sequence[str], *,
                    strength: float | None = None, field: tuple[str, int | None] | None = None,
                    plane_token: bool = False) -> dict[str, Any]:
    """The shortest selector among a few candidates that selects exactly ``idx``."""
    target = sorted(idx)
    cls = sorted(set(classes))
    cls_v: str | list[str] = cls[0] if len(cls) == 1 else cls
    names = [table.name[i] for i in target]
    # candidates from the most readable to the most explicit; the first that selects exactly idx wins (a
    # strength is added only where the names alone do not select the family)
    uniq = sorted(set(names))
    stems = sorted({_stem_regex(n) for n in names})
    prefixes = [sorted({_prefix_regex(n, k) for n in names}) for k in range(3)]
    by_name: list[dict[str, Any]] = [{"class": cls_v}]
    if len(uniq) <= 3:
        by_name.append({"class": cls_v, "name": _alternation(re.escape(n) for n in uniq)})
    if plane_token:
        by_name += [{"class": cls_v, "name": _alternation(pf)} for pf in prefixes if len(pf) < len(stems)]
    by_name.append({"class": cls_v, "name": _alternation(stems)})
    by_name += [{"class": cls_v, "name": _alternation(pf)} for pf in prefixes[:2] if len(pf) < len(stems)]
    explicit = {"class": cls_v, "name": _alternation(re.escape(n) for n in uniq)}
    cands = list(by_name)
    if strength is not None:
        cands += [{**c, "strength": float(strength)} for c in by_name[1:] + by_name[:1]]
    cands.append(explicit)
    for c in cands:
        if table.select(c, field) == target:
            return c
    # explicit names and the strength (only equal names of another strength are left out by it)
    return explicit if strength is None else {**explicit, "strength": float(strength)}


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_")
    return s if s and not s[0].isdigit() else f"F{s}"


def _round1(x: float) -> float:
    """One significant digit (calibrations read well in a profile)."""
    if x == 0 or not np.isfinite(x):
        return 1.0
    e = math.floor(math.log10(abs(x)))
    return float(f"{round(x / 10**e) * 10**e:.1g}")


# ------------------------------------------------------------------------------------------------------------
# BPMs
def _bpms(table: _Table, notes: list[str], warns: list[str], excluded: list[dict]) -> tuple[dict, list[int]]:
    mons = table.of("Monitor")
    marks = table.of("Marker")
    strong = [i for i in mons + marks if BPM_NAME.fullmatch(table.name[i]) and not NOT_BPM_NAME.fullmatch(
        table.name[i])]
    weak_mon = [i for i in mons if i not in strong and _BPM_WEAK.fullmatch(table.name[i])
                and not NOT_BPM_NAME.fullmatch(table.name[i])]
    chosen = sorted(strong + weak_mon)
    if not chosen and mons:  # Monitors that are not named like BPMs, nor like other instruments
        chosen = [i for i in mons if not NOT_BPM_NAME.fullmatch(table.name[i])]
        if chosen:
            notes.append(f"BPMs: no element named like a BPM; the {len(chosen)} Monitor elements not named like "
                         "another instrument are taken as BPMs")
    if not chosen:
        quads = table.of("Quadrupole")
        warns.append("BPMs: the lattice has no Monitor and no BPM-named marker: one BPM per quadrupole is ASSUMED "
                     "(at its entrance); replace bpm.select with the real BPMs")
        return {"class": "Quadrupole"}, quads
    classes = sorted({table.cls[i] for i in chosen})
    # a readable selector: the BPM name pattern when it selects exactly these, else a synthesized one
    sel: dict[str, Any] = {"class": classes[0] if len(classes) == 1 else classes}
    if table.select(sel) != chosen:
        for pat in (BPM_NAME.pattern, None):
            if pat is None:
                sel = _exact_selector(table, chosen, classes)
                break
            cand = {**sel, "name": pat}
            if table.select(cand) == chosen:
                sel = cand
                break
            cand = {**cand, "exclude": NOT_BPM_NAME.pattern}
            if table.select(cand) == chosen:
                sel = cand
                break
    if marks and any(table.cls[i] == "Marker" for i in chosen):
        notes.append(f"BPMs: {sum(table.cls[i] == 'Marker' for i in chosen)} markers named like BPMs are BPMs")
    chosen_set = set(chosen)
    _exclusions(table, [i for i in mons if i not in chosen_set], "Monitor",
                lambda n: ("named like another instrument (loss monitor, screen, current monitor, kicker, girder "
                           "or marker), not a BPM") if NOT_BPM_NAME.fullmatch(n) else "Monitor not named like a BPM",
                excluded)
    weak_marks = [i for i in marks if i not in chosen_set and _BPM_WEAK.fullmatch(table.name[i])
                  and not NOT_BPM_NAME.fullmatch(table.name[i])]
    _exclusions(table, weak_marks, "Marker", lambda n: "a marker with a pickup-like name, not a Monitor and not "
                "named BPM", excluded)
    screens = [i for i in marks if i not in chosen_set and NOT_BPM_NAME.fullmatch(table.name[i])
               and re.search(r"(?i)(tv|scr|screen|otr|yag|flag|blm|loss|dcct|ict)", table.name[i])]
    _exclusions(table, screens, "Marker", lambda n: "a diagnostic marker (screen, loss or current monitor), not a "
                "BPM", excluded)
    return sel, chosen


def _exclusions(table: _Table, idx: list[int], cls: str, reason, excluded: list[dict]) -> None:
    """Group excluded elements by reason into one-line entries of ``generated.excluded``."""
    by: dict[str, list[int]] = {}
    for i in idx:
        by.setdefault(reason(table.name[i]), []).append(i)
    for why, ii in by.items():
        names = sorted({table.name[i] for i in ii})
        stems = sorted({_stem_regex(n) for n in names})
        if len(stems) > 8:
            stems = sorted({_prefix_regex(n, 0) for n in names})
        pat = _alternation(stems) if len(stems) <= 12 else _alternation(stems[:12]) + "|..."
        if pat.endswith("|..."):
            pat = pat[:-4]
        excluded.append({"select": {"class": cls, "name": pat}, "count": len(ii), "reason": why})


# ------------------------------------------------------------------------------------------------------------
# correctors
def _edge_kick_of(table: _Table, names: set[str]) -> dict[str, str]:
    """Corrector names that extend the name of a magnet with a short suffix (``ARS01_MBCF_1640_E1`` after the bend
    ``ARS01_MBCF_1640``, ``ARS02_UIND_0500_EH1`` after the slices ``ARS02_UIND_0500_1/2``): edge or trim kicks of
    that magnet, not steerers."""
    heads: set[str] = set()
    for c, n in zip(table.cls, table.name):
        if c in ("Corrector", "Drift", "Marker", "Monitor"):
            continue
        heads.add(n)
        for m in re.finditer(r"[_.:\-]", n):  # a magnet sliced as NAME_1, NAME_2...: NAME is its head
            if n[m.end():].isdigit():
                heads.add(n[:m.start()])
    out = {}
    for n in names:
        m = re.search(r"[_.:\-]([A-Za-z0-9]{1,3})$", n)
        if m and n[:m.start()] in heads:
            out[n] = n[:m.start()]
    return out


def _between_bends(table: _Table, i: int) -> bool:
    """Whether element ``i`` has a bend on both sides (drifts, markers, monitors, thin kicks aside)."""
    def neighbour(step: int) -> str | None:
        k = i + step
        while 0 <= k < len(table.cls) and (table.cls[k] in ("Drift", "Marker", "Monitor") or (
                table.cls[k] == "Corrector" and not getattr(table.ring[k], "Length", 0.0))):  # edge kicks aside
            k += step
        return table.cls[k] if 0 <= k < len(table.cls) else None

    return neighbour(-1) in ("Dipole", "Bend") and neighbour(1) in ("Dipole", "Bend")


def _correctors(table: _Table, families: dict, notes: list[str], warns: list[str], excluded: list[dict],
                steer_quadrupoles: bool, kind: str = "ring") -> None:
    cors = table.of("Corrector")
    names = {table.name[i] for i in cors}
    edges = _edge_kick_of(table, names)
    steer, reasons = [], {}
    for i in cors:
        n = table.name[i]
        if n in edges:
            reasons[i] = "an edge or trim kick of the magnet whose name it extends, not an orbit steerer"
        elif _NOT_STEERER.fullmatch(n):
            reasons[i] = "named like an injection kicker, septum, chicane or bump, not an orbit steerer"
        else:
            steer.append(i)
    planes = {i: plane_from_name(table.name[i]) for i in steer}
    in_bend = [i for i in steer if planes[i] is None and _between_bends(table, i)]
    for i in in_bend:  # a winding in the middle of a bend (its two halves around it) steers horizontally
        planes[i] = "x"
    if in_bend:
        notes.append(f"correctors: {len(in_bend)} Corrector elements without a plane in their name sit between the "
                     f"two halves of a bend ({', '.join(sorted({table.name[i] for i in in_bend})[:3])}...): "
                     "horizontal (bend trim windings)")
    unmarked = [i for i in steer if planes[i] is None]
    marked = [i for i in steer if planes[i] is not None]
    two_plane: list[int] = []
    if unmarked:
        kickers = [i for i in unmarked if _BARE_KICKER.fullmatch(table.name[i])]
        for i in kickers:
            reasons[i] = "named like a kicker (KICK, K3...), not an orbit steerer"
        rest = [i for i in unmarked if i not in set(kickers)]
        if rest and len(rest) >= len(marked):
            two_plane = rest
            notes.append(f"correctors: {len(rest)} Corrector elements have no plane in their name "
                         f"({', '.join(sorted({table.name[i] for i in rest})[:4])}): used as two-plane correctors "
                         "(H and V windings); move them into one family if they steer one plane")
        else:
            for i in rest:
                reasons[i] = ("no plane in its name (no H/V or X/Y mark) while the lattice's other correctors are "
                              "named per plane: add it to HCM or VCM if it steers")
    hx = sorted([i for i in marked if planes[i] == "x"] + two_plane)
    vy = sorted([i for i in marked if planes[i] == "y"] + two_plane)
    _exclusions(table, sorted(reasons), "Corrector", lambda n, r=reasons, t=table: next(
        r[i] for i in r if t.name[i] == n), excluded)
    lim = _KICK_LIM_LINE if kind == "line" else _KICK_LIM
    common = {"calibration": {"linear": _KICK_CAL}, "physics_units": "rad", "limits": [-lim, lim]}
    if hx:
        families["HCM"] = {"type": "hcor", "select": _exact_selector(table, hx, ["Corrector"], plane_token=True),
                           "field": "KickAngle[0]", **common, "description": "horizontal correctors"}
    if vy:
        families["VCM"] = {"type": "vcor", "select": _exact_selector(table, vy, ["Corrector"], plane_token=True),
                           "field": "KickAngle[1]", **common, "description": "vertical correctors"}
    # kick windings in multipoles (a KickAngle field in the file)
    winding_classes = ("Sextupole", "Multipole", "ThinMultipole", "Octupole") + (
        ("Quadrupole",) if steer_quadrupoles else ())
    wind = [i for i in table.of(*winding_classes) if hasattr(table.ring[i], "KickAngle")]
    if steer_quadrupoles:
        wind = sorted(set(wind) | set(table.of("Quadrupole")))
    assumed = False
    if not wind and not hx and not vy and table.of("Sextupole"):
        wind = table.of("Sextupole")
        assumed = True
        warns.append(f"correctors: no Corrector element and no kick field in the lattice: kick windings in the "
                     f"{len(wind)} sextupoles are ASSUMED (as at ESRF-EBS); check the real steerers")
    if wind:
        cls = sorted({table.cls[i] for i in wind})
        sel = _exact_selector(table, wind, cls)
        what = "assumed " if assumed else ""
        families["HST"] = {"type": "hcor", "select": sel, "field": "KickAngle[0]", **common,
                           "description": f"{what}horizontal kick windings in {', '.join(cls)}"}
        families["VST"] = {"type": "vcor", "select": sel, "field": "KickAngle[1]", **common,
                           "description": f"{what}vertical kick windings in {', '.join(cls)}"}
        if not assumed:
            notes.append(f"correctors: kick windings (KickAngle) in {len(wind)} {'/'.join(cls)} elements")
    # zero-angle bends named like correctors: trims
    trims = [i for i in table.of("Dipole", "Bend") if float(getattr(table.ring[i], "BendingAngle", 0.0)) == 0.0
             and _CORRECTOR_WORD.fullmatch(table.name[i]) and not _ID_NAME.fullmatch(table.name[i])
             and not _NOT_STEERER.fullmatch(table.name[i])]
    if trims:
        tp = {i: plane_from_name(table.name[i]) for i in trims}
        for key, plane, t, f in (("HTR", "x", "hcor", "KickAngle[0]"), ("VTR", "y", "vcor", "KickAngle[1]")):
            sel_i = [i for i in trims if tp[i] in (plane, None)]
            if sel_i:
                families[key] = {"type": t, "select": _exact_selector(table, sel_i, ["Dipole"]), "field": f,
                                 **common, "description": f"zero-angle bends used as {plane} trims"}
        notes.append(f"correctors: {len(trims)} zero-angle bends named like correctors are trims")
    if steer_quadrupoles:
        notes.append("correctors: kick windings in the quadrupoles, as asked (--steer-quadrupoles)")


# ------------------------------------------------------------------------------------------------------------
# magnet families
def _main_of_multipole(e) -> tuple[str, str, int] | None:
    """(type, field attr, index) of a multipole's dominant component, or None if it has none."""
    pb = np.asarray(getattr(e, "PolynomB", [0.0]), dtype=float).reshape(-1)
    pa = np.asarray(getattr(e, "PolynomA", [0.0]), dtype=float).reshape(-1)
    comps = [(abs(v), "b", k) for k, v in enumerate(pb) if k >= 1] + [(abs(v), "a", k) for k, v in enumerate(pa)
                                                                      if k == 1]
    comps = [c for c in comps if c[0] > 0]
    name = e.FamName
    if not comps:
        if _SKEW_NAME.fullmatch(name):
            return ("skew", "PolynomA", 1)
        if _OCT_NAME.fullmatch(name):
            return ("octupole", "PolynomB", 3)
        return None
    _, ab, k = max(comps)
    if ab == "a":
        return ("skew", "PolynomA", 1)
    return {1: ("quadrupole", "PolynomB", 1), 2: ("sextupole", "PolynomB", 2), 3: ("octupole", "PolynomB", 3)}.get(
        k, ("magnet", "PolynomB", k))


_DEFAULT_CAL = {"quadrupole": 0.01, "sextupole": 0.1, "octupole": 1.0, "skew": 0.001, "magnet": 1.0}
_UNITS = {1: "m^-2", 2: "m^-3", 3: "m^-4"}


def _magnet_groups(table: _Table) -> list[tuple[str, str, int, list[int]]]:
    """(type, attr, index, element indices) per kind of magnet, before grouping into families."""
    kinds: dict[tuple[str, str, int], list[int]] = {}
    for i in table.of("Quadrupole"):  # a skew quadrupole: named so, without a normal gradient, or rolled by 45 deg
        e = table.ring[i]
        if rotated_skew(e):  # a normal quadrupole rolled by design: its own gradient is the skew one
            k = ("skew", "PolynomB", 1)
        else:
            skew = _SKEW_NAME.fullmatch(table.name[i]) and table.value(i, "PolynomB", 1) == 0.0
            k = ("skew", "PolynomA", 1) if skew else ("quadrupole", "PolynomB", 1)
        kinds.setdefault(k, []).append(i)
    for i in table.of("Sextupole"):
        kinds.setdefault(("sextupole", "PolynomB", 2), []).append(i)
    for i in table.of("Octupole"):
        kinds.setdefault(("octupole", "PolynomB", 3), []).append(i)
    for i in table.of("Multipole", "ThinMultipole"):
        m = _main_of_multipole(table.ring[i])
        if m is not None and m[0] != "magnet":
            kinds.setdefault(m, []).append(i)
    return [(t, a, k, idx) for (t, a, k), idx in kinds.items()]


def _label(table: _Table, name: str) -> str:
    """A family name from a device name: numbers removed, tokens shared by the whole lattice dropped."""
    toks = [t for t in re.split(r"[^A-Za-z0-9]+", re.sub(r"\d+", "", name)) if t]
    keep = [t for t in toks if t not in table.common_tokens] or toks or [name]
    return _safe("_".join(keep))


def _kind_token(table: _Table, name: str) -> str:
    """The magnet-kind letters of a device name: the leading letters of its first token that the whole lattice
    does not share (``ARS01_MQUA_0550`` -> ``MQUA``, ``QF4A`` -> ``QF``, ``qa_nor_12`` -> ``qa``)."""
    for tok in re.split(r"[^A-Za-z0-9]+", name):
        m = re.match(r"[A-Za-z]+", tok)
        if m and m.group(0) not in table.common_tokens:
            return m.group(0)
    return re.sub(r"[^A-Za-z]", "", name) or name


def _cluster_name(table: _Table, names: list[str]) -> str:
    """A family name from its devices' names: the tokens they all share (lattice-wide tokens aside), else their
    common prefix (``QF4A, QF4B, QF4E`` -> ``QF4``; ``ARS01_MQUA_1260 ... ARS12_MQUA_1260`` -> ``MQUA_1260``)."""
    toks = [re.split(r"[^A-Za-z0-9]+", n) for n in names]
    common = [t for t in toks[0] if t and all(t in tt for tt in toks[1:])
              and re.sub(r"\d+", "", t) not in table.common_tokens]
    if common:
        return _safe("_".join(common))
    pre = re.sub(r"[^A-Za-z0-9]+$", "", os.path.commonprefix(names))
    return _safe(pre) if len(pre) >= 2 else _label(table, names[0])


def _families_of(table: _Table, ftype: str, attr: str, index: int, idx: list[int], taken: set[str],
                 notes: list[str]) -> dict[str, Any]:
    """Families of one kind of magnet: a shared FamName is a family; magnets named per device (unique FamNames)
    of one kind (``_kind_token``) and equal design strength are a family."""
    field = (attr, index)
    counts = Counter(table.name[i] for i in idx)
    groups: dict[tuple, list[int]] = {}
    for i in idx:
        n = table.name[i]
        key = ("name", n) if counts[n] > 1 else ("kind", _kind_token(table, n))
        groups.setdefault(key, []).append(i)
    fams: dict[str, Any] = {}
    split = 0
    classes_all = sorted({table.cls[i] for i in idx})
    for key, members in groups.items():
        if key[0] == "name":
            subs = [(members, None)]
        else:  # named per device: equal design strength makes a family
            clusters: list[tuple[float, list[int]]] = []
            for i in members:
                v = table.value(i, attr, index)
                for c in clusters:
                    if abs(v - c[0]) <= 1e-6 * max(abs(c[0]), 1e-12 if c[0] else 1.0):
                        c[1].append(i)
                        break
                else:
                    clusters.append((v, [i]))
            subs = [(m, v) for v, m in clusters]
            split += len(members) > 1
        # a kind with magnets at zero design strength is a kind of trim: its weak members' range is the trims'
        # (SLS 2.0's MQCO: 448 at 0, the others 0.002-0.27 m^-2), not 1.5x their own design value
        trims = key[0] == "kind" and any(v == 0 for _, v in subs)
        for mem, strength in subs:
            if key[0] == "name":
                base = _safe(table.name[mem[0]])
            else:
                base = _cluster_name(table, [table.name[i] for i in mem])
                if key[1].lower() not in base.lower():  # the kind first: QF11_MPW, QF18_MPW -> QF_MPW
                    base = _safe(f"{key[1]}_{base}")
            fname, k = base, 1
            while fname in taken:
                k += 1
                fname = f"{base}_{k}"
            taken.add(fname)
            classes = sorted({table.cls[i] for i in mem})
            sel = _exact_selector(table, mem, classes, strength=strength, field=field if strength is not None else None)
            vals = np.array([table.value(i, attr, index) for i in mem])
            vmax = float(np.max(np.abs(vals))) if vals.size else 0.0
            if vmax > 0 and not (trims and 1.5 * vmax < 100.0 * _DEFAULT_CAL[ftype]):
                cal = _round1(vmax / 100.0)
                lim = float(max(10.0, math.ceil(1.5 * vmax / cal / 10.0) * 10.0))
            else:
                cal, lim = _DEFAULT_CAL[ftype], 100.0
            desc = (f"{len(mem)} x {table.name[mem[0]]}" + (f" ... {table.name[mem[-1]]}" if len(mem) > 1 else "")
                    + (f", equal design {attr}[{index}] = {strength:.6g}" if strength is not None else ""))
            fams[fname] = {"type": ftype, "select": sel, "field": f"{attr}[{index}]", "calibration": {"linear": cal},
                           "physics_units": _UNITS.get(index, "") if attr == "PolynomB" else "m^-2",
                           "limits": [-lim, lim], "description": desc}
    if split:
        notes.append(f"{ftype} families: {'/'.join(classes_all)} named per device, grouped by kind and equal design "
                     "strength")
    return fams


# ------------------------------------------------------------------------------------------------------------
def _twiss_from_file(ring) -> dict[str, list[float]] | None:
    tw = getattr(ring, "twiss_in", None)
    src = None
    if isinstance(tw, Mapping) or hasattr(tw, "dtype"):
        src = tw
    elif len(ring) and hasattr(ring[0], "TwissData"):
        src = ring[0].TwissData
    if src is None:
        return None

    def get(*keys):
        for k in keys:
            try:
                v = src[k] if isinstance(src, Mapping) or hasattr(src, "dtype") else getattr(src, k)
            except (KeyError, ValueError, IndexError, AttributeError):
                continue
            if v is not None:
                return [float(x) for x in np.asarray(v, dtype=float).reshape(-1)]
        return None

    out = {}
    for key, names in (("beta", ("beta", "Beta")), ("alpha", ("alpha", "Alpha")),
                       ("dispersion", ("dispersion", "Dispersion")), ("closed_orbit", ("closed_orbit",
                                                                                        "ClosedOrbit"))):
        v = get(*names)
        if v is not None:
            out[key] = v[:{"beta": 2, "alpha": 2, "dispersion": 4, "closed_orbit": 6}[key]]
    return out if "beta" in out else None


def parse_twiss_in(items: Sequence[str] | str | Mapping | None) -> dict[str, list[float]] | None:
    """``["beta=0.63,9.6", "alpha=-0.32,2.42", "dispersion=0.074,0.018,0,0"]`` (or a YAML/JSON file) -> dict."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        return {k: [float(x) for x in np.atleast_1d(v)] for k, v in items.items()}
    if isinstance(items, str):
        items = [items]
    items = [t for it in items for t in str(it).split()]
    if len(items) == 1 and Path(items[0]).exists():
        data = yaml.safe_load(Path(items[0]).read_text())
        if not isinstance(data, Mapping):
            raise ValueError(f"--twiss-in {items[0]}: the file must hold a mapping (beta: [bx, by], alpha: ...)")
        return parse_twiss_in(data)
    out = {}
    for it in items:
        key, sep, vals = it.partition("=")
        if not sep:
            raise ValueError(f"--twiss-in {it!r}: expected KEY=V1,V2 (keys beta, alpha, dispersion, closed_orbit)")
        try:
            out[key.strip()] = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--twiss-in {it!r}: the values must be numbers separated by commas") from None
    return out


def generate_profile(lattice_file: str | Path, *, name: str | None = None, facility: str | None = None,
                     kind: str | None = None, relative_to: Path | None = None, energy: float | None = None,
                     use: str | None = None, strict: bool = True, lattice_format: str | None = None,
                     twiss_in: Any = None, steer_quadrupoles: bool = False, lattice: Any = None) -> dict[str, Any]:
    """Build a profile dict for ``lattice_file`` (any format :func:`~.lattice_io.read_lattice` reads).

    See the module docstring for how each guess is made. Errors are the class table at ``scale: 1``; the CLI
    sizes them to the machine (``acc-bluesky profile new``). ``lattice``: the file already read (not read again)."""
    path = Path(lattice_file).resolve()
    opts: dict[str, Any] = {}
    if not strict:
        opts["strict"] = False
    ring = lattice if lattice is not None else _load(path, energy=energy, use=use, format=lattice_format, **opts)
    if getattr(ring, "is_6d", False):
        ring = ring.disable_6d(copy=True)
    kind = kind or guess_kind(ring)
    notes: list[str] = []
    warns: list[str] = []
    excluded: list[dict] = []
    table = _Table(ring)

    # lattice reference: a file shipped in an importable package is referenced by package
    lat: dict[str, Any]
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
    if use:
        lat["name"] = use
    if lattice_format:
        lat["format"] = lattice_format
    if opts:
        lat["options"] = opts

    bpm_sel, bpm_idx = _bpms(table, notes, warns, excluded)
    families: dict[str, Any] = {}
    _correctors(table, families, notes, warns, excluded, steer_quadrupoles, kind)
    taken = set(families)
    for ftype, attr, index, idx in _magnet_groups(table):
        families.update(_families_of(table, ftype, attr, index, idx, taken, notes))

    # device names: the lattice's own names where every device has its own (SLS 2.0), else FAMILY_001
    bpm: dict[str, Any] = {"select": bpm_sel}
    names_used: Counter = Counter()
    per_device = {}
    bpm_names = [table.name[i] for i in bpm_idx]
    fam_members = {f: table.select(spec["select"], _field_tuple(spec["field"])) for f, spec in families.items()}
    # is the lattice named per device? most magnets, BPMs and correctors have a FamName of their own
    devices = bpm_idx + [i for m in fam_members.values() for i in m]
    counts = Counter(table.name[i] for i in set(devices))
    lattice_per_device = bool(devices) and sum(counts[table.name[i]] == 1 for i in set(devices)) > 0.5 * len(
        set(devices))
    per_device["bpm"] = lattice_per_device and len(set(bpm_names)) == len(bpm_names)
    for f, mem in fam_members.items():
        nm = [table.name[i] for i in mem]
        per_device[f] = lattice_per_device and len(set(nm)) == len(nm)
    for key, nm in [("bpm", bpm_names)] + [(f, [table.name[i] for i in m]) for f, m in fam_members.items()]:
        if per_device[key]:
            names_used.update(nm)
    for key in per_device:  # an element in two families (two-plane correctors) keeps FAMILY_001 names
        nm = bpm_names if key == "bpm" else [table.name[i] for i in fam_members[key]]
        if per_device[key] and any(names_used[n] > 1 for n in nm):
            per_device[key] = False
    if per_device["bpm"]:
        bpm["device_names"] = "{element}"
    for f in families:
        if per_device[f]:
            families[f]["device_names"] = "{element}"
    # a family is not named like a device (a one-magnet family of a lattice named per device): its PVs would clash
    device_names = set(bpm_names if per_device["bpm"] else ()) | {
        table.name[i] for f, m in fam_members.items() if per_device[f] for i in m}
    renamed = {}
    for f in list(families):
        new = f
        while new in device_names or new in renamed.values() or (new != f and new in families):
            new = f"{new}_F"
        renamed[f] = new
    families = {renamed[f]: spec for f, spec in families.items()}
    if any(per_device.values()):
        notes.append("device names: the lattice names its elements per device: those names are the device names "
                     "(device_names: \"{element}\")")

    prof: dict[str, Any] = {
        "facility": facility or (getattr(ring, "name", "") or path.stem),
        "accelerator": f"{path.stem} {kind}",
        "description": f"Generated by acc-bluesky profile new from {path.name}",
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
        if kind == "ring":  # the RF tools (dispersion, ORM RF column, chromaticity) need a real RF frequency
            h = assumed_harmonic_number(ring.revolution_frequency)
            f0 = h * float(ring.revolution_frequency)
            prof["rf"] = {"harmonic_number": h, "frequency_limits": [f0 * (1 - 1e-4), f0 * (1 + 1e-4)],
                          "voltage_limits": [0.0, 1e8]}
            warns.append(
                f"RF: THE LATTICE HAS NO CAVITY: harmonic number {h} assumed (rf.harmonic_number: f_RF = "
                f"{f0 / 1e6:.4f} MHz, the harmonic of the {ring.revolution_frequency / 1e3:.4f} kHz revolution "
                f"frequency nearest {ASSUMED_RF_FREQUENCY / 1e6:g} MHz, as most light sources; ESRF-EBS runs at "
                "352 MHz); the dispersion, the ORM's RF column and the chromaticity step the RF frequency: set "
                "rf.harmonic_number and rf.frequency_limits to the machine's")
    present = set(table.cls)
    magnets = [{"select": {"class": "Quadrupole"}, "dx": 100e-6, "dy": 85e-6, "roll": 150e-6, "field": 5e-4}]
    if "Sextupole" in present:
        magnets.append({"select": {"class": "Sextupole"}, "dx": 70e-6, "dy": 50e-6, "roll": 150e-6, "field": 3.5e-3})
    if "Dipole" in present:
        magnets.append({"select": {"class": "Dipole"}, "dx": 100e-6, "dy": 100e-6, "roll": 150e-6, "field": 1e-3})
    misaligned = carries_misalignments(ring)
    if misaligned:
        notes.append(f"errors: the lattice file already shifts or rolls {misaligned} elements (a machine with its "
                     "errors): the twin adds no alignment errors (errors.scale 0); the twin's errors would replace "
                     "the file's on the elements they touch")
    prof["errors"] = {
        "truncation": 2.5, "scale": 0.0 if misaligned else 1.0, "magnets": magnets,
        "bpm": {"offset": 50e-6, "gain": 0.02, "roll": 1e-3, "noise": 1e-7, "tbt_noise": 10e-6},
        "corrector_calibration": 0.02, "tune_noise": 1e-5,
    }
    prof["controls"] = {"prefix": f"{_safe(name or path.stem).upper()}:"}
    prof["tools"] = {"orbit_response": {"delta_physics": 1e-5}}
    if kind == "line":
        tw = parse_twiss_in(twiss_in) if twiss_in is not None else None
        src = "given (--twiss-in)"
        if tw is None:
            tw = _twiss_from_file(ring)
            src = "read from the lattice file"
        if tw is None:
            tw = {"beta": [10.0, 10.0], "alpha": [0.0, 0.0]}
            warns.append("LINE: THE ENTRANCE TWISS IS UNKNOWN: twiss_in is a placeholder (beta 10/10 m, alpha 0): "
                         "every optics result of this line is wrong until you set twiss_in (beta, alpha, "
                         "dispersion) to the real entrance optics, or pass --twiss-in")
        else:
            notes.append(f"line: entrance Twiss {src}")
        prof["twiss_in"] = tw
    gen: dict[str, Any] = {"by": f"acc-bluesky profile new {path.name}", "notes": notes, "warnings": warns,
                           "excluded": excluded, "errors": (
                               "no alignment errors: the lattice file carries its own" if misaligned else
                               "class table as written (scale 1), not sized yet")}
    prof["generated"] = gen
    return prof


def _field_tuple(field: str) -> tuple[str, int | None]:
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$", field)
    attr, idx = m.group(1), m.group(2)
    return attr, (int(idx) if idx is not None else None)


# ------------------------------------------------------------------------------------------------------------
# corrector strength: what a correction of the default errors needs
def kick_response(profile) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The orbit (line: trajectory) response [m/rad] at the BPMs to every corrector of ``profile``, both planes:
    ``(R (2 nbpm x ncor), [(family, index), ...])``. Rings: the uncoupled closed-orbit formula with the fixed-path-
    length term, from one ``linopt2`` at the BPMs and correctors; lines: tracking. For sizing, not for steering."""
    import at

    ring = profile.load_lattice()
    rows = [(f, i) for f, fam in profile.families_of_type("hcor", "vcor").items() for i in range(len(fam))]
    bpms = np.asarray(profile.bpm_refpts, dtype=np.uint32)
    crefs = np.array([int(profile.families[f].refpts[i]) for f, i in rows], dtype=np.uint32)
    planes = [0 if profile.families[f].spec.type == "hcor" else 1 for f, _ in rows]
    nb = len(bpms)
    out = np.zeros((2 * nb, len(rows)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if profile.kind == "ring":
            refs = np.unique(np.concatenate([bpms, crefs, [len(ring)]])).astype(np.uint32)
            _, _, ld = at.linopt2(ring, refpts=refs)
            alpha_c, circ = float(at.get_mcf(ring)), ring.circumference
            pos = {int(r): k for k, r in enumerate(refs)}
            b = np.array([pos[int(r)] for r in bpms])
            q = ld.mu[pos[len(ring)], :2] / (2 * np.pi)
            for j, r in enumerate(crefs):
                p_, c = planes[j], pos[int(r)]
                col = (np.sqrt(ld.beta[b, p_] * ld.beta[c, p_]) * np.cos(np.abs(ld.mu[b, p_] - ld.mu[c, p_])
                       - np.pi * q[p_]) / (2 * np.sin(np.pi * q[p_])))
                if p_ == 0:
                    col = col - ld.dispersion[b, 0] * ld.dispersion[c, 0] / (alpha_c * circ)
                out[p_ * nb:(p_ + 1) * nb, j] = col
        else:
            z0 = np.zeros((6, 1))
            for j, r in enumerate(crefs):
                e = ring[int(r)]
                ka0 = np.array(getattr(e, "KickAngle", np.zeros(2)), dtype=float)
                ka = ka0.copy()
                ka[planes[j]] += 1e-6
                e.KickAngle = ka
                o = at.lattice_pass(ring, z0.copy(), refpts=bpms)[:, 0, :, 0]
                e.KickAngle = ka0
                o0 = at.lattice_pass(ring, z0.copy(), refpts=bpms)[:, 0, :, 0]
                out[:, j] = np.concatenate([o[0] - o0[0], o[2] - o0[2]]) / 1e-6
    return out, rows


def corrector_kicks_needed(response: np.ndarray, orbits: Sequence[tuple[np.ndarray, np.ndarray]],
                           rcond: float = 1e-3) -> np.ndarray:
    """Per corrector, the largest |kick| [rad] that cancels each of ``orbits`` ((x, y) [m]) with ``response``."""
    u, s, vt = np.linalg.svd(response, full_matrices=False)
    keep = s >= rcond * s[0]
    pinv = (vt[keep].T / s[keep]) @ u[:, keep].T
    kicks = [np.abs(pinv @ np.concatenate([x, y])) for x, y in orbits]
    return np.max(kicks, axis=0)


# ------------------------------------------------------------------------------------------------------------
# YAML: one line per family, no anchors or aliases
class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # noqa: D102 - PyYAML hook
        return True


def _flow(v: Any) -> str:
    text = yaml.dump(v, Dumper=_NoAliasDumper, default_flow_style=True, width=10**9, sort_keys=False)
    text = text.removesuffix("\n").removesuffix("\n...")  # a scalar's document-end marker
    return text.strip()


def dump_profile(prof: Mapping[str, Any], header: str = "") -> str:
    """The profile as YAML: one line per family (and per error group, exclusion), block style elsewhere."""
    out = [header.rstrip("\n")] if header else []
    for key, val in prof.items():
        if key == "families":
            out.append("families:")
            width = max(len(k) for k in val) if val else 0
            out += [f"  {(k + ':').ljust(width + 1)} {_flow(v)}" for k, v in val.items()]
        elif key == "errors":
            out.append("errors:")
            for k, v in val.items():
                if k == "magnets":
                    out.append("  magnets:")
                    out += [f"    - {_flow(m)}" for m in v]
                else:
                    out.append(f"  {k}: {_flow(v)}")
        elif key == "generated":
            out.append("generated:")
            for k, v in val.items():
                if isinstance(v, list):
                    out.append(f"  {k}:" + (" []" if not v else ""))
                    out += [f"    - {_flow(x)}" for x in v]
                else:
                    out.append(f"  {k}: {_flow(v)}")
        elif key == "tools":
            out.append("tools:")
            out += [f"  {k}: {_flow(v)}" for k, v in val.items()]
        else:
            out.append(f"{key}: {_flow(val)}")
    return "\n".join(out) + "\n"


def write_profile(lattice_file: str | Path, out_dir: str | Path | None = None, *, name: str | None = None,
                  facility: str | None = None, kind: str | None = None, profile: Mapping[str, Any] | None = None,
                  design_lattice: Any = None, **kw: Any) -> Path:
    """Generate (or take ``profile``) and write ``<out_dir>/profile.yaml``; returns its path (validated by loading
    it back). ``kw`` go to :func:`generate_profile`; ``design_lattice``: the profile's lattice already read (the
    validation then does not read the file again)."""
    from .loader import load_profile, preload_lattice

    lattice_file = Path(lattice_file)
    name = name or _safe(lattice_file.stem).lower()
    out = Path(out_dir) if out_dir else Path.cwd() / name
    out.mkdir(parents=True, exist_ok=True)
    prof = dict(profile) if profile is not None else generate_profile(
        lattice_file, name=name, facility=facility, kind=kind, relative_to=out, **kw)
    path = out / "profile.yaml"
    gen = prof.get("generated") or {}
    loud = "".join(f"# WARNING: {w}\n" for w in gen.get("warnings", []))
    header = (f"# acc_bluesky profile generated from {lattice_file.name}: one line per family.\n"
              "# Edit calibrations, limits, PV templates and errors to match the real machine;\n"
              "# `acc-bluesky profile check` prints what the tools will see.\n" + loud)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_profile(prof, header))
    tmp.replace(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if design_lattice is not None:
            preload_lattice(path, design_lattice)
        load_profile(path)
    return path
