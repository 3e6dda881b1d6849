"""The packed layout of a run's small result arrays: one JSON string data key instead of one data key each.

Shared by the writer (:mod:`acc_bluesky.plan_stubs.results`) and the readers (:mod:`acc_bluesky.data.catalog`,
:mod:`acc_bluesky.analysis`): only ``json`` and ``numpy``, so every layer may import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["PACKED_KEY", "PACK_MAX_SIZE", "packable", "pack_arrays", "unpack_arrays", "unpack_results",
           "expand_data_keys"]

#: The data key of a ``results`` event that holds its small arrays, packed as one JSON string (see
#: :func:`pack_arrays`): each array its own data key would be a node of its own in Tiled (~3 requests to write,
#: one to read); scalars keep their own keys (columns of the stream's event table).
PACKED_KEY = "packed_arrays"
#: Arrays with at most this many values are packed; larger ones (an ORM matrix) keep their own data key.
PACK_MAX_SIZE = 10_000


def packable(value: Any) -> bool:
    """A result packed into :data:`PACKED_KEY`: a numeric or boolean array (ndim >= 1) of at most
    :data:`PACK_MAX_SIZE` values."""
    arr = np.asarray(value)
    return arr.ndim >= 1 and arr.dtype.kind in "biuf" and arr.size <= PACK_MAX_SIZE


def pack_arrays(arrays: Mapping[str, Any]) -> str:
    """Arrays as one JSON string ``{name: {"dtype": "<f8", "shape": [...], "data": [flat values, C order]}}``:
    exact (floats written as Python's shortest round-trip repr; NaN and infinities as ``NaN``/``Infinity``)."""
    out = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        out[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.ravel().tolist()}
    return json.dumps(out, separators=(",", ":"))


def unpack_arrays(text: Any) -> dict[str, np.ndarray]:
    """The arrays of :func:`pack_arrays`' JSON string, with their dtypes and shapes."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for k, v in json.loads(str(text)).items():
        out[k] = np.asarray(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
    return out


def unpack_results(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (one event's results) with :data:`PACKED_KEY`, if any, replaced by the arrays it holds; runs
    recorded before the packing (one data key per array) come back unchanged."""
    if PACKED_KEY not in values:
        return values
    out = {k: v for k, v in values.items() if k != PACKED_KEY}
    out.update(unpack_arrays(np.asarray(values[PACKED_KEY]).item()))
    return out


def expand_data_keys(data_keys: Mapping[str, Any]) -> dict[str, Any]:
    """A stream's descriptor data keys with an entry for each packed array too (shape, dtype, units,
    description, and ``packed_in``: the key that holds it)."""
    out = dict(data_keys)
    packed = data_keys.get(PACKED_KEY)
    if isinstance(packed, Mapping) and isinstance(packed.get("packed"), Mapping):
        for k, info in packed["packed"].items():
            out.setdefault(k, {"source": packed.get("source", ""), "dtype": "array", **dict(info),
                               "packed_in": PACKED_KEY})
    return out
