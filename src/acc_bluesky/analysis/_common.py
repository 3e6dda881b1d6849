"""Helpers shared by the analysis modules: resolving a profile/lattice, reading results back from a run.

Pure Python/numpy: a "run" is anything that looks like a Tiled ``BlueskyRun`` (``run.metadata["start"]`` and
``run["results"]``), or a plain mapping of results, so the same functions serve notebooks and Dask workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._packed import (
    PACK_MAX_SIZE,
    PACKED_KEY,
    pack_arrays,
    packable,
    unpack_arrays,
    unpack_results,
)
from ..profile import Profile, load_profile

__all__ = ["FloatArray", "resolve_profile", "run_start", "run_results", "rms", "corrector_table", "as_result",
           "PACKED_KEY", "PACK_MAX_SIZE", "packable", "pack_arrays", "unpack_arrays", "unpack_results"]

FloatArray = npt.NDArray[np.float64]


def resolve_profile(source: Any) -> Profile:
    """The profile behind ``source``: a Profile, a profile name/path, a Twin, a Machine (anything with ``.profile``)."""
    if isinstance(source, Profile):
        return source
    prof = getattr(source, "profile", None)
    if isinstance(prof, Profile):
        return prof
    if isinstance(source, str):
        return load_profile(source)
    raise TypeError(
        f"expected a Profile, a profile name, a Twin or a Machine, got {type(source).__name__}; "
        "pass e.g. load_profile('ebs') or the connected machine")


def run_start(run: Any) -> dict[str, Any]:
    """The start document of a run (Tiled ``BlueskyRun``, a mapping with a ``start`` key, or ``{}``)."""
    md = getattr(run, "metadata", None)
    if md is not None:
        try:
            return dict(md["start"])
        except (KeyError, TypeError):
            return {}
    if isinstance(run, Mapping) and "start" in run and isinstance(run["start"], Mapping):
        return dict(run["start"])
    return {}


def tool_run_start(run: Any, tool: str, what: str) -> dict[str, Any]:
    """The start document of ``run`` (:func:`run_start`), refused unless it is a ``tool`` run (or a run without a
    tool name): a ``ValueError`` naming the run, its tool and ``what`` it should have been."""
    start = run_start(run)
    if start.get("tool") not in (None, tool):
        raise ValueError(f"run {start.get('uid', '?')[:8]} is a {start.get('tool')!r} run, not a {what}")
    return start


def _read_node(node: Any) -> np.ndarray:
    val = node.read() if hasattr(node, "read") else node
    arr = np.asarray(val)
    return arr


def run_results(run: Any, stream: str = "results") -> dict[str, np.ndarray]:
    """The results a plan stored in ``run`` (the last event of its ``results`` stream) as ``{key: array}``.

    Accepts a Tiled ``BlueskyRun`` (reads ``run[stream]``: its event table in one request, each large array in
    one more; the small arrays packed in :data:`PACKED_KEY` are unpacked; runs recorded with one data key per
    array read the same), or a mapping that already holds the results (returned with values as arrays).
    """
    if isinstance(run, Mapping) and not hasattr(run, "metadata") and stream not in run:
        return {k: np.asarray(v) for k, v in unpack_results(dict(run)).items() if k != "start"}
    try:
        node = run[stream]
    except (KeyError, TypeError) as err:
        uid = run_start(run).get("uid", "?")
        raise KeyError(f"run {uid} has no {stream!r} stream: it was not recorded by an acc_bluesky tool "
                       "or it failed before storing its results") from err
    if not hasattr(node, "base") and hasattr(run, "v3"):
        node = run.v3[stream]  # a databroker v2 view of the run (databroker's v1 API switches runs to it)
    out: dict[str, Any] = {}
    base = getattr(node, "base", None)
    parts = _stream_parts(base) if base is not None else None
    if parts is not None:
        for k, node_k in parts:
            try:
                values = node_k.read()
            except Exception as err:  # noqa: BLE001 - a part that cannot be read is reported, the rest returned
                warnings.warn(f"cannot read {stream}/{k}: {err}", stacklevel=2)
                continue
            if hasattr(values, "columns"):  # the event table: one column per scalar (and the packed arrays)
                for column in values.columns:
                    if column in ("time", "seq_num") or column.startswith("ts_"):
                        continue
                    col = np.asarray(values[column].to_numpy())
                    out[column] = col[-1] if col.ndim >= 1 and col.shape[0] >= 1 else col
            else:
                a = np.asarray(values)
                out[k] = a[-1] if a.ndim >= 1 and a.shape[0] >= 1 else a
    else:
        for k in list(node):
            if k in ("time", "seq_num") or k.startswith("ts_"):
                continue
            try:
                a = np.asarray(_read_node(node[k]))
            except Exception as err:  # noqa: BLE001 - a key that cannot be read is reported, the rest returned
                warnings.warn(f"cannot read {stream}/{k}: {err}", stacklevel=2)
                continue
            out[k] = a[-1] if a.ndim >= 1 and a.shape[0] >= 1 else a
    out = unpack_results(out)
    return {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in out.items()}


def _stream_parts(base: Any) -> list[tuple[str, Any]] | None:
    """The parts of a stream's plain Tiled container (its event table, its arrays), or None if it is not one."""
    try:
        items = list(base.items())
    except Exception:  # noqa: BLE001 - not a Tiled container: read key by key
        return None
    parts = []
    for k, client in items:
        family = str(getattr(client, "structure_family", ""))
        if family.endswith(("table", "array")):
            parts.append((k, client))
    return parts


def rms(v: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Root mean square (about zero) of the finite values of ``v`` (optionally only where ``mask``)."""
    a = np.asarray(v, dtype=float)
    if mask is not None:
        a = a[np.asarray(mask, dtype=bool)]
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


def corrector_table(profile: Profile, correctors: Sequence[str] | str | None = None,
                    include_bad: bool = False) -> list[tuple[str, str, int, str]]:
    """Resolve a corrector selection to ``[(device_name, family, index, plane), ...]``.

    ``correctors``: ``None`` (every in-service corrector of every hcor then vcor family), a family name, or a list
    of device names (``"HST_001"``) and/or family names. Unknown names raise a ``KeyError`` listing valid ones.
    """
    fams = profile.families_of_type("hcor", "vcor")
    if not fams:
        raise KeyError(f"profile {profile.name!r} has no corrector family (type hcor/vcor)")
    order = [n for n, f in fams.items() if f.spec.type == "hcor"] + [n for n, f in fams.items()
                                                                        if f.spec.type == "vcor"]

    def plane(fam: str) -> str:
        return "x" if fams[fam].spec.type == "hcor" else "y"

    def whole(fam: str) -> list[tuple[str, str, int, str]]:
        f = fams[fam]
        return [(f.device_names[i], fam, i, plane(fam)) for i in range(len(f))
                if include_bad or i not in f.bad]

    if correctors is None:
        return [row for fam in order for row in whole(fam)]
    if isinstance(correctors, str):
        correctors = [correctors]
    by_name = {d: (fam, i) for fam in order for i, d in enumerate(fams[fam].device_names)}
    out: list[tuple[str, str, int, str]] = []
    for c in correctors:
        c = str(c)
        if c in fams:
            out.extend(whole(c))
            continue
        hit = by_name.get(c)
        if hit is not None:
            out.append((c, hit[0], hit[1], plane(hit[0])))
            continue
        raise KeyError(f"unknown corrector {c!r}; use device names like {fams[order[0]].device_names[0]!r} "
                       f"or family names {order}")
    seen = set()
    uniq = []
    for row in out:
        if row[0] not in seen:
            seen.add(row[0])
            uniq.append(row)
    return uniq


def as_result(cls: type, obj: Any) -> Any:
    """``obj`` as a ``cls`` result: itself, or read with ``cls.from_run`` from a Tiled run or from what
    ``RE(plan)`` returned (anything with a ``run`` attribute giving its Tiled run)."""
    if isinstance(obj, cls):
        return obj
    run = getattr(obj, "run", None)
    if run is not None and not callable(run):
        obj = run
    if hasattr(obj, "metadata") or isinstance(obj, Mapping):
        return cls.from_run(obj)
    raise TypeError(f"expected a {cls.__name__}, a Tiled run or a plan's result (RE(...)); got {type(obj).__name__}"
                    + (" (a uid: read the run with catalog[uid] first)" if isinstance(obj, str) else ""))
