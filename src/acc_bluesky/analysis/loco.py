"""LOCO: fit the linear optics of a ring to its measured orbit response (and dispersion), and correct it.

What is fitted (any subset, chosen with ``fit=``):

- ``"quads"``: quadrupole gradient errors, one per magnet (absolute ``dK`` [m^-2], ``PolynomB[1]``) or one per
  group of magnets on one power supply (relative ``dK/K``, ``group="family"`` or a mapping);
- ``"skew"``: skew-quadrupole gradients (``PolynomA[1]`` [m^-2]) at chosen elements;
- ``"bpm_gains"``, ``"bpm_rolls"``: per BPM, the relative gains of both planes and the roll [rad]
  (``reading = (1 + g) R(roll) position``, the twin's convention);
- ``"corrector_gains"``, ``"corrector_rolls"``: per corrector, the relative kick error and its roll [rad];
- ``"energy"``: per corrector, an energy shift (a dispersion-shaped column term [1/rad], MML's
  "HCM energy shift"); the model already has the fixed-path-length term, so this is off by default;
- ``"rf"``: the scale of a measured dispersion (RF frequency / momentum compaction calibration), fitted
  whenever a dispersion is given.

The model is the lattice itself (the profile's design with the machine's magnet setpoints, plus the fitted
errors): orbit response at fixed path length and dispersion from one-turn maps, coupled, exact to 1e-7 of the
twin's tracking (:mod:`._loco_model`). The Jacobian is analytic (the gradient derivative of the closed-orbit
response, Franchi & Liuzzo, arXiv:1711.06589, in its exact coupled thick-lens form): on EBS (256 quadrupoles,
224 BPMs, 448 correctors) it costs ~1 s of CPU against ~37 s for finite differences over the same analytic model
and ~2.3 h with pyAT's tracking ``OrbitResponseMatrix.build``, at the same accuracy (4e-6 relative).

The fit is Gauss-Newton: the calibration parameters (gains, rolls) are eliminated exactly, and the singular values
of the column-normalised gradient block left (its Schur complement) are cut below ``rcond`` x the largest; a step
that does not lower the chi-square is retried with Levenberg-Marquardt damping; iterations stop when the
chi-square improves by less than ``tol``. Weights come from the BPM noise. Dead BPMs (NaN or absent readings),
stuck or dead correctors (columns without response) and single outliers are excluded automatically.

Degeneracies and how they are handled:

- BPM gains against corrector gains: multiplying every BPM gain of a plane by ``a`` and dividing every corrector
  gain of that plane by ``a`` leaves the response unchanged (broken only by the tiny coupling blocks). One
  constraint per plane fixes the scale: ``gain_reference="both"`` (sum of the BPM gains = sum of the corrector
  gains: the minimum-norm split, least biased when both are uncalibrated), ``"bpm"`` (mean BPM gain = 0: the BPMs
  are the reference) or ``"corrector"`` (mean corrector gain = 0).
- Quadrupoles without an independent signature (two magnets with no BPM or corrector between them, a magnet at
  a null of both beta functions' variation) give small singular values: the SVD cut (``rcond`` or ``n_sv``)
  drops those combinations, so only their determined combination is fitted (minimum-norm), or they can be
  grouped (``group=``).
- A global energy error against the quadrupoles is not an ORM degeneracy (tunes and beta functions move
  differently); a dispersion scale against BPM gains is removed by the gain constraint.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat.scipy import single_thread_blas
from ..profile import Profile
from ._common import FloatArray, corrector_table, resolve_profile, rms, run_results, run_start
from ._loco_model import ModelResponse, linear_response
from .dispersion import Dispersion
from .orm import OrbitResponse, rf_frequency_of
from .tune import MODEL_FAMILY_TYPES, model_lattice

__all__ = [
    "FIT_CHOICES",
    "LocoResult",
    "OpticsCorrection",
    "fit_loco",
    "loco_parameters",
    "optics_correction",
    "beta_beat",
    "corrected_lattice",
]

#: What ``fit_loco(fit=...)`` accepts.
FIT_CHOICES = ("quads", "skew", "bpm_gains", "bpm_rolls", "corrector_gains", "corrector_rolls", "energy", "rf")
_DEFAULT_FIT = ("quads", "bpm_gains", "corrector_gains")

_KIND_UNITS = {"bpm_gain_x": "1", "bpm_gain_y": "1", "bpm_roll": "rad", "corrector_gain": "1",
               "corrector_roll": "rad", "energy": "1/rad", "rf": "1"}


# ======================================================================================================
# what is fitted
@dataclass
class _Elements:
    """The magnets whose gradients are fitted, and how they map to parameters."""

    refpts: np.ndarray  # (ne,) lattice indices
    kinds: list[str]  # "normal" / "skew"
    names: list[str]  # device name (family devices) or FamName@refpt
    families: list[str | None]  # profile family of each element (None if not in one)
    k0: np.ndarray  # (ne,) strength in the start lattice (PolynomB[1] / PolynomA[1])
    thick: np.ndarray  # (ne,) bool: PolynomB[1] is per metre (True) or integrated (thin element)
    s: np.ndarray  # (ne,) s of the element centre [m]
    param: np.ndarray  # (ne,) index of the parameter among the gradient parameters
    coeff: np.ndarray  # (ne,) dK_element = coeff * parameter
    group_names: list[str]  # one per gradient parameter
    group_kinds: list[str]  # "quad" / "skew"
    group_units: list[str]


_KIND_FIELDS = {"normal": {("PolynomB", 1), ("K", None)}, "skew": {("PolynomA", 1)}}


def _device_lookup(profile: Profile, kind: str = "normal") -> dict[int, tuple[str, str, int]]:
    """Lattice index -> (device, family, index in family) of the families that drive this kind of gradient
    (``PolynomB[1]``/``K`` for normal, ``PolynomA[1]`` for skew), correctors excluded."""
    out = {}
    for fname, fam in profile.families.items():
        if fam.spec.type in ("hcor", "vcor") or fam.spec.field_parts not in _KIND_FIELDS[kind]:
            continue
        for i, r in enumerate(fam.refpts.tolist()):
            out.setdefault(int(r), (fam.device_names[i], fname, i))
    return out


def _select_elements(profile: Profile, ring, sel: Any, kind: str) -> list[int]:
    """Lattice indices of a selection: None (default), family/device names, or integer refpts."""
    if sel is None:
        types = ("quadrupole",) if kind == "normal" else ("skew",)
        fams = profile.families_of_type(*types)
        if not fams:
            if kind == "skew":
                raise ValueError(f"profile {profile.name!r} has no family of type 'skew': pass skews=... (family "
                                 "names, device names or lattice indices) to fit skew quadrupoles")
            raise ValueError(f"profile {profile.name!r} has no family of type 'quadrupole': pass quads=...")
        return sorted({int(r) for f in fams.values() for r in f.refpts.tolist()})
    if isinstance(sel, str):
        sel = [sel]
    devices = {}
    for fname, fam in profile.families.items():
        for i, d in enumerate(fam.device_names):
            devices[d] = int(fam.refpts[i])
    out = []
    for s in sel:
        if isinstance(s, (int, np.integer)):
            if not 0 <= int(s) < len(ring):
                raise IndexError(f"element index {s} out of range 0..{len(ring) - 1}")
            out.append(int(s))
        elif str(s) in profile.families:
            out.extend(int(r) for r in profile.families[str(s)].refpts.tolist())
        elif str(s) in devices:
            out.append(devices[str(s)])
        else:
            raise KeyError(f"unknown magnet {s!r}: give family names {sorted(profile.families)}, device names "
                           f"(like {next(iter(devices))!r}) or lattice indices")
    return sorted(set(out))


def _strength(elem, kind: str) -> float:
    arr = getattr(elem, "PolynomB" if kind == "normal" else "PolynomA", None)
    return float(arr[1]) if arr is not None and len(arr) > 1 else 0.0


def _build_elements(profile: Profile, ring, fit: set[str], quads, skews, group) -> _Elements:
    import at

    lookups = {k: _device_lookup(profile, k) for k in _KIND_FIELDS}
    spos = at.get_s_pos(ring, range(len(ring) + 1))
    refs, kinds = [], []
    if "quads" in fit:
        q = _select_elements(profile, ring, quads, "normal")
        refs += q
        kinds += ["normal"] * len(q)
    if "skew" in fit:
        s = _select_elements(profile, ring, skews, "skew")
        refs += s
        kinds += ["skew"] * len(s)
    names, fams, k0, thick, sc = [], [], [], [], []
    for r, k in zip(refs, kinds):
        e = ring[r]
        dev = lookups[k].get(r)
        names.append(dev[0] if dev else f"{e.FamName}@{r}" + ("" if k == "normal" else ":skew"))
        fams.append(dev[1] if dev else None)
        k0.append(_strength(e, k))
        thick.append(float(getattr(e, "Length", 0.0)) > 0)
        sc.append(0.5 * (spos[r] + spos[r + 1]))
    ne = len(refs)
    param = np.arange(ne)
    coeff = np.ones(ne)
    gnames = list(names)
    gkinds = ["quad" if k == "normal" else "skew" for k in kinds]
    gunits = ["m^-2" if t else "m^-1" for t in thick]
    if group not in (None, "element"):
        if group == "family":
            keys = [(f if f is not None else n) for f, n in zip(fams, names)]
        elif isinstance(group, Mapping):
            where = {}
            for gname, members in group.items():
                for m in ([members] if isinstance(members, str) else members):
                    for r in _select_elements(profile, ring, [m], "normal"):
                        where[r] = str(gname)
            keys = [where.get(r, n) for r, n in zip(refs, names)]
        else:
            raise ValueError(f"group must be 'element', 'family' or a mapping group -> magnets, got {group!r}")
        gnames, gkinds, gunits = [], [], []
        index: dict[tuple[str, str], int] = {}
        for i, (key, k) in enumerate(zip(keys, kinds)):
            gk = (key, k)
            if gk not in index:
                index[gk] = len(gnames)
                grouped = keys.count(key) > 1 or key != names[i]
                gnames.append(key if (k == "normal" or not isinstance(group, Mapping)) else f"{key}:skew")
                gkinds.append("quad" if k == "normal" else "skew")
                gunits.append("1" if (grouped and k == "normal") else ("m^-2" if thick[i] else "m^-1"))
            param[i] = index[gk]
        for i in range(ne):
            if gunits[param[i]] == "1":
                if k0[i] == 0:
                    raise ValueError(f"magnet {names[i]} has zero strength: it cannot be fitted as a relative change "
                                     "of its group; fit it alone (group='element')")
                coeff[i] = k0[i]
    return _Elements(refpts=np.asarray(refs, dtype=np.int64), kinds=kinds, names=names, families=fams,
                     k0=np.asarray(k0, dtype=float), thick=np.asarray(thick, dtype=bool), s=np.asarray(sc),
                     param=param, coeff=coeff, group_names=gnames, group_kinds=gkinds, group_units=gunits)


def _apply_elements(ring, el: _Elements, values: np.ndarray) -> None:
    """Write start strength + fitted change into ``ring`` (in place)."""
    dk = el.coeff * values[el.param]
    for r, k, k0, d in zip(el.refpts.tolist(), el.kinds, el.k0.tolist(), dk.tolist()):
        e = ring[r]
        name = "PolynomB" if k == "normal" else "PolynomA"
        arr = getattr(e, name, None)
        if arr is None or len(arr) < 2:
            for nm in ("PolynomA", "PolynomB"):
                a = getattr(e, nm, None)
                pad = np.zeros(max(2, 0 if a is None else len(a)))
                if a is not None:
                    pad[:len(a)] = a
                setattr(e, nm, pad)
            e.MaxOrder = max(int(getattr(e, "MaxOrder", 0)), 1)
            arr = getattr(e, name)
        arr[1] = k0 + d


# ======================================================================================================
# the parameter vector
@dataclass
class _Params:
    """Layout of the parameter vector: gradient parameters, then the row- and column-type calibrations."""

    n_grad: int
    kinds: list[str]
    names: list[str]
    units: list[str]
    gx: np.ndarray  # parameter index per BPM (-1: not fitted)
    gy: np.ndarray
    roll: np.ndarray
    cg: np.ndarray  # per corrector
    croll: np.ndarray
    energy: np.ndarray
    rf: int

    @property
    def size(self) -> int:
        return len(self.kinds)


def _build_params(el: _Elements, fit: set[str], bpm_names: list[str], cor_names: list[str], bpm_ok: np.ndarray,
                  cor_ok: np.ndarray, has_disp: bool) -> _Params:
    kinds = list(el.group_kinds)
    names = list(el.group_names)
    units = list(el.group_units)
    nb, nc = len(bpm_names), len(cor_names)

    def add(kind: str, labels: list[str], ok: np.ndarray) -> np.ndarray:
        idx = np.full(len(labels), -1, dtype=np.int64)
        for i, lab in enumerate(labels):
            if ok[i]:
                idx[i] = len(kinds)
                kinds.append(kind)
                names.append(lab)
                units.append(_KIND_UNITS[kind])
        return idx

    none_b = np.full(nb, -1, dtype=np.int64)
    none_c = np.full(nc, -1, dtype=np.int64)
    okx, oky = bpm_ok[:nb], bpm_ok[nb:]
    gx = add("bpm_gain_x", bpm_names, okx) if "bpm_gains" in fit else none_b
    gy = add("bpm_gain_y", bpm_names, oky) if "bpm_gains" in fit else none_b
    roll = add("bpm_roll", bpm_names, okx & oky) if "bpm_rolls" in fit else none_b
    cg = add("corrector_gain", cor_names, cor_ok) if "corrector_gains" in fit else none_c
    croll = add("corrector_roll", cor_names, cor_ok) if "corrector_rolls" in fit else none_c
    energy = add("energy", cor_names, cor_ok) if "energy" in fit else none_c
    rf = -1
    if has_disp and "rf" in fit:
        rf = len(kinds)
        kinds.append("rf")
        names.append("dispersion_scale")
        units.append("1")
    return _Params(n_grad=len(el.group_kinds), kinds=kinds, names=names, units=units, gx=gx, gy=gy, roll=roll,
                   cg=cg, croll=croll, energy=energy, rf=rf)


def _take(p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.where(idx >= 0, p[np.maximum(idx, 0)], 0.0)


# ======================================================================================================
# prediction and Jacobian
@dataclass
class _Prediction:
    orm: np.ndarray  # (2n, m)
    disp: np.ndarray | None  # (2n,)
    u: np.ndarray  # (2n, m): model columns with corrector calibrations, before the BPMs
    b: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # BPM matrices (a, b; c, d) per BPM
    eta_u: np.ndarray | None  # (2n,) scaled dispersion before the BPMs


def _bpm_matrices(p: np.ndarray, par: _Params) -> tuple[np.ndarray, ...]:
    gx, gy, th = 1.0 + _take(p, par.gx), 1.0 + _take(p, par.gy), _take(p, par.roll)
    c, s = np.cos(th), np.sin(th)
    return gx * c, gx * s, -gy * s, gy * c


def _apply_bpm(b, top: np.ndarray, bot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a11, a12, a21, a22 = b
    shape = (-1,) + (1,) * (top.ndim - 1)
    return (a11.reshape(shape) * top + a12.reshape(shape) * bot,
            a21.reshape(shape) * top + a22.reshape(shape) * bot)


def _predict(p: np.ndarray, par: _Params, mod: ModelResponse, planes_sign: np.ndarray, with_disp: bool) -> _Prediction:
    n = mod.orm.shape[0] // 2
    cgain = 1.0 + _take(p, par.cg)
    phi = _take(p, par.croll)
    e = _take(p, par.energy)
    u = mod.orm * (cgain * np.cos(phi))
    if mod.orm_other is not None and np.any(phi):
        u = u + mod.orm_other * (cgain * planes_sign * np.sin(phi))
    if np.any(e):
        u = u + np.outer(mod.eta, e)
    b = _bpm_matrices(p, par)
    top, bot = _apply_bpm(b, u[:n], u[n:])
    disp = eta_u = None
    if with_disp:
        eta_u = mod.eta * (1.0 + (p[par.rf] if par.rf >= 0 else 0.0))
        dt, db = _apply_bpm(b, eta_u[:n], eta_u[n:])
        disp = np.concatenate([dt, db])
    return _Prediction(np.concatenate([top, bot]), disp, u, b, eta_u)


@dataclass
class _CalKind:
    """The weighted Jacobian of one kind of calibration parameter, in the data's own layout."""

    where: str  # "row" (a BPM row parameter), "col" (a corrector column parameter), "rf"
    owner: np.ndarray  # (2n,) for "row", (m,) for "col", (1,) for "rf": parameter index or -1
    orm: np.ndarray | None  # (2n, m) weighted derivative on the ORM data
    disp: np.ndarray | None  # (2n,) weighted derivative on the dispersion data


def _calibration_kinds(p: np.ndarray, par: _Params, mod: ModelResponse, pred: _Prediction,
                       planes_sign: np.ndarray, w_orm: np.ndarray, w_disp: np.ndarray | None) -> list[_CalKind]:
    nb2, nc = mod.orm.shape
    n = nb2 // 2
    b = pred.b
    u = pred.u
    cgain = 1.0 + _take(p, par.cg)
    phi = _take(p, par.croll)
    gx, gy = 1.0 + _take(p, par.gx), 1.0 + _take(p, par.gy)
    th = _take(p, par.roll)
    c, s = np.cos(th)[:, None], np.sin(th)[:, None]
    ut, ub = u[:n], u[n:]
    et = eb = None
    if pred.eta_u is not None:
        et, eb = pred.eta_u[:n, None], pred.eta_u[n:, None]
    none = np.full(n, -1, dtype=np.int64)
    out: list[_CalKind] = []

    def rows(top, bot, own_top, own_bot, dtop, dbot):
        m_ = np.concatenate([top, bot]) * w_orm
        d_ = None if w_disp is None or dtop is None else np.concatenate([dtop, dbot]).reshape(-1) * w_disp
        out.append(_CalKind("row", np.concatenate([own_top, own_bot]), m_, d_))

    zero = np.zeros((n, nc))
    zd = None if et is None else np.zeros((n, 1))
    if np.any(par.gx >= 0):
        rows(c * ut + s * ub, zero, par.gx, none, None if et is None else c * et + s * eb, zd)
    if np.any(par.gy >= 0):
        rows(zero, -s * ut + c * ub, none, par.gy, zd, None if et is None else -s * et + c * eb)
    if np.any(par.roll >= 0):
        rows(gx[:, None] * (-s * ut + c * ub), gy[:, None] * (-c * ut - s * ub), par.roll, par.roll,
             None if et is None else gx[:, None] * (-s * et + c * eb),
             None if et is None else gy[:, None] * (-c * et - s * eb))

    def cols(values, own):
        vt, vb = _apply_bpm(b, values[:n], values[n:])
        out.append(_CalKind("col", own, np.concatenate([vt, vb]) * w_orm, None))

    if np.any(par.cg >= 0):
        base = mod.orm * np.cos(phi)
        if mod.orm_other is not None:
            base = base + mod.orm_other * (planes_sign * np.sin(phi))
        cols(base, par.cg)
    if np.any(par.croll >= 0):
        other = mod.orm_other if mod.orm_other is not None else np.zeros_like(mod.orm)
        cols(cgain * (-mod.orm * np.sin(phi) + other * (planes_sign * np.cos(phi))), par.croll)
    if np.any(par.energy >= 0):
        cols(np.broadcast_to(mod.eta[:, None], mod.orm.shape), par.energy)
    if par.rf >= 0 and w_disp is not None:
        dt, db = _apply_bpm(b, mod.eta[:n], mod.eta[n:])
        out.append(_CalKind("rf", np.array([par.rf]), None, np.concatenate([dt, db]) * w_disp))
    return out


def _gradient_block(p: np.ndarray, par: _Params, mod: ModelResponse, w_orm: np.ndarray,
                    w_disp: np.ndarray | None, pred: _Prediction) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted Jacobian of the gradient parameters: (ng, 2n, m) on the ORM (written over ``mod.d_orm``) and
    (ng, 2n) on the dispersion."""
    nb2, nc = mod.orm.shape
    n = nb2 // 2
    d = mod.d_orm
    cgain = 1.0 + _take(p, par.cg)
    phi = _take(p, par.croll)
    e = _take(p, par.energy)
    colf = cgain * np.cos(phi)
    a11, a12, a21, a22 = pred.b
    mixed = np.any(a12) or np.any(a21)
    wt, wb = w_orm[:n], w_orm[n:]
    for q in range(d.shape[0]):  # one magnet at a time: no (ng, 2n, m) temporaries
        dq = d[q]
        dq *= colf
        if np.any(e):
            dq += np.outer(mod.d_eta[q], e)
        if mixed:
            top = a11[:, None] * dq[:n] + a12[:, None] * dq[n:]
            dq[n:] = a21[:, None] * dq[:n] + a22[:, None] * dq[n:]
            dq[:n] = top
        else:
            dq[:n] *= a11[:, None]
            dq[n:] *= a22[:, None]
        dq[:n] *= wt
        dq[n:] *= wb
    jd = None
    if w_disp is not None:
        de = mod.d_eta * (1.0 + (p[par.rf] if par.rf >= 0 else 0.0))
        dt, db = _apply_bpm(pred.b, de[:, :n].T, de[:, n:].T)
        jd = np.concatenate([dt.T, db.T], axis=1) * w_disp[None, :]
    return d, jd


def _gram(jq: np.ndarray) -> np.ndarray:
    """``J J^T`` of the gradient block (ng, 2n, m) with one BLAS call on the array as it lies (no copy)."""
    from scipy.linalg.blas import dsyrk

    ng = jq.shape[0]
    flat = jq.reshape(ng, -1)
    a = dsyrk(1.0, flat.T, trans=1, lower=0)  # upper triangle of flat @ flat.T
    return np.triu(a) + np.triu(a, 1).T


def _normal_equations(jq: np.ndarray, jd: np.ndarray | None, kinds: list[_CalKind], r: np.ndarray,
                      rd: np.ndarray | None, ng: int, npar: int) -> tuple[np.ndarray, ...]:
    """Blocks of J^T J and J^T r: A (ng, ng), B (ng, ncal), C (ncal, ncal), g_q (ng,), g_c (ncal,)."""
    ncal = npar - ng
    a = np.zeros((ng, ng))
    gq = np.zeros(ng)
    if ng:
        flat = jq.reshape(ng, -1)
        gq = flat @ r.reshape(-1)
        a = _gram(jq)
        if jd is not None:
            a += jd @ jd.T
            gq += jd @ rd
    bt = np.zeros((ncal, ng))
    cm = np.zeros((ncal, ncal))
    gc = np.zeros(ncal)
    for ka in kinds:
        own = ka.owner
        valid = own >= 0
        oi = own[valid] - ng
        if ka.where == "row":
            v = np.sum(ka.orm * r, axis=1)
            if ka.disp is not None and rd is not None:
                v = v + ka.disp * rd
            np.add.at(gc, oi, v[valid])
            if ng:
                sq = np.einsum("qow,ow->qo", jq, ka.orm)
                if ka.disp is not None and jd is not None:
                    sq += jd * ka.disp[None, :]
                np.add.at(bt, oi, sq[:, valid].T)
        elif ka.where == "col":
            v = np.sum(ka.orm * r, axis=0)
            np.add.at(gc, oi, v[valid])
            if ng:
                sq = np.einsum("qow,ow->qw", jq, ka.orm)
                np.add.at(bt, oi, sq[:, valid].T)
        else:  # rf
            gc[oi] += float(ka.disp @ rd)
            if ng and jd is not None:
                bt[oi[0]] += jd @ ka.disp
    for ia, ka in enumerate(kinds):
        for kb in kinds[ia:]:
            _cross(cm, ka, kb, ng, same=ka is kb)
    return a, bt.T, cm, gq, gc


def _cross(cm: np.ndarray, ka: _CalKind, kb: _CalKind, ng: int, same: bool) -> None:
    """Add the (ka, kb) block of J^T J to ``cm`` (and its transpose)."""
    order = {"row": 0, "col": 1, "rf": 2}
    if order[ka.where] > order[kb.where]:
        ka, kb = kb, ka
    va, vb = ka.owner >= 0, kb.owner >= 0

    def put(i, j, v):
        np.add.at(cm, (i, j), v)
        if not same:
            np.add.at(cm, (j, i), v)

    if ka.where == "row" and kb.where == "row":
        v = np.sum(ka.orm * kb.orm, axis=1)
        if ka.disp is not None and kb.disp is not None:
            v = v + ka.disp * kb.disp
        ok = va & vb
        put(ka.owner[ok] - ng, kb.owner[ok] - ng, v[ok])
    elif ka.where == "col" and kb.where == "col":
        v = np.sum(ka.orm * kb.orm, axis=0)
        ok = va & vb
        put(ka.owner[ok] - ng, kb.owner[ok] - ng, v[ok])
    elif ka.where == "row" and kb.where == "col":
        pm = (ka.orm * kb.orm)[np.ix_(va, vb)]
        ii = np.broadcast_to((ka.owner[va] - ng)[:, None], pm.shape)
        jj = np.broadcast_to((kb.owner[vb] - ng)[None, :], pm.shape)
        put(ii.ravel(), jj.ravel(), pm.ravel())
    elif ka.where == "row" and kb.where == "rf":
        if ka.disp is not None:
            v = ka.disp * kb.disp
            put(ka.owner[va] - ng, np.full(int(va.sum()), kb.owner[0] - ng), v[va])
    elif ka.where == "rf" and kb.where == "rf":
        cm[ka.owner[0] - ng, ka.owner[0] - ng] += float(ka.disp @ ka.disp)


def _solve(blocks: tuple[np.ndarray, ...], h_con: np.ndarray, ng: int, lam: float, rcond: float,
           n_sv: int | None, want_var: bool, basis: dict | None = None):
    """Damped Gauss-Newton step with an SVD cut on the gradient block (after eliminating the calibrations).

    Returns (step, variance or None, singular values of the normalised gradient Schur complement, kept)."""
    from scipy.linalg import cho_factor, cho_solve, solve_triangular

    a, b, cm, gq, gc = blocks
    ncal = cm.shape[0]
    npar = ng + ncal
    da = np.sqrt(np.clip(np.diag(a), 0, None))
    dc = np.sqrt(np.clip(np.diag(cm), 0, None))
    act_q, act_c = da > 0, dc > 0
    sq = np.where(act_q, 1.0 / np.where(act_q, da, 1.0), 0.0)
    sc = np.where(act_c, 1.0 / np.where(act_c, dc, 1.0), 0.0)
    iq, ic = np.flatnonzero(act_q), np.flatnonzero(act_c)
    as_ = (a * sq[:, None] * sq[None, :])[np.ix_(iq, iq)] + lam * np.eye(iq.size)
    bs = (b * sq[:, None] * sc[None, :])[np.ix_(iq, ic)]
    cs = (cm * sc[:, None] * sc[None, :])[np.ix_(ic, ic)] + lam * np.eye(ic.size)
    gqs = (gq * sq)[iq]
    gcs = (gc * sc)[ic]
    step = np.zeros(npar)
    var = np.zeros(npar) if want_var else None
    l_c = y = None
    if ic.size:
        # gain-scale constraints as a stiff penalty (the directions they fix carry no information in the data)
        hc = h_con[:, ng:][:, ic] / dc[ic][None, :] if h_con.size else np.zeros((0, ic.size))
        for row in hc:
            nrm = float(row @ row)
            if nrm > 0:
                cs += 1e8 * np.outer(row, row) / nrm
        cs += 1e-12 * np.eye(ic.size)
        l_c = cho_factor(cs, lower=True, check_finite=False)
        y = cho_solve(l_c, bs.T, check_finite=False) if iq.size else np.zeros((ic.size, 0))
        c0 = cho_solve(l_c, gcs, check_finite=False)
    sv = np.zeros(0)
    kept = 0
    if iq.size:
        schur = as_ - (bs @ y if ic.size else 0.0)
        rhs = gqs - (y.T @ gcs if ic.size else 0.0)
        ev, vec = np.linalg.eigh(0.5 * (schur + schur.T))
        order = np.argsort(ev)[::-1]
        ev, vec = ev[order], vec[:, order]
        sv = np.sqrt(np.clip(ev - lam, 0, None))
        if n_sv is not None:
            kept = max(1, min(int(n_sv), int(np.sum(sv > 0))))
        else:
            kept = int(np.sum(sv > rcond * sv[0])) if sv.size and sv[0] > 0 else 0
        vk = vec[:, :kept]
        evk = ev[:kept]
        qs = vk @ ((vk.T @ rhs) / evk)
        step[iq] = qs * sq[iq]
        if ic.size:
            cs_step = c0 - y @ qs
            step[ng + ic] = cs_step * sc[ic]
        if basis is not None:  # the kept subspace, in parameter units: resolution matrix S V V^T S^-1
            full = np.zeros((ng, ng))
            full[np.ix_(iq, iq)] = (sq[iq][:, None] * vk) @ (vk.T / np.where(sq[iq] > 0, sq[iq], 1.0)[None, :])
            basis["resolution"] = full
        if want_var:
            var[iq] = np.sum(vk * vk / evk[None, :], axis=1) * sq[iq] ** 2
            if ic.size:
                yv = y @ vk
                l_inv = solve_triangular(l_c[0], np.eye(ic.size), lower=True, check_finite=False)
                dcinv = np.sum(l_inv * l_inv, axis=0)
                var[ng + ic] = (dcinv + np.sum(yv * yv / evk[None, :], axis=1)) * sc[ic] ** 2
    elif ic.size:
        step[ng + ic] = c0 * sc[ic]
        kept = ic.size
        if want_var:
            l_inv = solve_triangular(l_c[0], np.eye(ic.size), lower=True, check_finite=False)
            var[ng + ic] = np.sum(l_inv * l_inv, axis=0) * sc[ic] ** 2
    return step, var, sv, kept


def _gain_constraints(par: _Params, planes: np.ndarray, reference: str) -> np.ndarray:
    """Rows H of the constraints H p = 0 that fix the BPM/corrector gain scale of each plane."""
    out = []
    if reference not in ("both", "bpm", "corrector", "none"):
        raise ValueError(f"gain_reference must be 'both', 'bpm', 'corrector' or 'none', got {reference!r}")
    if reference == "none":
        return np.zeros((0, par.size))
    for pl, gidx in ((0, par.gx), (1, par.gy)):
        bi = gidx[gidx >= 0]
        ci = par.cg[(par.cg >= 0) & (planes == pl)]
        if not bi.size or not ci.size:
            continue  # no degeneracy when one side is not fitted
        h = np.zeros(par.size)
        if reference == "both":  # minimum-norm split of the unknown scale: sum of BPM gains = sum of corrector gains
            h[bi] = 1.0
            h[ci] = -1.0
        elif reference == "bpm":
            h[bi] = 1.0
        else:
            h[ci] = 1.0
        out.append(h)
    return np.asarray(out).reshape(-1, par.size)


# ======================================================================================================
# result
@dataclass
class LocoResult:
    """A LOCO fit.

    Attributes:
        names, kinds, units: one per fitted parameter. Kinds: ``quad`` (gradient ``dK`` [m^-2], [m^-1] for a thin
            element, or a relative ``dK/K`` [1] for a group), ``skew`` [m^-2], ``bpm_gain_x``/``bpm_gain_y`` [1],
            ``bpm_roll`` [rad], ``corrector_gain`` [1], ``corrector_roll`` [rad], ``energy`` [1/rad], ``rf`` [1].
        values: fitted values (model = start lattice + these).
        sigmas: one-standard-deviation uncertainties (from the weighted Jacobian; scaled by sqrt(chi2/dof) when the
            BPM noise was not given).
        chi2: chi-square after each accepted iteration (first: the start model), with the final data mask.
        chi2_dof: final chi-square per degree of freedom.
        residual: (2n, m) measured minus fitted ORM [m/rad]; NaN where the data were excluded.
        residual_dispersion: (2n,) measured minus fitted dispersion [m], or None.
        data_mask: (2n, m) True where an ORM element was used.
        bpm_names, corrector_names, corrector_planes: the ORM's rows (per plane) and columns.
        excluded_bpms, excluded_correctors: names excluded automatically or by request, with the reason.
        element_refpts, element_kinds, element_names, element_s, element_k0, element_param, element_coeff: the
            fitted magnets (lattice index, ``normal``/``skew``, name, centre [m], start strength, parameter index,
            ``dK = coeff * value``).
        setpoints: ``{family: hardware setpoints}`` of the start lattice (the machine at the measurement), or None
            for the design lattice.
        n_sv: singular values kept at the last step; singular_values: all of them (normalised Jacobian).
        profile: the profile name; orm_uid, dispersion_uid: the input runs; options: the fit options.
        tunes_model: fractional tunes of the fitted model.
        resolution: (ng, ng) model resolution matrix of the gradient parameters at the solution (in memory only,
            not stored in runs): ``R = S V_k V_k^T S^-1`` with ``V_k`` the kept singular vectors of the normalised
            gradient block (calibrations eliminated) and ``S`` the column scaling. Without noise the fit finds
            ``R p_true``: ``R`` projects the true errors onto what this data set can determine, so
            ``(I - R) p_true`` is what no fit of it can see (see docs/tools/loco.md, "Degeneracies").
    """

    names: list[str]
    kinds: list[str]
    units: list[str]
    values: FloatArray
    sigmas: FloatArray
    chi2: list[float]
    chi2_dof: float
    residual: FloatArray
    data_mask: np.ndarray
    bpm_names: list[str]
    corrector_names: list[str]
    corrector_planes: list[str]
    element_refpts: np.ndarray
    element_kinds: list[str]
    element_names: list[str]
    element_s: FloatArray
    element_k0: FloatArray
    element_param: np.ndarray
    element_coeff: FloatArray
    excluded_bpms: dict[str, str] = field(default_factory=dict)
    excluded_correctors: dict[str, str] = field(default_factory=dict)
    residual_dispersion: FloatArray | None = None
    setpoints: dict[str, list[float]] | None = None
    n_sv: int = 0
    singular_values: FloatArray | None = None
    profile: str | None = None
    orm_uid: str | None = None
    dispersion_uid: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tunes_model: FloatArray | None = None
    bpm_refpts: np.ndarray | None = None
    corrector_refpts: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=dict)
    uid: str | None = None
    resolution: FloatArray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=float)
        self.sigmas = np.asarray(self.sigmas, dtype=float)
        self.element_refpts = np.asarray(self.element_refpts, dtype=np.int64)
        self.element_param = np.asarray(self.element_param, dtype=np.int64)
        self.element_coeff = np.asarray(self.element_coeff, dtype=float)
        self.element_s = np.asarray(self.element_s, dtype=float)
        self.element_k0 = np.asarray(self.element_k0, dtype=float)
        self.residual = np.asarray(self.residual, dtype=float)
        self.data_mask = np.asarray(self.data_mask, dtype=bool)

    def __repr__(self) -> str:
        ng = int(np.sum([k in ("quad", "skew") for k in self.kinds]))
        return (f"LocoResult({len(self.values)} parameters ({ng} gradients), chi2 {self.chi2[0]:.4g} -> "
                f"{self.chi2[-1]:.4g} in {len(self.chi2) - 1} iterations, chi2/dof {self.chi2_dof:.3g}, "
                f"{len(self.excluded_bpms)} BPMs and {len(self.excluded_correctors)} correctors excluded)")

    # ------------------------------------------------------------------------------------------------
    def of_kind(self, kind: str) -> tuple[list[str], FloatArray, FloatArray]:
        """(names, values, sigmas) of the parameters of one kind, e.g. ``"bpm_gain_x"``."""
        idx = [i for i, k in enumerate(self.kinds) if k == kind]
        return [self.names[i] for i in idx], self.values[idx], self.sigmas[idx]

    def value(self, name: str, kind: str | None = None) -> float:
        """A fitted value by parameter name (and kind, when a name is shared, e.g. a BPM's gains)."""
        for i, (n, k) in enumerate(zip(self.names, self.kinds)):
            if n == name and (kind is None or k == kind):
                return float(self.values[i])
        raise KeyError(f"no fitted parameter {name!r}{'' if kind is None else f' of kind {kind!r}'}")

    @property
    def dk(self) -> FloatArray:
        """Fitted gradient change of every fitted magnet (``dK`` [m^-2], integrated [m^-1] for thin ones)."""
        return self.element_coeff * self.values[self.element_param]

    @property
    def dk_sigma(self) -> FloatArray:
        return np.abs(self.element_coeff) * self.sigmas[self.element_param]

    @property
    def relative_dk(self) -> FloatArray:
        """``dK / K`` of every fitted magnet (NaN for a magnet of zero start strength)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.element_k0 != 0, self.dk / self.element_k0, np.nan)

    def bpm_gains(self) -> tuple[FloatArray, FloatArray]:
        """(gain_x, gain_y) per BPM of the ORM (0 where not fitted)."""
        gx = np.zeros(len(self.bpm_names))
        gy = np.zeros(len(self.bpm_names))
        pos = {b: i for i, b in enumerate(self.bpm_names)}
        for n, k, v in zip(self.names, self.kinds, self.values):
            if k == "bpm_gain_x":
                gx[pos[n]] = v
            elif k == "bpm_gain_y":
                gy[pos[n]] = v
        return gx, gy

    def corrector_gains(self) -> FloatArray:
        """Relative gain per corrector of the ORM (0 where not fitted)."""
        g = np.zeros(len(self.corrector_names))
        pos = {c: i for i, c in enumerate(self.corrector_names)}
        for n, k, v in zip(self.names, self.kinds, self.values):
            if k == "corrector_gain":
                g[pos[n]] = v
        return g

    # ------------------------------------------------------------------------------------------------
    def fitted_lattice(self, source: Any = None, *, lattice=None):
        """The model the fit corresponds to: the start lattice (design + the measurement's setpoints) plus the
        fitted gradient changes. ``source``: the profile (default: the one named in the result)."""
        if lattice is None:
            prof = _result_profile(self, source)
            ring = model_lattice(prof, self.setpoints)
        else:
            ring = lattice.deepcopy()
        _write_dk(ring, self.element_refpts, self.element_kinds, self.element_k0, self.dk)
        return ring

    def beta_beat(self, source: Any = None, *, design=None, refpts=None) -> tuple[FloatArray, FloatArray]:
        """Beta-beat of the fitted model against the design (profile's design lattice by default) at ``refpts``
        (default: the BPMs): ``(dbx/bx, dby/by)``."""
        prof = _result_profile(self, source)
        ref = prof.load_lattice() if design is None else design
        pts = self.bpm_refpts if refpts is None else refpts
        if pts is None:
            pts = prof.bpm_refpts
        return beta_beat(self.fitted_lattice(prof), ref, pts)

    # ------------------------------------------------------------------------------------------------
    # storage
    #: Keys of the results stream: what the fit found (its layout, known before it iterates, is in the start document,
    #: :meth:`start_metadata`). Few arrays: the Tiled writer's cost grows with the number of array keys (a node
    #: each), not with their size; the small arrays are packed into one key by ``store_result`` (each with its
    #: units and meaning), the scalars and strings are columns of the stream's one event.
    RESULT_KEYS = {
        "parameters": ("", "fitted parameters (row 0) and their one-sigma uncertainties (row 1); units per "
                           "parameter in the start document's loco_units"),
        "residual": ("m/rad", "measured minus fitted orbit response (2n x m); NaN where not used in the fit"),
        "bpm_optics": ("1 | m", "per BPM reading (x at the n BPMs, then y): row 0 the beta-beat of the fitted model "
                                "against the design [1], row 1 measured minus fitted dispersion [m]; NaN where "
                                "not computed"),
        "chi2": ("1", "chi-square after each accepted iteration (first: the start model), with the final data mask"),
        "chi2_dof": ("1", "final chi-square per degree of freedom (the data's part, without the prior's terms)"),
        "n_sv": ("1", "singular values of the normalised gradient Jacobian kept at the last step"),
        "singular_values": ("1", "every singular value of the normalised gradient Jacobian (calibrations "
                                 "eliminated) at the solution"),
        "tunes_model": ("1", "fractional tunes (x, y) of the fitted model"),
        "iterations": ("1", "accepted Gauss-Newton iterations"),
        "converged": ("", "the chi-square improvement fell below tol (else: max_iter reached or steps rejected)"),
        "excluded_bpms": ("", "BPMs excluded (automatically or by request), a JSON object {name: reason}"),
        "excluded_correctors": ("", "correctors excluded (automatically or by request), a JSON object "
                                    "{name: reason}"),
        "fit_seconds": ("s", "wall time of the fit (the loco plan's worker thread, else fit_loco's)"),
    }
    # dK per magnet is LocoResult.dk (element_coeff * values[element_param]). Runs recorded before this layout have
    # chi2, chi2_dof, n_sv, singular values, tunes and the exclusions in the start document (loco_chi2, ...):
    # from_results reads both.

    def to_results(self, beta: tuple[FloatArray, FloatArray] | None = None) -> dict[str, Any]:
        """What the run's ``results`` stream holds (units and meaning: :attr:`RESULT_KEYS`): the fitted values, the
        residuals and the fit's outcome; the names, kinds and units of the parameters, the fitted magnets and the
        start model are in the start document (:meth:`start_metadata`).

        ``beta``: the model beta-beat at the BPMs (:meth:`beta_beat`) to store with it."""
        n2 = 2 * len(self.bpm_names)
        optics = np.full((2, n2), np.nan)
        if beta is not None:
            optics[0] = np.concatenate([np.asarray(beta[0], dtype=float), np.asarray(beta[1], dtype=float)])
        if self.residual_dispersion is not None:
            optics[1] = np.asarray(self.residual_dispersion, dtype=float)
        fit_s = self.timing.get("plan_fit", self.timing.get("total", np.nan))
        return {"parameters": np.vstack([self.values, self.sigmas]),
                "residual": np.where(self.data_mask, self.residual, np.nan), "bpm_optics": optics,
                "chi2": np.asarray(self.chi2, dtype=float), "chi2_dof": float(self.chi2_dof),
                "n_sv": int(self.n_sv),
                "singular_values": np.asarray(self.singular_values if self.singular_values is not None else [],
                                              dtype=float),
                "tunes_model": np.asarray(self.tunes_model if self.tunes_model is not None else [np.nan, np.nan],
                                          dtype=float),
                "iterations": max(0, len(self.chi2) - 1), "converged": bool(self.options.get("converged", False)),
                "excluded_bpms": json.dumps(dict(self.excluded_bpms)),
                "excluded_correctors": json.dumps(dict(self.excluded_correctors)),
                "fit_seconds": round(float(fit_s), 3)}

    def start_metadata(self) -> dict[str, Any]:
        """What :meth:`from_results` needs from the start document (JSON-able lists and scalars): everything known
        once the fit has its parameters, before it iterates (the ``loco`` plan opens its run then)."""
        return _layout_metadata(
            names=self.names, kinds=self.kinds, units=self.units, bpm_names=self.bpm_names,
            corrector_names=self.corrector_names, corrector_planes=self.corrector_planes,
            element_refpts=self.element_refpts, element_kinds=self.element_kinds, element_names=self.element_names,
            element_s=self.element_s, element_k0=self.element_k0, element_param=self.element_param,
            element_coeff=self.element_coeff, setpoints=self.setpoints,
            options={k: v for k, v in self.options.items() if k != "converged"}, orm_uid=self.orm_uid,
            dispersion_uid=self.dispersion_uid, bpm_refpts=self.bpm_refpts, corrector_refpts=self.corrector_refpts,
            profile=self.profile)

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> LocoResult:
        """Rebuild from stored results (:meth:`to_results`) and the run's start document (:meth:`start_metadata`).

        Both layouts: the fit's outcome (chi-square, singular values, exclusions ...) in the results (runs since
        the run opens before the fit) or in the start document (``loco_chi2``, ``excluded_bpms`` ..., earlier)."""
        start = dict(start or {})
        if "parameters" in results:
            pv = np.asarray(results["parameters"], dtype=float)
            values, sigmas = pv[0], pv[1]
        elif "values" in results:  # the first layout: one key per array
            values = np.asarray(results["values"], dtype=float)
            sigmas = np.asarray(results["sigmas"], dtype=float)
        else:
            raise KeyError(f"no 'parameters' in the results {sorted(results)}: is this a loco run?")
        if "residual" not in results:
            raise KeyError(f"no 'residual' in the results {sorted(results)}: is this a loco run?")
        if "loco_names" not in start:
            raise KeyError("the start document has no 'loco_names': is this a loco run?")
        prof = start.get("loco_profile", start.get("profile"))
        if isinstance(prof, Mapping):
            prof = prof.get("name")
        resid = np.asarray(results["residual"], dtype=float)
        mask = np.asarray(results["data_mask"]).astype(bool) if "data_mask" in results else np.isfinite(resid)
        rd = results.get("residual_dispersion")
        if rd is None and "bpm_optics" in results:
            row = np.asarray(results["bpm_optics"], dtype=float)[1]
            rd = None if np.all(np.isnan(row)) else row

        def outcome(key: str, old: str, default: Any = None) -> Any:
            return results[key] if key in results else start.get(old, default)

        sv = outcome("singular_values", "loco_singular_values")
        chi2 = outcome("chi2", "loco_chi2")
        tq = outcome("tunes_model", "loco_tunes_model")
        chi2_dof = outcome("chi2_dof", "loco_chi2_dof", np.nan)
        n_sv = outcome("n_sv", "loco_n_sv", 0)
        tq = None if tq is None or np.all(np.isnan(np.asarray(tq, dtype=float))) else tq
        options = dict(start.get("loco_options") or {})
        if "converged" in results:
            options["converged"] = bool(np.asarray(results["converged"]))
        return cls(
            names=list(start["loco_names"]), kinds=list(start["loco_kinds"]), units=list(start["loco_units"]),
            values=values, sigmas=sigmas,
            chi2=[] if chi2 is None else np.asarray(chi2, dtype=float).reshape(-1).tolist(),
            chi2_dof=float(np.asarray(chi2_dof)), residual=resid, data_mask=mask, bpm_names=list(start["bpm_names"]),
            corrector_names=list(start["corrector_names"]), corrector_planes=list(start["corrector_planes"]),
            element_refpts=np.asarray(start["element_refpts"], dtype=np.int64),
            element_kinds=list(start["element_kinds"]), element_names=list(start["element_names"]),
            element_s=np.asarray(start["element_s"], dtype=float),
            element_k0=np.asarray(start["element_k0"], dtype=float),
            element_param=np.asarray(start["element_param"], dtype=np.int64),
            element_coeff=np.asarray(start["element_coeff"], dtype=float),
            excluded_bpms=_reasons(outcome("excluded_bpms", "excluded_bpms")),
            excluded_correctors=_reasons(outcome("excluded_correctors", "excluded_correctors")),
            residual_dispersion=None if rd is None else np.asarray(rd, dtype=float),
            setpoints=start.get("loco_setpoints"), n_sv=int(np.asarray(n_sv)),
            singular_values=None if sv is None else np.asarray(sv, dtype=float), profile=prof,
            orm_uid=start.get("orm_uid"), dispersion_uid=start.get("dispersion_uid"), options=options,
            tunes_model=None if tq is None else np.asarray(tq, dtype=float),
            bpm_refpts=None if start.get("bpm_refpts") is None else np.asarray(start["bpm_refpts"]),
            corrector_refpts=None if start.get("corrector_refpts") is None else np.asarray(start["corrector_refpts"]),
            timing={} if "fit_seconds" not in results else {"fit": float(np.asarray(results["fit_seconds"]))},
            uid=start.get("uid"))

    @classmethod
    def from_run(cls, run: Any) -> LocoResult:
        """Read the fit a ``loco`` run stored (a Tiled ``BlueskyRun``): only the catalogue is needed."""
        start = run_start(run)
        tool = start.get("tool")
        if tool not in (None, "loco"):
            raise ValueError(f"run {start.get('uid', '?')[:8]} is a {tool!r} run, not a loco run")
        return cls.from_results(run_results(run), start)

    # ------------------------------------------------------------------------------------------------
    def plot_gradients(self, path: str | Path, truth: npt.ArrayLike | None = None) -> Path:
        """PNG: fitted gradient errors against s [m] with their 1-sigma uncertainties (``dK/K`` of normal
        quadrupoles, ``dK`` [m^-2] of skew gradients); ``truth``: the true ``dK`` per fitted magnet to overlay."""
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        normal = np.array([k == "normal" for k in self.element_kinds], dtype=bool)
        skew = ~normal
        fig = Figure(figsize=(10, 3.6 * (1 + int(skew.any()))), dpi=100)
        axes = fig.subplots(1 + int(skew.any()), 1, squeeze=False)
        ax = axes[0, 0]
        k0 = np.where(self.element_k0 != 0, self.element_k0, np.nan)
        if normal.any():
            ax.errorbar(self.element_s[normal], 1e3 * self.dk[normal] / k0[normal],
                        yerr=1e3 * np.abs(self.dk_sigma[normal] / k0[normal]), fmt="o", ms=3, lw=0.6,
                        label=f"fitted ({int(normal.sum())} magnets)")
            if truth is not None:
                t = np.asarray(truth, dtype=float)
                ax.plot(self.element_s[normal], 1e3 * t[normal] / k0[normal], "x", ms=4, label="true")
            ax.legend(fontsize=8)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_ylabel("dK/K [1e-3]")
        ax.set_title(f"fitted gradient errors ({self.n_sv} singular values kept, chi2/dof {self.chi2_dof:.3g})")
        if skew.any():
            ax = axes[1, 0]
            ax.errorbar(self.element_s[skew], self.dk[skew], yerr=self.dk_sigma[skew], fmt="s", ms=3, lw=0.6)
            ax.set_ylabel("skew dK [m^-2]")
        axes[-1, 0].set_xlabel("s [m]")
        height = fig.get_figheight()  # fixed margins [in]: tight_layout would cost as much as drawing the figure
        fig.subplots_adjust(left=0.09 if skew.any() else 0.07, right=0.985, bottom=0.5 / height,
                            top=1 - 0.35 / height, hspace=0.25)
        fig.savefig(path)
        return path

    def plot_chi2(self, path: str | Path) -> Path:
        """PNG: chi-square per iteration (first point: the start model)."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.semilogy(np.arange(len(self.chi2)), self.chi2, "o-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel("chi-square")
        ax.set_title(f"LOCO chi-square per iteration (final chi2/dof {self.chi2_dof:.3g})")
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)  # fixed: no tight_layout pass
        fig.savefig(path)
        return path

    def plot(self, path: str | Path, source: Any = None, *, corrected=None, truth: npt.ArrayLike | None = None,
             title: str | None = None) -> Path:
        """PNG of the fit: fitted gradient errors against s, beta-beat of the model (and after a correction)
        against the design, chi-square per iteration, BPM and corrector gains.

        Args:
            path: where to write the PNG.
            source: the profile (default: the one named in the result), for the lattices.
            corrected: the lattice predicted after a correction (:func:`corrected_lattice`) to draw its beta-beat.
            truth: the true ``dK`` per fitted magnet [same units as :attr:`dk`] to overlay (simulations).
        """
        import at
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof = _result_profile(self, source)
        design = prof.load_lattice()
        fitted = self.fitted_lattice(prof)
        fig = Figure(figsize=(12, 7.5), dpi=100)
        axes = fig.subplots(2, 2)
        ax = axes[0, 0]
        normal = np.array([k == "normal" for k in self.element_kinds])
        rel = self.relative_dk
        if np.any(normal & np.isfinite(rel)):
            ax.errorbar(self.element_s[normal], 1e3 * rel[normal],
                        yerr=1e3 * np.abs(self.dk_sigma[normal] / np.where(self.element_k0[normal] != 0,
                                                                            self.element_k0[normal], np.nan)),
                        fmt="o", ms=3, lw=0.6, label="fitted")
            if truth is not None:
                t = np.asarray(truth, dtype=float)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ax.plot(self.element_s[normal], 1e3 * t[normal] / self.element_k0[normal], "x", ms=4,
                            label="true")
            ax.set_ylabel("gradient error dK/K [1e-3]")
        if np.any(~normal):
            ax.plot(self.element_s[~normal], self.dk[~normal], "s", ms=3, label="skew dK [m^-2]")
        ax.set_xlabel("s [m]")
        ax.set_title("fitted gradient errors")
        ax.legend(fontsize=8)
        ax = axes[0, 1]
        refs = at.All
        spos = at.get_s_pos(design, refs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bx, by = beta_beat(fitted, design, refs)
            ax.plot(spos, 100 * bx, lw=0.8, label=f"x fitted model (rms {100 * rms(bx):.2f} %)")
            ax.plot(spos, 100 * by, lw=0.8, label=f"y fitted model (rms {100 * rms(by):.2f} %)")
            if corrected is not None:
                cx, cy = beta_beat(corrected, design, refs)
                ax.plot(spos, 100 * cx, lw=0.8, label=f"x after correction (rms {100 * rms(cx):.2f} %)")
                ax.plot(spos, 100 * cy, lw=0.8, label=f"y after correction (rms {100 * rms(cy):.2f} %)")
        ax.set_xlabel("s [m]")
        ax.set_ylabel("beta-beat [%]")
        ax.set_title("beta-beat against the design")
        ax.legend(fontsize=7)
        ax = axes[1, 0]
        ax.semilogy(np.arange(len(self.chi2)), self.chi2, "o-")
        ax.set_xlabel("iteration")
        ax.set_ylabel("chi-square [1]")
        ax.set_title(f"chi-square per iteration (final chi2/dof {self.chi2_dof:.3g})")
        ax = axes[1, 1]
        gx, gy = self.bpm_gains()
        ax.plot(100 * gx, ".", ms=3, label="BPM gain x")
        ax.plot(100 * gy, ".", ms=3, label="BPM gain y")
        cg = self.corrector_gains()
        ax.plot(np.arange(len(cg)) * len(gx) / max(1, len(cg)), 100 * cg, "+", ms=3,
                label="corrector gain (index scaled)")
        ax.set_xlabel("BPM index")
        ax.set_ylabel("relative gain [%]")
        ax.set_title("calibrations")
        ax.legend(fontsize=8)
        fig.suptitle(title or f"LOCO {self.profile or ''}: {len(self.values)} parameters")
        fig.tight_layout()
        fig.savefig(path)
        return path


def _reasons(value: Any) -> dict[str, str]:
    """Exclusions ``{name: reason}``: a mapping (start document, earlier runs) or its JSON string (results)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    arr = np.asarray(value)
    text = arr.item() if arr.ndim == 0 else arr.reshape(-1)[-1]
    if isinstance(text, bytes):
        text = text.decode()
    return {str(k): str(v) for k, v in json.loads(str(text) or "{}").items()}


def _layout_metadata(*, names, kinds, units, bpm_names, corrector_names, corrector_planes, element_refpts,
                     element_kinds, element_names, element_s, element_k0, element_param, element_coeff, setpoints,
                     options, orm_uid, dispersion_uid, bpm_refpts, corrector_refpts, profile) -> dict[str, Any]:
    """The start-document keys of a LOCO run: what is known once the fit has its parameters (JSON-able)."""
    md: dict[str, Any] = {
        "loco_names": list(names), "loco_kinds": list(kinds), "loco_units": list(units),
        "loco_n_parameters": len(names),
        "bpm_names": list(bpm_names), "corrector_names": list(corrector_names),
        "corrector_planes": list(corrector_planes),
        "element_refpts": np.asarray(element_refpts).astype(int).tolist(), "element_kinds": list(element_kinds),
        "element_names": list(element_names), "element_s": np.asarray(element_s, dtype=float).tolist(),
        "element_k0": np.asarray(element_k0, dtype=float).tolist(),
        "element_param": np.asarray(element_param).astype(int).tolist(),
        "element_coeff": np.asarray(element_coeff, dtype=float).tolist(),
        "loco_setpoints": None if setpoints is None else {k: list(map(float, v)) for k, v in setpoints.items()},
        "loco_options": dict(options), "orm_uid": orm_uid, "dispersion_uid": dispersion_uid,
    }
    if bpm_refpts is not None:
        md["bpm_refpts"] = np.asarray(bpm_refpts).astype(int).tolist()
    if corrector_refpts is not None:
        md["corrector_refpts"] = np.asarray(corrector_refpts).astype(int).tolist()
    if profile is not None:
        md["loco_profile"] = profile
    return md


def _result_profile(result: LocoResult, source: Any) -> Profile:
    """The profile of a result: ``source`` if given, else the one it names (by name, then by the file it came from)."""
    if source is not None:
        return resolve_profile(source)
    err = None
    for ref in (result.profile, result.options.get("profile_path")):
        if ref:
            try:
                return resolve_profile(str(ref))
            except Exception as e:  # noqa: BLE001 - try the next reference
                err = e
    raise ValueError(f"cannot find the profile of this LOCO result ({result.profile!r}): pass it, e.g. "
                     f"result.fitted_lattice(load_profile(...))") from err


def _write_dk(ring, refpts, kinds, k0, dk) -> None:
    el = _Elements(refpts=np.asarray(refpts, dtype=np.int64), kinds=list(kinds), names=[""] * len(kinds),
                   families=[None] * len(kinds), k0=np.asarray(k0, dtype=float), thick=np.ones(len(kinds), bool),
                   s=np.zeros(len(kinds)), param=np.arange(len(kinds)), coeff=np.ones(len(kinds)),
                   group_names=[], group_kinds=[], group_units=[])
    _apply_elements(ring, el, np.asarray(dk, dtype=float))


# ======================================================================================================
# the fit
def _resolve_layout(profile: Profile, orm: OrbitResponse):
    """BPM and corrector lattice indices of the ORM's rows and columns."""
    if orm.bpm_refpts is not None:
        bpms = np.asarray(orm.bpm_refpts, dtype=np.int64)
    else:
        pos = {b: i for i, b in enumerate(profile.bpm_names)}
        missing = [b for b in orm.bpm_names if b not in pos]
        if missing:
            raise KeyError(f"BPMs {missing[:5]} of the ORM are not in profile {profile.name!r}; the ORM carries no "
                           "bpm_refpts either: measure it with this profile")
        bpms = np.asarray([int(profile.bpm_refpts[pos[b]]) for b in orm.bpm_names], dtype=np.int64)
    if orm.corrector_refpts is not None:
        cors = np.asarray(orm.corrector_refpts, dtype=np.int64)
    else:
        table = corrector_table(profile, orm.corrector_names, include_bad=True)
        cors = np.asarray([int(profile.families[f].refpts[i]) for (_, f, i, _) in table], dtype=np.int64)
    return bpms, cors


def _kick_fields(profile: Profile, cors: np.ndarray) -> None:
    for fname, fam in profile.families_of_type("hcor", "vcor").items():
        attr, _ = fam.spec.field_parts
        if attr != "KickAngle" and np.any(np.isin(cors, fam.refpts)):
            raise ValueError(f"corrector family {fname} drives {fam.spec.field!r}: the LOCO model needs correctors "
                             "whose physics unit is a kick angle (KickAngle[0]/KickAngle[1])")


def _orm_sigma(orm: OrbitResponse, bpm_noise, orm_sigma) -> tuple[np.ndarray, bool]:
    shape = orm.matrix.shape
    if orm_sigma is not None:
        s = np.broadcast_to(np.asarray(orm_sigma, dtype=float), shape).copy()
        return s, True
    if bpm_noise is None:
        scale = rms(orm.matrix)
        return np.full(shape, 1e-3 * (scale if np.isfinite(scale) and scale > 0 else 1.0)), False
    nb = _per_reading(bpm_noise, orm.nbpm)
    if orm.delta_physics is None:
        raise ValueError("bpm_noise needs the ORM's kick steps (delta_physics [rad]); this ORM has none: give "
                         "orm_sigma [m/rad] instead")
    d = np.broadcast_to(np.asarray(orm.delta_physics, dtype=float), (orm.ncor,))
    # a bipolar column is (x+ - x-) / (2 delta): sigma = noise * sqrt(2) / (2 delta)
    return np.outer(nb, 1.0 / (np.sqrt(2.0) * np.abs(d))), True


def _per_reading(bpm_noise, n: int) -> np.ndarray:
    nb = np.asarray(bpm_noise, dtype=float).reshape(-1)
    if nb.size == 1:
        return np.full(2 * n, float(nb[0]))
    if nb.size == n:
        return np.concatenate([nb, nb])
    if nb.size == 2 * n:
        return nb
    raise ValueError(f"bpm_noise must be a scalar, or {n} or {2 * n} values (one per BPM / per reading), got {nb.size}")


def _disp_data(disp: Dispersion | None, orm: OrbitResponse, bpm_noise, disp_sigma, use_rf: bool, ring, profile):
    """Measured dispersion on the ORM's BPMs (2n,) [m] and its sigma, or (None, None)."""
    n = orm.nbpm
    if disp is None:
        if not (use_rf and orm.rf is not None):
            return None, None
        import at

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mcf = float(at.get_mcf(ring))
        f0 = rf_frequency_of(ring, profile)
        eta = -np.asarray(orm.rf, dtype=float) * f0 * mcf  # the RF column is -eta / (f alpha_c)
        dps = None if not orm.df else np.array([1.0, -1.0]) * abs(orm.df / (f0 * mcf))
    else:
        pos = {b: i for i, b in enumerate(disp.bpm_names)}
        idx = np.array([pos.get(b, -1) for b in orm.bpm_names])
        ex = np.where(idx >= 0, disp.eta_x[np.maximum(idx, 0)], np.nan)
        ey = np.where(idx >= 0, disp.eta_y[np.maximum(idx, 0)], np.nan)
        eta = np.concatenate([ex, ey])
        dps = None if disp.dp is None else np.asarray(disp.dp, dtype=float).reshape(-1)
    if disp_sigma is not None:
        sig = np.broadcast_to(np.asarray(disp_sigma, dtype=float), (2 * n,)).copy()
    elif bpm_noise is not None and dps is not None and dps.size > 1:
        # straight-line fit of the orbits against dp: sigma of the slope
        sig = _per_reading(bpm_noise, n) / np.sqrt(np.sum((dps - dps.mean()) ** 2))
    else:
        scale = rms(eta)
        sig = np.full(2 * n, 1e-3 * (scale if np.isfinite(scale) and scale > 0 else 1.0))
    return eta, sig


def _robust_scale(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) or float(np.sqrt(np.mean(x * x)))


def loco_parameters(result: LocoResult) -> list[dict[str, Any]]:
    """The fitted parameters as records ``{name, kind, value, sigma, units}`` (for tables and reports)."""
    return [{"name": n, "kind": k, "value": float(v), "sigma": float(s), "units": u}
            for n, k, v, s, u in zip(result.names, result.kinds, result.values, result.sigmas, result.units)]


def fit_loco(source: Any, orm: OrbitResponse, dispersion: Dispersion | None = None, *,
             fit: Sequence[str] = _DEFAULT_FIT, quads: Any = None, skews: Any = None, group: Any = "element",
             setpoints: Mapping[str, npt.ArrayLike] | None = None, lattice=None,
             bpm_noise: float | npt.ArrayLike | None = None, orm_sigma: npt.ArrayLike | None = None,
             dispersion_sigma: float | npt.ArrayLike | None = None, use_rf_column: bool = True,
             gain_reference: str = "both", rcond: float | None = None, n_sv: int | None = None,
             gradient_prior: float | None = None, damping: float = 0.0,
             max_iter: int = 12, tol: float = 1e-3, outlier_sigma: float | None = 8.0,
             outlier_factor: float = 5.0, gain_range: tuple[float, float] = (0.5, 2.0),
             exclude_bpms: Sequence[str | int] = (), exclude_correctors: Sequence[str | int] = (),
             n_slices: int = 3, verbose: bool = False,
             on_layout: Callable[[dict[str, Any]], Any] | None = None) -> LocoResult:
    """Fit the optics model to a measured orbit response matrix (and dispersion).

    Args:
        source: a Profile, profile name, Twin or Machine (the lattice, families, calibrations).
        orm: the measured :class:`OrbitResponse` (``matrix`` [m/rad], both planes, coupling blocks included).
        dispersion: a measured :class:`Dispersion` (optional); without it the ORM's RF column is used when present
            and ``use_rf_column``.
        fit: what to fit, among :data:`FIT_CHOICES` (default: quadrupole gradients, BPM gains, corrector gains).
        quads: the magnets whose normal gradients are fitted: family names, device names or lattice indices
            (default: every magnet of every ``quadrupole`` family).
        skews: the magnets whose skew gradients are fitted (default: the ``skew`` families) with ``"skew"``.
        group: ``"element"`` (one gradient per magnet, ``dK`` [m^-2]), ``"family"`` (one relative change ``dK/K``
            per family: magnets on one power supply), or ``{group: [family/device names]}``.
        setpoints: ``{family: hardware setpoints}`` of the machine during the measurement: the start model is the
            design with these applied (default: the design lattice). ``lattice``: an explicit start lattice.
        bpm_noise: rms noise of one orbit reading [m] (scalar, per BPM, or per reading): weights of a bipolar ORM
            ``sigma = noise / (sqrt(2) delta)``. Without it the weights are uniform and the uncertainties scaled by
            the residual. ``orm_sigma``: the (2n, m) sigma [m/rad] directly. ``dispersion_sigma`` [m].
        gain_reference: how the BPM/corrector gain degeneracy is fixed (``"both"``, ``"bpm"``, ``"corrector"``).
        rcond: singular values of the normalised weighted Jacobian below ``rcond`` x the largest are cut
            (default 1e-3, or none cut with a ``gradient_prior``); ``n_sv``: keep this many instead.
        gradient_prior: expected rms of the relative gradient errors ``dK/K`` [1] (the magnets' field tolerance,
            e.g. 5e-4): a Gaussian prior on every normal-gradient parameter (Tikhonov term ``sum (dK / (prior
            K0))^2`` added to the chi-square; ``prior`` itself for a relative group parameter). With the BPM noise
            known this is the minimum-mean-square-error estimate: combinations the data determine better than the
            prior are fitted freely, the others are pulled to zero smoothly instead of being cut; the sigmas are
            the posterior ones. ``None``: no prior (an SVD cut only).
        damping: initial Levenberg-Marquardt damping (0: Gauss-Newton; raised automatically when a step fails).
        max_iter: maximum iterations; ``tol``: stop when the chi-square improves by less than this fraction.
        outlier_sigma: ORM elements whose residual exceeds this many robust sigmas are excluded (None: never).
        outlier_factor: a corrector column or BPM row whose rms normalised residual exceeds this many times the
            median is excluded.
        gain_range: a row or column whose least-squares gain against the start model is outside this range (a dead
            or stuck corrector, a BPM reading nothing or with a wrong sign) is excluded before the fit.
        exclude_bpms, exclude_correctors: names or indices excluded by request.
        n_slices: Gauss-Legendre points per thick magnet for the Jacobian.
        verbose: print one line per iteration.
        on_layout: called once, before the first Jacobian, with what is known then (the start-document keys of
            :meth:`LocoResult.start_metadata`: the parameters' names, kinds and units, the fitted magnets, the start
            model, the options); the ``loco`` plan opens its run there, so that the run's start is written while the
            fit iterates. Not called when the fit fails before (bad input, everything excluded).

    Returns:
        :class:`LocoResult`.
    """
    t_start = time.perf_counter()
    profile = resolve_profile(source)
    fit_set = set(fit)
    unknown = fit_set - set(FIT_CHOICES)
    if unknown:
        raise ValueError(f"unknown fit choice(s) {sorted(unknown)}; choose among {FIT_CHOICES}")
    if not isinstance(orm, OrbitResponse):
        raise TypeError(f"orm must be an OrbitResponse (OrbitResponse.from_run(run)), got {type(orm).__name__}")
    if lattice is not None:
        ring = lattice.deepcopy()
        if getattr(ring, "is_6d", False):
            ring = ring.disable_6d(copy=True)
        start_sp = None if setpoints is None else {k: np.asarray(v, dtype=float).reshape(-1).tolist()
                                                   for k, v in setpoints.items()}
    else:
        ring = model_lattice(profile, setpoints)
        start_sp = None if setpoints is None else {
            k: np.broadcast_to(np.asarray(v, dtype=float), (len(profile.families[k]),)).tolist()
            for k, v in setpoints.items() if profile.families[k].spec.type in MODEL_FAMILY_TYPES}
    bpms, cors = _resolve_layout(profile, orm)
    _kick_fields(profile, cors)
    planes = np.array([0 if p == "x" else 1 for p in orm.planes])
    planes_sign = np.where(planes == 0, 1.0, -1.0)
    n, m = orm.nbpm, orm.ncor
    el = _build_elements(profile, ring, fit_set, quads, skews, group)
    params_el = [(int(r), k) for r, k in zip(el.refpts, el.kinds)]

    # ---- data, weights, exclusions
    meas = np.asarray(orm.matrix, dtype=float)
    sig, noise_known = _orm_sigma(orm, bpm_noise, orm_sigma)
    with_disp = dispersion is not None or (use_rf_column and orm.rf is not None)
    fit_rf = with_disp and "rf" not in fit_set
    if fit_rf:
        fit_set.add("rf")
    excluded_b: dict[str, str] = {}
    excluded_c: dict[str, str] = {}
    row_ok = np.ones(2 * n, dtype=bool)
    col_ok = np.ones(m, dtype=bool)
    for bname in exclude_bpms:
        i = orm.bpm_index(bname)
        row_ok[[i, n + i]] = False
        excluded_b[orm.bpm_names[i]] = "excluded by request"
    for cname in exclude_correctors:
        j = orm.corrector_index(cname)
        col_ok[j] = False
        excluded_c[orm.corrector_names[j]] = "excluded by request"
    finite = np.isfinite(meas) & np.isfinite(sig) & (sig > 0)
    dead_rows = ~np.any(finite, axis=1)
    for i in np.flatnonzero(dead_rows):
        row_ok[i] = False
        excluded_b.setdefault(orm.bpm_names[i % n], "no finite reading (dead BPM)")
    dead_cols = ~np.any(finite, axis=0)
    for j in np.flatnonzero(dead_cols):
        col_ok[j] = False
        excluded_c.setdefault(orm.corrector_names[j], "no finite reading")

    t0 = time.perf_counter()
    mod0 = linear_response(ring, bpms, cors, orm.planes, jacobian=False)
    # pre-screen: least-squares gain of every row and column against the start model
    own = np.zeros_like(meas, dtype=bool)
    own[:n] = planes[None, :] == 0
    own[n:] = planes[None, :] == 1
    mm = np.where(finite & own, meas, 0.0)
    rr = np.where(finite & own, mod0.orm, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_row = np.sum(mm * rr, axis=1) / np.sum(rr * rr, axis=1)
        g_col = np.sum(mm * rr, axis=0) / np.sum(rr * rr, axis=0)
    lo, hi = gain_range
    for i in np.flatnonzero(row_ok & ~((g_row >= lo) & (g_row <= hi))):
        row_ok[i] = False
        excluded_b.setdefault(orm.bpm_names[i % n],
                              f"{'xy'[i // n]} reading {g_row[i]:.3g} x the model (outside {lo:g}..{hi:g})")
    for j in np.flatnonzero(col_ok & ~((g_col >= lo) & (g_col <= hi))):
        col_ok[j] = False
        excluded_c[orm.corrector_names[j]] = f"response {g_col[j]:.3g} x the model (stuck or dead corrector?)"
    if not row_ok[:n].any() and not row_ok[n:].any():
        raise ValueError("every BPM is excluded: nothing to fit (are the ORM and the profile of the same machine?)")
    if not col_ok.any():
        raise ValueError("every corrector is excluded: nothing to fit")

    disp_meas, disp_sig = (None, None)
    if with_disp:
        disp_meas, disp_sig = _disp_data(dispersion, orm, bpm_noise, dispersion_sigma, use_rf_column, ring, profile)
    base_mask = finite & row_ok[:, None] & col_ok[None, :]  # pre-screened data
    elem_mask = base_mask.copy()  # data used (outliers out)
    w0 = np.where(finite, 1.0 / np.where(sig > 0, sig, 1.0), 0.0)
    meas_f = np.where(finite, meas, 0.0)
    w_orm = np.where(elem_mask, w0, 0.0)
    meas0 = np.where(elem_mask, meas_f, 0.0)
    n_outlier_passes = 0
    if disp_meas is not None:
        dmask = np.isfinite(disp_meas) & np.isfinite(disp_sig) & (disp_sig > 0) & row_ok
        w_disp = np.where(dmask, 1.0 / np.where(disp_sig > 0, disp_sig, 1.0), 0.0)
        disp0 = np.where(dmask, disp_meas, 0.0)
    else:
        w_disp = disp0 = None

    par = _build_params(el, fit_set, orm.bpm_names, orm.corrector_names, row_ok, col_ok, disp_meas is not None)
    if par.size == 0:
        raise ValueError("nothing to fit: choose at least one of " + ", ".join(FIT_CHOICES))
    h_con = _gain_constraints(par, planes, gain_reference)
    # Gaussian prior on the normal gradients: 1 / sigma^2 per gradient parameter (0: none)
    prior_w = np.zeros(par.n_grad)
    if gradient_prior is not None:
        if not (np.isfinite(gradient_prior) and gradient_prior > 0):
            raise ValueError(f"gradient_prior is an rms relative gradient error (> 0), got {gradient_prior!r}")
        if not noise_known:
            raise ValueError("gradient_prior is weighed against the measurement noise: give bpm_noise (the noise of "
                             "what each step recorded, one acquisition's / sqrt(n_avg)) or orm_sigma")
        for ie in range(len(el.refpts)):
            g = int(el.param[ie])
            if el.group_kinds[g] != "quad":
                continue
            sig_g = gradient_prior if el.group_units[g] == "1" else gradient_prior * abs(float(el.k0[ie]))
            if sig_g > 0:
                prior_w[g] = 1.0 / sig_g**2
    if rcond is None:
        rcond = 0.0 if gradient_prior is not None else 1e-3
    other = "corrector_rolls" in fit_set
    start_kind = "custom" if lattice is not None else ("setpoints" if setpoints is not None else "design")
    options = {"fit": sorted(fit_set), "group": group if isinstance(group, str) else "custom",
               "gain_reference": gain_reference, "rcond": rcond, "n_sv": n_sv, "gradient_prior": gradient_prior,
               "max_iter": max_iter, "tol": tol,
               "outlier_sigma": outlier_sigma, "outlier_factor": outlier_factor, "n_slices": n_slices,
               "bpm_noise": None if bpm_noise is None else np.asarray(bpm_noise, dtype=float).reshape(-1)[:1].tolist(),
               "profile_path": str(profile.path), "start_lattice": start_kind}
    if on_layout is not None:
        on_layout(_layout_metadata(
            names=par.names, kinds=par.kinds, units=par.units, bpm_names=orm.bpm_names,
            corrector_names=orm.corrector_names, corrector_planes=orm.planes, element_refpts=el.refpts,
            element_kinds=el.kinds, element_names=el.names, element_s=el.s, element_k0=el.k0, element_param=el.param,
            element_coeff=el.coeff, setpoints=start_sp, options=options, orm_uid=orm.uid,
            dispersion_uid=None if dispersion is None else dispersion.uid, bpm_refpts=bpms, corrector_refpts=cors,
            profile=profile.name))

    # per-parameter sum of element derivatives (groups), done on the model's element axis
    g_of_el = el.param
    coeff = el.coeff

    grouped = par.n_grad != len(el.refpts) or bool(np.any(coeff != 1.0))
    buffer = np.empty((len(el.refpts), 2 * n, m)) if (len(el.refpts) and not grouped) else None

    work = ring.deepcopy()  # strengths are rewritten in place at every evaluation

    def evaluate(p: np.ndarray, jac: bool):
        _apply_elements(work, el, p[: par.n_grad])
        mod = linear_response(work, bpms, cors, orm.planes, params_el if jac else (), jacobian=jac,
                              other_plane=other, n_slices=n_slices, buffer=buffer)
        if jac and par.n_grad:
            if grouped:
                d = np.zeros((par.n_grad,) + mod.d_orm.shape[1:])
                de = np.zeros((par.n_grad, mod.d_eta.shape[1]))
                for ie in range(len(el.refpts)):
                    d[g_of_el[ie]] += coeff[ie] * mod.d_orm[ie]
                    de[g_of_el[ie]] += coeff[ie] * mod.d_eta[ie]
                mod.d_orm, mod.d_eta = d, de
        pred = _predict(p, par, mod, planes_sign, disp_meas is not None)
        r = (meas0 - pred.orm) * w_orm
        c2 = float(np.sum(r * r))
        rd = None
        if disp_meas is not None:
            rd = (disp0 - pred.disp) * w_disp
            c2 += float(np.sum(rd * rd))
        c2 += float(np.sum(prior_w * p[: par.n_grad] ** 2))
        return mod, pred, r, rd, c2

    timing = {"setup": time.perf_counter() - t_start}
    p = np.zeros(par.size)
    t0 = time.perf_counter()
    mod, pred, r, rd, chi2 = evaluate(p, True)
    timing["model_and_jacobian"] = time.perf_counter() - t0
    history = [chi2]
    lam = float(damping)
    n_fail = 0
    sv_all = np.zeros(0)
    kept = 0
    t_solve = 0.0
    t_model = 0.0

    def normal_eq(p, mod, pred, r, rd):
        jq, jd = _gradient_block(p, par, mod, w_orm, w_disp, pred) if par.n_grad else (None, None)
        kinds = _calibration_kinds(p, par, mod, pred, planes_sign, w_orm, w_disp)
        blocks = _normal_equations(jq, jd, kinds, r, rd, par.n_grad, par.size)
        if gradient_prior is not None:  # the prior's terms: A + W, g_q - W p
            blocks[0][np.diag_indices(par.n_grad)] += prior_w
            blocks[3][:] -= prior_w * p[: par.n_grad]
        mod.d_orm = mod.d_eta = None  # weighted in place: never reused
        return blocks

    def solve(blocks, lam, want_var=False, basis=None):
        return _solve(blocks, h_con, par.n_grad, lam, rcond, n_sv, want_var, basis)

    converged = False
    t1 = time.perf_counter()
    blocks = normal_eq(p, mod, pred, r, rd)
    t_solve += time.perf_counter() - t1
    for it in range(int(max_iter)):
        t1 = time.perf_counter()
        step, _, sv_all, kept = solve(blocks, lam)
        t_solve += time.perf_counter() - t1
        trial = p + step
        t1 = time.perf_counter()
        _, _, r_t, rd_t, chi2_t = evaluate(trial, False)
        t_model += time.perf_counter() - t1
        if not np.isfinite(chi2_t) or chi2_t >= chi2:
            n_fail += 1
            lam = max(lam * 10.0, 1e-3)
            if verbose:
                print(f"loco: step {it + 1} rejected (chi2 {chi2_t:.6g} >= {chi2:.6g}); damping -> {lam:g}")
            if n_fail > 4:
                break
            continue
        improvement = (chi2 - chi2_t) / chi2 if chi2 > 0 else 0.0
        p = trial
        lam = lam / 10.0 if lam > 1e-6 else 0.0
        t1 = time.perf_counter()
        mod, pred, r, rd, chi2 = evaluate(p, True)
        t_model += time.perf_counter() - t1
        history.append(chi2)
        if verbose:
            print(f"loco: iteration {it + 1}: chi2 {chi2:.6g} ({improvement:.2%} better), {kept} singular values")
        # outliers, once the model is near its solution (earlier, the residual is the model's, not the data's):
        # whole corrector columns and BPM rows against the median, then single elements against a robust sigma;
        # the element mask is recomputed from the pre-screened data each time (an element can come back)
        changed = False
        if improvement < 0.1 and n_outlier_passes < 3:
            n_outlier_passes += 1
            z_all = np.where(base_mask, (meas_f - pred.orm) * w0, np.nan)
            new_mask = base_mask.copy()
            if outlier_sigma is not None:
                s_rob = _robust_scale(z_all[base_mask])
                if noise_known:  # never below the stated noise (a systematic residual is not an outlier)
                    s_rob = max(s_rob, 1.0)
                new_mask &= ~(np.abs(np.nan_to_num(z_all)) > outlier_sigma * s_rob)
            z_in = np.where(new_mask, z_all, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                col_rms = np.sqrt(np.nanmean(z_in * z_in, axis=0))
                row_rms = np.sqrt(np.nanmean(z_in * z_in, axis=1))
                med_c, med_r = np.nanmedian(col_rms), np.nanmedian(row_rms)
            if noise_known:
                med_c, med_r = max(med_c, 1.0), max(med_r, 1.0)
            for j in np.flatnonzero(col_ok & (col_rms > outlier_factor * med_c)):
                col_ok[j] = False
                excluded_c[orm.corrector_names[j]] = f"residual {col_rms[j] / med_c:.1f} x the median column"
            for i in np.flatnonzero(row_ok & (row_rms > outlier_factor * med_r)):
                row_ok[i] = False
                excluded_b[orm.bpm_names[i % n]] = (f"{'xy'[i // n]} residual {row_rms[i] / med_r:.1f} x the median "
                                                    "row")
            base_mask &= row_ok[:, None] & col_ok[None, :]
            new_mask &= base_mask
            if not np.array_equal(new_mask, elem_mask):
                changed = True
                elem_mask = new_mask
                w_orm = np.where(elem_mask, w0, 0.0)
                meas0 = np.where(elem_mask, meas_f, 0.0)
                if w_disp is not None:
                    w_disp = np.where(row_ok, w_disp, 0.0)
                r = (meas0 - pred.orm) * w_orm
                chi2 = float(np.sum(r * r))
                if rd is not None:
                    rd = (disp0 - pred.disp) * w_disp
                    chi2 += float(np.sum(rd * rd))
                chi2 += float(np.sum(prior_w * p[: par.n_grad] ** 2))
                history[-1] = chi2
        t1 = time.perf_counter()
        blocks = normal_eq(p, mod, pred, r, rd)
        t_solve += time.perf_counter() - t1
        if improvement < tol and not changed:
            converged = True
            break
    # final covariance at the solution
    t1 = time.perf_counter()
    basis: dict[str, np.ndarray] = {}
    _, var, sv_all, kept = solve(blocks, 0.0, want_var=True, basis=basis)
    t_solve += time.perf_counter() - t1
    nused = int(np.count_nonzero(w_orm)) + (0 if w_disp is None else int(np.count_nonzero(w_disp)))
    dof = max(1, nused - kept)
    chi2_dof = (chi2 - float(np.sum(prior_w * p[: par.n_grad] ** 2))) / dof  # the data's part
    sig_p = np.sqrt(np.clip(var, 0, None))
    if not noise_known:
        sig_p = sig_p * np.sqrt(chi2_dof)
    sig_p[var == 0] = np.nan
    resid = np.where(elem_mask, meas - pred.orm, np.nan)
    resid_d = None if disp_meas is None else np.where(w_disp > 0, disp_meas - pred.disp, np.nan)
    timing.update({"solve": t_solve, "model": t_model, "total": time.perf_counter() - t_start})
    # excluded BPMs: both planes gone
    for i in range(n):
        if not row_ok[i] and not row_ok[n + i]:
            excluded_b.setdefault(orm.bpm_names[i], "excluded")
    options = {**options, "converged": converged}
    return LocoResult(
        names=par.names, kinds=par.kinds, units=par.units, values=p, sigmas=sig_p, chi2=history,
        chi2_dof=chi2_dof, residual=resid, data_mask=elem_mask, bpm_names=list(orm.bpm_names),
        corrector_names=list(orm.corrector_names), corrector_planes=list(orm.planes),
        element_refpts=el.refpts, element_kinds=el.kinds, element_names=el.names, element_s=el.s,
        element_k0=el.k0, element_param=el.param, element_coeff=el.coeff, excluded_bpms=excluded_b,
        excluded_correctors=excluded_c, residual_dispersion=resid_d, setpoints=start_sp, n_sv=kept,
        singular_values=sv_all, profile=profile.name, orm_uid=orm.uid,
        dispersion_uid=None if dispersion is None else dispersion.uid, options=options,
        tunes_model=mod.tunes, bpm_refpts=bpms, corrector_refpts=cors, timing=timing,
        resolution=basis.get("resolution"))


# ======================================================================================================
# optics from lattices, and the correction
def beta_beat(lattice, reference, refpts=None) -> tuple[FloatArray, FloatArray]:
    """``(beta_x / beta_x0 - 1, beta_y / beta_y0 - 1)`` of ``lattice`` against ``reference`` at ``refpts``
    (lattice indices, default every element entrance), from pyAT's ``get_optics`` (4D)."""
    import at

    refs = at.All if refpts is None else refpts
    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = lattice.disable_6d(copy=True) if getattr(lattice, "is_6d", False) else lattice
        b = reference.disable_6d(copy=True) if getattr(reference, "is_6d", False) else reference
        _, _, la = at.get_optics(a, refpts=refs)
        _, _, lb = at.get_optics(b, refpts=refs)
    bx = la.beta[:, 0] / lb.beta[:, 0] - 1.0
    by = la.beta[:, 1] / lb.beta[:, 1] - 1.0
    return bx, by


@dataclass
class OpticsCorrection:
    """Quadrupole setpoint changes that cancel fitted gradient errors.

    Attributes:
        setpoints: ``{family: new hardware setpoints}`` (one per magnet, in service or not).
        current: ``{family: hardware setpoints}`` they were computed from.
        delta_hw: ``{family: change}`` [hardware units, e.g. A].
        delta_k: ``{family: change of the physics strength}`` [m^-2].
        devices: ``{family: device names}``.
        fraction: the fraction of the fitted error cancelled.
        skipped: device -> why it is not moved (out of service, not fitted).
        units: ``{family: hardware units}``.
    """

    setpoints: dict[str, FloatArray]
    current: dict[str, FloatArray]
    delta_hw: dict[str, FloatArray]
    delta_k: dict[str, FloatArray]
    devices: dict[str, list[str]]
    fraction: float
    skipped: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        big = max((float(np.max(np.abs(v))) for v in self.delta_hw.values() if len(v)), default=0.0)
        return (f"OpticsCorrection({len(self.setpoints)} families, largest step {big:.4g}, fraction "
                f"{self.fraction:g}, {len(self.skipped)} devices skipped)")

    def to_results(self) -> dict[str, np.ndarray]:
        """One array per family: ``<family>_before``, ``<family>_after`` [hardware units], ``<family>_dk`` [m^-2]."""
        out: dict[str, np.ndarray] = {}
        for f in self.setpoints:
            out[f"{f}_before"] = np.asarray(self.current[f], dtype=float)
            out[f"{f}_after"] = np.asarray(self.setpoints[f], dtype=float)
            out[f"{f}_dk"] = np.asarray(self.delta_k[f], dtype=float)
        return out


def optics_correction(result: LocoResult, source: Any = None, setpoints: Mapping[str, npt.ArrayLike] | None = None,
                      *, reference: Mapping[str, npt.ArrayLike] | None = None, families: Sequence[str] | None = None,
                      fraction: float = 1.0, check_limits: bool = True) -> OpticsCorrection:
    """Quadrupole setpoints that bring the fitted model to the reference optics (MML LOCO's "set model").

    The fitted model is the machine: ``K_true = K_nominal(I) + dK``, ``dK`` the fitted error of each magnet
    (its calibration and field error: it stays when the current changes). The true strength equals the
    reference ``K_ref`` (the design) when ``K_nominal(I_new) = K_ref - dK``; ``fraction`` goes that far from the
    present setpoints: ``K_nominal(I_new) = K_nominal(I) + fraction (K_ref - dK - K_nominal(I))``. Measured at the
    design setpoints this is ``K_nominal(I) - fraction dK``; measured after an earlier correction it does not
    apply that correction twice. Strengths go to hardware units through the profile's calibrations.

    Args:
        result: the LOCO fit.
        source: the profile (default: the one named in the result).
        setpoints: ``{family: current hardware setpoints}`` to correct from (default: the setpoints of the fit's
            start model, i.e. the machine at the measurement; the design when the fit started from the design).
        reference: ``{family: hardware setpoints}`` of the optics to restore (default: the design lattice's).
        families: restrict to these quadrupole families (default: every family with a fitted magnet).
        fraction: 0..1 of the way to the reference (1: all of it).
        check_limits: refuse (``LimitError`` naming the magnet) a new setpoint outside the profile's limits.

    Returns:
        :class:`OpticsCorrection`; nothing is moved.
    """
    prof = _result_profile(result, source)
    if not np.isfinite(fraction):
        raise ValueError(f"fraction must be a finite number, got {fraction!r}")
    dk = result.dk
    lookups = {k: _device_lookup(prof, k) for k in _KIND_FIELDS}
    per_family: dict[str, dict[int, float]] = {}
    skipped: dict[str, str] = {}
    for r, kind, name, d in zip(result.element_refpts.tolist(), result.element_kinds, result.element_names,
                                dk.tolist()):
        dev = lookups[kind].get(int(r))
        if dev is None:
            skipped[name] = (f"no family of the profile drives its {'skew' if kind == 'skew' else 'normal'} "
                             "gradient")
            continue
        _, fam, i = dev
        per_family.setdefault(fam, {})[i] = d
    if families is not None:
        unknown = [f for f in families if f not in prof.families]
        if unknown:
            raise KeyError(f"unknown families {unknown}; fitted families: {sorted(per_family)}")
        for f in list(per_family):
            if f not in families:
                for i in per_family.pop(f):
                    skipped[prof.families[f].device_names[i]] = "family not selected"
    start = result.setpoints or {}
    out_sp, cur_sp, d_hw, d_k, devs, units = {}, {}, {}, {}, {}, {}
    e = prof.energy
    ring0 = prof.load_lattice()
    from .tune import family_strengths

    for fam, changes in per_family.items():
        f = prof.families[fam]
        spec = f.spec
        if setpoints is not None and fam in setpoints:
            hw = np.broadcast_to(np.asarray(setpoints[fam], dtype=float), (len(f),)).copy()
        elif fam in start:
            hw = np.asarray(start[fam], dtype=float).copy()
        else:
            hw = np.asarray(spec.calibration.physics2hw(family_strengths(ring0, prof, fam), e, e),
                            dtype=float).reshape(-1)
        k_now = np.asarray(spec.calibration.hw2physics(hw, e, e), dtype=float).reshape(-1)
        if reference is not None and fam in reference:
            k_ref = np.asarray(spec.calibration.hw2physics(
                np.broadcast_to(np.asarray(reference[fam], dtype=float), (len(f),)), e, e), dtype=float).reshape(-1)
        else:
            k_ref = family_strengths(ring0, prof, fam)
        dkv = np.zeros(len(f))
        for i, d in changes.items():
            if i in f.bad:
                skipped[f.device_names[i]] = "out of service"
                continue
            dkv[i] = fraction * (k_ref[i] - d - k_now[i])
        k_new = k_now + dkv
        hw_new = np.asarray(spec.calibration.physics2hw(k_new, e, e), dtype=float).reshape(-1)
        hw_new = np.where(dkv == 0, hw, hw_new)
        if check_limits:
            spec.limits.check(fam, hw_new, spec.units, names=f.device_names)
        out_sp[fam] = hw_new
        cur_sp[fam] = hw
        d_hw[fam] = hw_new - hw
        d_k[fam] = dkv
        devs[fam] = list(f.device_names)
        units[fam] = spec.units
    return OpticsCorrection(setpoints=out_sp, current=cur_sp, delta_hw=d_hw, delta_k=d_k, devices=devs,
                            fraction=float(fraction), skipped=skipped, units=units)


def corrected_lattice(result: LocoResult, correction: OpticsCorrection, source: Any = None):
    """The fitted model after applying ``correction``: what the machine should become (its beta-beat against the
    design is what ``correct_optics`` records as "after")."""
    prof = _result_profile(result, source)
    ring = result.fitted_lattice(prof)
    from .tune import set_family_strengths

    e = prof.energy
    fitted = {int(r): d for r, d in zip(result.element_refpts.tolist(), result.dk.tolist())}
    for fam, hw in correction.setpoints.items():
        spec = prof.families[fam].spec
        k_nom = np.asarray(spec.calibration.hw2physics(hw, e, e), dtype=float).reshape(-1)
        refs = prof.families[fam].refpts.tolist()
        k = np.array([k_nom[i] + fitted.get(int(r), 0.0) for i, r in enumerate(refs)])
        set_family_strengths(ring, prof, fam, k)
    return ring
