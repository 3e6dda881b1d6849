"""Read a lattice file of any kind pyAT knows through one function, with errors that say what to do.

Formats (by extension, or ``format=``): ``.mat`` (MATLAB AT), ``.m`` (AT m-file), ``.json`` (pyAT JSON), ``.repr``,
``.seq``/``.madx``/``.mad`` (MAD-X), ``.mad8``, ``.lte`` (elegant), ``.lat`` (Tracy). An error names the file, the
format and what is missing (an undefined keyword, a sequence, the energy) and what to pass instead.

pyAT's Tracy reader needs keywords it does not document: a ``harmonic_number`` argument, and ``t``, ``t1``, ``t2``
on every bending magnet (``k`` on every quadrupole). :func:`read_lattice` reads the harmonic number from the file's
cavity (``harnum``) or from the revolution frequency, and fills the missing bend keywords with their Tracy defaults
(0), on a temporary copy of the file.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "LatticeFileError", "lattice_format", "read_lattice"]

FORMATS = {
    ".mat": "MATLAB AT (.mat)",
    ".m": "AT m-file (.m)",
    ".json": "pyAT JSON (.json)",
    ".repr": "pyAT repr (.repr)",
    ".seq": "MAD-X",
    ".madx": "MAD-X",
    ".mad": "MAD-X",
    ".mad8": "MAD8",
    ".lte": "elegant (.lte)",
    ".lat": "Tracy (.lat)",
}
_KINDS = {"mat": ".mat", "m": ".m", "json": ".json", "repr": ".repr", "madx": ".seq", "mad8": ".mad8",
          "elegant": ".lte", "tracy": ".lat"}


class LatticeFileError(ValueError):
    """A lattice file that cannot be read: the message names the file, the format and what is missing."""


def lattice_format(path: str | Path, format: str | None = None) -> str:  # noqa: A002 - the user's word
    """The extension key of ``path`` (``.mat``, ``.seq``, ...), from ``format`` (``madx``, ``tracy``...) if given."""
    if format is not None:
        f = format.lower().lstrip(".")
        if f in _KINDS:
            return _KINDS[f]
        if "." + f in FORMATS:
            return "." + f
        raise LatticeFileError(f"{path}: unknown lattice format {format!r}; known: {sorted(_KINDS)}")
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise LatticeFileError(
            f"{path}: unknown lattice file extension {ext or '(none)'!r}; pyAT reads "
            f"{', '.join(sorted(FORMATS))} (pass format= one of {sorted(_KINDS)} for another name)")
    return ext


def read_lattice(path: str | Path, *, format: str | None = None, energy: float | None = None,  # noqa: A002
                 use: str | None = None, strict: bool = True, harmonic_number: int | None = None, **kwargs: Any):
    """Read a pyAT :class:`at.Lattice` from ``path``.

    Args:
        path: the lattice file.
        format: override the extension (``mat``, ``m``, ``json``, ``repr``, ``madx``, ``mad8``, ``elegant``,
            ``tracy``).
        energy: beam energy [eV] (required when the file has none: MAD-X without ``BEAM``, AT-1.3 scripts).
        use: the variable (``.mat``), sequence (MAD-X, default ``ring``) or line (elegant ``RING``, Tracy ``cell``).
        strict: MAD-X: ``False`` sets undefined variables to 0 (as MAD-X does) instead of failing.
        harmonic_number: Tracy: the RF harmonic number (default: the cavity's ``harnum``, else from the frequency).
        kwargs: passed to pyAT's reader (Lattice attributes).

    Raises:
        LatticeFileError: naming the file, the format and what is missing.
    """
    import at

    p = Path(path)
    ext = lattice_format(p, format)
    fmt = FORMATS[ext]
    if not p.exists():
        raise LatticeFileError(f"{p}: lattice file ({fmt}) does not exist")
    kw = dict(kwargs)
    if energy is not None:
        kw["energy"] = float(energy)
    if use is None and ext in (".seq", ".madx", ".mad", ".mad8", ".lte"):
        seqs = _madx_sequences(p)  # the file's only sequence/line when it has no 'ring'/'RING'
        default = "RING" if ext == ".lte" else "ring"
        if len(seqs) == 1 and seqs[0].lower() != default.lower():
            use = seqs[0]
    printed = io.StringIO()  # pyAT's MAD-X reader prints the chain of causes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            if ext in (".seq", ".madx", ".mad"):
                ring = at.load_madx(str(p), use=use or "ring", strict=strict, **kw)
            elif ext == ".mad8":
                ring = at.load_mad8(str(p), use=use or "ring", strict=strict, **kw)
            elif ext == ".lte":
                ring = at.load_elegant(str(p), use=use or "RING", **kw)
            elif ext == ".lat":
                ring = _read_tracy(p, use=use, energy=energy, harmonic_number=harmonic_number, **kwargs)
            else:
                if use:
                    kw["use"] = use
                loader = {".mat": at.load_mat, ".m": at.load_m, ".json": at.load_json, ".repr": at.load_repr}[ext]
                ring = loader(str(p), **kw)
    except LatticeFileError:
        raise
    except Exception as err:  # pyAT readers raise anything (AtError, KeyError, NameError...)
        raise LatticeFileError(_explain(p, ext, fmt, err, use, printed.getvalue())) from err
    if len(ring) == 0:
        raise LatticeFileError(f"{p}: the {fmt} file holds an empty lattice (use={use!r})")
    if not getattr(ring, "energy", 0):
        raise LatticeFileError(f"{p}: the {fmt} file does not give the beam energy: pass energy=... [eV] "
                               "(profile key 'energy', or `profile new --energy`)")
    return ring


def _explain(p: Path, ext: str, fmt: str, err: BaseException, use: str | None, printed: str = "") -> str:
    """A message for a pyAT reader's exception: file, format, what is missing and what to do."""
    cause = err
    while cause.__cause__ is not None and isinstance(cause, ValueError) and "Failed to load" in str(cause):
        cause = cause.__cause__
    msg = str(cause.args[0]) if cause.args else type(cause).__name__
    notes = " ".join(str(n) for n in getattr(cause, "__notes__", ()))
    undefined = re.findall(r"'([^']+)' is not defined", f"{msg} {notes} {printed}")
    head = f"{p}: cannot read this {fmt} file"
    if isinstance(cause, NameError) or undefined:
        name = re.search(r"'([^']+)'", msg)
        what = undefined[-1] if undefined else (name.group(1) if name else msg)
        if ext in (".seq", ".madx", ".mad", ".mad8"):
            seqs = _madx_sequences(p)
            if isinstance(cause, KeyError) or (seqs and what.lower() == (use or "ring").lower()):
                return (f"{head}: no sequence or line named {what!r}; the file defines {seqs or 'none'}: "
                        "pass use=NAME (profile key 'lattice.name', `profile new --use NAME`)")
            return (f"{head}: keyword/variable {what!r} is not defined ({msg}); pass strict=False to set undefined "
                    "variables to 0 as MAD-X does (profile key 'lattice.options: {strict: false}', "
                    "`profile new --no-strict`)")
        return f"{head}: {what!r} is not defined ({msg})"
    if isinstance(cause, KeyError):
        key = msg
        if ext in (".seq", ".madx", ".mad", ".mad8"):
            return (f"{head}: no sequence or line named {key!r}; the file defines {_madx_sequences(p) or 'none'}: "
                    "pass use=NAME (profile key 'lattice.name', `profile new --use NAME`)")
        if ext == ".lat":
            return (f"{head}: missing keyword {key!r} (pyAT's Tracy reader needs it; e.g. 'energy' in GeV, "
                    "'t1'/'t2' on bends, 'k' on quadrupoles, 'voltage'/'frequency' on cavities)")
        if ext == ".lte":
            return f"{head}: missing keyword or line {key!r} (use={use or 'RING'!r}; pass use=NAME for another line)"
        return f"{head}: missing keyword {key!r}"
    if "energy" in msg.lower() and "not defined" in msg.lower() or "Energy" in msg and "defined" in msg:
        extra = " (an MML/AT-1.3 script? it needs the energy and AT-2 constructors)" if ext == ".m" else ""
        return f"{head}: the beam energy is not defined{extra}: pass energy=... [eV] ({msg})"
    if "not allowed in this context" in msg:
        return (f"{head}: an element pyAT does not know ({msg}); replace or remove it in the file "
                "(e.g. rcollimator -> drift)")
    return f"{head}: {type(cause).__name__}: {msg}"


def _madx_sequences(p: Path) -> list[str]:
    try:
        text = p.read_text(errors="replace")
    except OSError:
        return []
    names = re.findall(r"(?im)^\s*([A-Za-z_][\w.]*)\s*:\s*(?:sequence|line)\s*(?:[,;=(]|$)", text)
    return list(dict.fromkeys(names))


# -- Tracy ------------------------------------------------------------------------------------------------
_TRACY_DEFAULTS = {"bending": ("t", "t1", "t2"), "quadrupole": ("k",)}


def _tracy_statements(text: str) -> list[str]:
    """Statements of a Tracy file, comments ``{...}`` removed (as pyAT reads it: lower case)."""
    out, depth = [], 0
    for ch in text.lower():
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).split(";")


def _read_tracy(p: Path, *, use: str | None, energy: float | None, harmonic_number: int | None, **kwargs: Any):
    import at

    stmts = _tracy_statements(p.read_text(errors="replace"))
    compact = [re.sub(r"\s+", "", s) for s in stmts]
    if not compact or compact[0] != "definelattice" or "end" not in compact:
        raise LatticeFileError(f"{p}: not a Tracy lattice (.lat): it must start with 'define lattice;' and end "
                               "with 'end;'")
    fixed: list[str] = []
    harnum = harmonic_number
    has_cavity = False
    has_energy = False
    for s in compact:
        key, sep, value = s.partition(":")
        if not sep:
            if s.startswith("energy="):
                has_energy = True
            fixed.append(s)
            continue
        parts = value.split(",")
        kind = parts[0]
        if kind == "cavity":
            has_cavity = True
            keep = []
            for part in parts[1:]:
                if part.startswith("harnum="):
                    if harnum is None:
                        try:
                            harnum = round(float(part.split("=", 1)[1]))
                        except ValueError:
                            pass
                    continue
                keep.append(part)
            parts = [kind, *keep]
        for kw in _TRACY_DEFAULTS.get(kind, ()):
            if not any(part.startswith(kw + "=") for part in parts[1:]):
                parts.append(f"{kw}=0")
        fixed.append(f"{key}:{','.join(parts)}")
    if not has_energy:
        if energy is None:
            raise LatticeFileError(f"{p}: the Tracy (.lat) file has no 'energy = ...;' (GeV): pass energy=... [eV]")
        fixed.insert(1, f"energy={float(energy) / 1e9!r}")
    end = max(i for i, s in enumerate(fixed) if s == "end")
    text = ";\n".join(fixed[:end + 1]) + ";\n"
    kw = dict(kwargs)
    if energy is not None:
        kw["energy"] = float(energy)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / p.name
        tmp.write_text(text)
        ring = at.load_tracy(str(tmp), use=use or "cell", harmonic_number=harnum or 1, **kw)
    ring.in_file = str(p)
    if has_cavity and harnum is None:  # from the cavity frequency and the revolution frequency
        cavs = ring.get_uint32_index(at.RFCavity)
        if len(cavs):
            f = float(ring[int(cavs[0])].Frequency)
            h = round(f / ring.revolution_frequency)
            for i in cavs:
                ring[int(i)].HarmNumber = h
    return ring
