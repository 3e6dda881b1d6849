"""What the tools will see in a profile: the report of ``acc-bluesky profile new`` and ``profile check``.

:func:`check_profile` counts families, BPMs and correctors per plane, lists what the generator excluded and why,
computes the design tunes and chromaticities (rings) or the exit optics (lines) with pyAT, and takes the closed
orbit at the default errors from the caller (the twin layer computes it: ``twin.errors.check_closed_orbit``).
:attr:`ProfileReport.problems` lists what stops the tools (no corrector in a plane, no closed orbit at the default
errors, unstable design optics); the CLI exits non-zero when there is any.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._compat.scipy import single_thread_blas
from .loader import Profile

__all__ = ["ProfileReport", "check_profile"]


@dataclass
class ProfileReport:
    """The report of one profile. ``problems`` make it unusable; ``warnings`` do not."""

    profile: Profile
    families: list[tuple[str, str, int, str]]  # name, type, devices, field
    bpms: int
    correctors: dict[str, int]  # plane -> count
    excluded: list[Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors_note: str = ""
    orbit: Any = None  # OrbitCheck-like: found, rms_x, rms_y, reason
    orbit_seed: int | None = 1
    tunes: np.ndarray | None = None
    chromaticity: np.ndarray | None = None
    exit_beta: np.ndarray | None = None

    @property
    def usable(self) -> bool:
        return not self.problems

    def text(self) -> str:
        p = self.profile
        out = [f"profile {p.name!r} ({p.path}): {p.kind}, {p.energy / 1e9:g} GeV, lattice {p.lattice_path.name} "
               f"({len(p._design_lattice)} elements)"]
        out.append(f"  BPMs: {self.bpms}  (names {p.bpm_names[0]} ... {p.bpm_names[-1]})")
        out.append(f"  correctors: {self.correctors.get('x', 0)} horizontal, {self.correctors.get('y', 0)} vertical")
        out.append(f"  families ({len(self.families)}):")
        w = max((len(f[0]) for f in self.families), default=4)
        for name, ftype, n, fld in self.families:
            out.append(f"    {name.ljust(w)}  {ftype:10s} {n:5d} x {fld}")
        if self.excluded:
            total = sum(e.count for e in self.excluded)
            out.append(f"  excluded ({total} elements):")
            for e in self.excluded:
                sel = e.select
                what = f"{'/'.join(sel.classes)} {sel.name}" if sel.name else "/".join(sel.classes)
                out.append(f"    {e.count:5d} {what}: {e.reason}")
        if self.tunes is not None:
            q, xi = self.tunes, self.chromaticity
            out.append(f"  design optics: tunes {q[0]:.4f} / {q[1]:.4f}, chromaticity "
                       + ("n/a" if xi is None else f"{xi[0]:.2f} / {xi[1]:.2f}"))
        if self.exit_beta is not None:
            out.append(f"  design optics: beta at the exit {self.exit_beta[0]:.3f} / {self.exit_beta[1]:.3f} m "
                       f"(from twiss_in {p.spec.twiss_in})")
        o = self.orbit
        what = "closed orbit" if p.kind == "ring" else "trajectory through the line"
        if o is not None:
            at_ = f"seed {self.orbit_seed}, errors.scale {p.spec.errors.scale:g}"
            out.append(f"  {what} at the default errors ({at_}): " + (
                f"yes, rms x {o.rms_x * 1e6:.0f} um, y {o.rms_y * 1e6:.0f} um" if o.found else f"NO ({o.reason})"))
        if self.errors_note:
            out.append(f"  errors: {self.errors_note}")
        for n in self.notes:
            out.append(f"  note: {n}")
        for wmsg in self.warnings:
            out.append(f"  WARNING: {wmsg}")
        if self.problems:
            out.append("  NOT USABLE by the tools:")
            out += [f"    - {pr}" for pr in self.problems]
        else:
            out.append("  usable: yes")
        return "\n".join(out)


def check_profile(profile: Profile, orbit: Any = None, orbit_seed: int | None = 1) -> ProfileReport:
    """The report of ``profile`` (already validated by :func:`~.loader.load_profile`).

    Args:
        profile: the profile.
        orbit: the closed orbit (line: trajectory) at the default errors, an object with ``found``, ``rms_x``,
            ``rms_y``, ``reason`` (``twin.errors.check_closed_orbit(profile, seed)``), or ``None`` (not checked).
        orbit_seed: the seed ``orbit`` was computed for (shown in the report).
    """
    import at

    fams = profile.families
    gen = profile.spec.generated
    rep = ProfileReport(
        profile=profile,
        families=[(n, f.spec.type, len(f), f.spec.field) for n, f in fams.items()],
        bpms=len(profile.bpm_refpts),
        correctors={"x": sum(len(f) for f in fams.values() if f.spec.type == "hcor"),
                    "y": sum(len(f) for f in fams.values() if f.spec.type == "vcor")},
        excluded=list(gen.excluded) if gen else [],
        notes=list(gen.notes) if gen else [],
        warnings=(list(gen.warnings) if gen else []) + [w for w in profile.warnings
                                                          if w not in profile.design_outside_limits],
        errors_note=gen.errors if gen else "",
        orbit=orbit, orbit_seed=orbit_seed,
    )
    for plane, word, t in (("x", "horizontal", "hcor"), ("y", "vertical", "vcor")):
        if rep.correctors[plane] == 0:
            rep.problems.append(f"no {word} corrector: orbit tools cannot steer in {plane}; add a family of type {t} "
                                "(e.g. KickAngle windings: `profile new --steer-quadrupoles`, or a Corrector selection)")
    rep.problems.extend(profile.design_outside_limits)
    if not profile.families_of_type("quadrupole"):
        rep.warnings.append("no quadrupole family: the tune tools have nothing to step")
    if profile.kind == "ring" and len(profile.families_of_type("sextupole")) < 2:
        rep.warnings.append("fewer than two sextupole families: chromaticity correction needs two")
    ring = profile.load_lattice()
    with single_thread_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if profile.kind == "ring":
                # the phase accumulates: sampled at every focusing element (< 2 pi apart) and at the end, it
                # gives the integer tunes too
                refs = np.append(ring.get_uint32_index(lambda e: hasattr(e, "PolynomB") or
                                                       getattr(e, "BendingAngle", 0.0) != 0.0), len(ring))
                frac = np.asarray(at.get_tune(ring)[:2], dtype=float)
                try:  # the integer part from the uncoupled phase advance (linopt6 at every element is slow)
                    _, _, ld = at.linopt2(ring, refpts=refs)
                    whole = np.round(ld.mu[-1][:2] / (2 * np.pi) - frac)
                except Exception:  # noqa: BLE001 - strongly coupled: the fractional tunes only
                    whole = np.zeros(2)
                rep.tunes = whole + frac
                rep.chromaticity = np.asarray(at.get_chrom(ring)[:2], dtype=float)
                if not np.all(np.isfinite(rep.tunes)):
                    raise ValueError("non-finite tunes")
            else:
                tw = {k: np.asarray(v, dtype=float) for k, v in (profile.spec.twiss_in or {}).items()
                      if k != "closed_orbit"}
                if not tw:
                    rep.warnings.append("line without twiss_in: no entrance optics, the optics tools cannot run")
                else:
                    _, _, ld = at.linopt6(ring, refpts=len(ring), twiss_in=tw)
                    rep.exit_beta = np.asarray(ld.beta[-1], dtype=float)
        except Exception as err:  # noqa: BLE001 - pyAT: unstable optics
            if profile.kind == "ring":
                rep.problems.append(f"the design lattice has no stable optics ({err}): check the lattice file and "
                                    "the energy")
    if orbit is not None and not orbit.found:
        what = "closed orbit" if profile.kind == "ring" else "trajectory through the line"
        rep.problems.append(f"no {what} at the default errors (seed {orbit_seed}, errors.scale "
                            f"{profile.spec.errors.scale:g}): {orbit.reason}; lower errors.scale in the profile "
                            "(or thread the first turns before the ring tools)")
    return rep
