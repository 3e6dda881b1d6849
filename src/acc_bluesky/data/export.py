"""Export a run to files a user can open anywhere: HDF5 (NeXus-like) or CSV.

HDF5 layout (``NX_class`` attributes as in NeXus)::

    /entry                         NXentry; attrs: uid, tool, facility, start_time (ISO 8601)...
    /entry/start                   NXcollection: the start document as attributes (nested dicts as groups);
                                   attr ``json``: the whole document as JSON
    /entry/stop                    the stop document, likewise
    /entry/<stream>                NXdata, one per stream (primary, results, ...)
    /entry/<stream>/<key>          dataset (n_events, *shape); attrs: units, description, source, dtype
    /entry/<stream>/time           event times [s since the epoch]

CSV: one file per stream, ``<path stem>.<stream>.csv``; arrays are spread over columns ``key[i]`` (or
``key[i,j]``); the first lines (``#``) give the run uid and the units of each key.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .catalog import read_stream, run_metadata, stream_data_keys

__all__ = ["export_run", "read_hdf5_export"]


def _set_attrs(group: Any, doc: Mapping[str, Any]) -> None:
    """Scalars and homogeneous lists as attributes, dicts as sub-groups, anything else as JSON text."""
    for key, value in doc.items():
        key = str(key).replace("/", "_")
        if isinstance(value, Mapping):
            _set_attrs(group.require_group(key), value)
            continue
        if value is None:
            group.attrs[key] = "null"
            continue
        if isinstance(value, (bool, int, float, str, np.generic)):
            group.attrs[key] = value
            continue
        try:
            arr = np.asarray(value)
            if arr.dtype.kind in "biuf" and arr.size:
                group.attrs[key] = arr
                continue
            if arr.dtype.kind == "U" and arr.size:
                group.attrs[key] = arr.astype(object)
                continue
        except (ValueError, TypeError):
            pass
        group.attrs[key] = json.dumps(value, default=str)


def _streams(run: Any, streams: Iterable[str] | None) -> list[str]:
    names = sorted(run)
    if streams is None:
        return names
    wanted = list(streams)
    unknown = set(wanted) - set(names)
    if unknown:
        raise KeyError(f"Run has no stream(s) {sorted(unknown)}; its streams are {names}")
    return wanted


def export_run(
    run: Any,
    path: str | os.PathLike,
    *,
    streams: Iterable[str] | None = None,
    format: str | None = None,  # noqa: A002
) -> list[pathlib.Path]:
    """Write a run (from the catalogue) to HDF5 or CSV.

    Args:
        run: a run from the catalogue (``cat[uid]``).
        path: output file; ``.h5``/``.hdf5``/``.nxs`` give HDF5, ``.csv`` gives CSV (one file per stream).
        streams: streams to export (default: all).
        format: ``"hdf5"`` or ``"csv"`` to override the file extension.

    Returns:
        The files written.
    """
    path = pathlib.Path(path).expanduser()
    fmt = (format or ("csv" if path.suffix.lower() == ".csv" else "hdf5")).lower()
    if fmt in ("hdf5", "h5", "nexus", "nxs"):
        return [_export_hdf5(run, path, _streams(run, streams))]
    if fmt == "csv":
        return _export_csv(run, path, _streams(run, streams))
    raise ValueError(f"Unknown export format {fmt!r}: use 'hdf5' or 'csv'")


def _export_hdf5(run: Any, path: pathlib.Path, streams: list[str]) -> pathlib.Path:
    import h5py

    start = run_metadata(run)
    stop = dict(run.metadata.get("stop") or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "acc_bluesky"
        f.attrs["NX_class"] = "NXroot"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["uid"] = start["uid"]
        entry.attrs["start_time"] = _dt.datetime.fromtimestamp(start["time"], _dt.timezone.utc).isoformat()
        for key in ("tool", "facility", "accelerator", "mode", "plan_name", "license", "operator"):
            if isinstance(start.get(key), str):
                entry.attrs[key] = start[key]
        for name, doc in (("start", start), ("stop", stop)):
            group = entry.create_group(name)
            group.attrs["NX_class"] = "NXcollection"
            group.attrs["json"] = json.dumps(doc, default=str)
            _set_attrs(group, doc)
        for stream in streams:
            group = entry.create_group(stream)
            group.attrs["NX_class"] = "NXdata"
            data = read_stream(run, stream)
            keys = stream_data_keys(run, stream)
            for key, values in data.items():
                if values.dtype.kind == "U":
                    values = values.astype(object)
                    ds = group.create_dataset(key, data=values, dtype=h5py.string_dtype())
                else:
                    ds = group.create_dataset(key, data=values)
                if key == "time":
                    ds.attrs["units"] = "s"
                    ds.attrs["description"] = "event time, seconds since the epoch"
                    continue
                for attr in ("units", "description", "source", "dtype", "dtype_numpy"):
                    value = keys.get(key, {}).get(attr)
                    if value not in (None, ""):
                        ds.attrs[attr] = value
    return path


def read_hdf5_export(path: str | os.PathLike) -> dict[str, Any]:
    """Read back an HDF5 export: ``{"start": dict, "stop": dict, "<stream>": {key: array}}``."""
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        for name in entry:
            group = entry[name]
            if "json" in group.attrs:
                out[name] = json.loads(group.attrs["json"])
            else:
                out[name] = {key: group[key][()] for key in group}
    return out


def _columns(key: str, values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if values.ndim <= 1:
        return [(key, values)]
    flat = values.reshape(values.shape[0], -1)
    cols = []
    for j, idx in enumerate(np.ndindex(*values.shape[1:])):
        cols.append((f"{key}[{','.join(map(str, idx))}]", flat[:, j]))
    return cols


def _export_csv(run: Any, path: pathlib.Path, streams: list[str]) -> list[pathlib.Path]:
    import csv

    start = run_metadata(run)
    written = []
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in streams:
        data = read_stream(run, stream)
        keys = stream_data_keys(run, stream)
        columns: list[tuple[str, np.ndarray]] = []
        if "time" in data:
            columns.append(("time", data.pop("time")))
        for key, values in data.items():
            columns.extend(_columns(key, values))
        out = path.with_name(f"{path.stem}.{stream}.csv")
        with open(out, "w", newline="", encoding="utf-8") as f:
            f.write(f"# run uid: {start['uid']}; tool: {start.get('tool', '')}; stream: {stream}\n")
            units = {k: v.get("units", "") for k, v in keys.items()}
            f.write("# units: time=s; " + "; ".join(f"{k}={u}" for k, u in units.items()) + "\n")
            writer = csv.writer(f)
            writer.writerow([name for name, _ in columns])
            n = len(columns[0][1]) if columns else 0
            for i in range(n):
                writer.writerow([_cell(col[i]) for _, col in columns])
        written.append(out)
    return written


def _cell(x: Any) -> Any:
    if isinstance(x, np.floating):
        return repr(float(x))
    if isinstance(x, np.generic):
        return x.item()
    return x
