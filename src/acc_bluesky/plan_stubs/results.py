"""Store a plan's results (a measured matrix, a fit, the correction applied) in the run itself.

The results go to one event of a separate stream (``"results"`` by default), one data key per result, with
its units and meaning in the stream's descriptor. Read them back with
:func:`acc_bluesky.data.read_results` (values) and :func:`acc_bluesky.data.stream_data_keys` (units,
descriptions).
"""

from __future__ import annotations

import json

import time
from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

__all__ = ["ResultsReadable", "store_result"]


def _data_key(name: str, value: Any, units: str | None, description: str | None, source: str) -> dict[str, Any]:
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS" and arr.ndim == 0:
        dtype, dtype_numpy = "string", None
    elif arr.ndim == 0:
        kind = arr.dtype.kind
        dtype = {"b": "boolean", "i": "integer", "u": "integer"}.get(kind, "number")
        dtype_numpy = arr.dtype.str
    else:
        if arr.dtype.kind in "OUS":
            raise TypeError(f"Result {name!r}: arrays of strings or objects are not supported")
        dtype, dtype_numpy = "array", arr.dtype.str
    key: dict[str, Any] = {
        "source": source,
        "dtype": dtype,
        "shape": list(arr.shape),
        "units": units if units is not None else "",
        "description": description if description is not None else "",
    }
    if dtype_numpy is not None:
        key["dtype_numpy"] = dtype_numpy
    return key


#: The result key that holds the shapes of the results with no element (an ORM of a line with no corrector
#: in one plane, a correction that converged without a step): ``{key: [shape, dtype]}`` as JSON.
EMPTY_KEY = "empty_arrays"


def _without_empty(results: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list]]:
    out: dict[str, Any] = {}
    empty: dict[str, list] = {}
    for k, v in results.items():
        if isinstance(v, str):
            out[k] = v
            continue
        arr = np.asarray(v)
        if arr.ndim >= 1 and arr.size == 0 and arr.dtype.kind not in "OUS":
            empty[k] = [list(arr.shape), arr.dtype.str]
        else:
            out[k] = v
    if EMPTY_KEY in results:
        raise ValueError(f"Result key {EMPTY_KEY!r} is reserved by acc_bluesky (shapes of empty results)")
    return out, empty


def _value(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return np.ascontiguousarray(arr)


class ResultsReadable:
    """A bluesky ``Readable`` over fixed values: what :func:`store_result` reads into its stream.

    Args:
        name: the object name (the stream name).
        results: key -> value (numpy array, number, bool or string).
        units: key -> units (``""`` for dimensionless).
        descriptions: key -> physics meaning.
    """

    def __init__(
        self,
        name: str,
        results: Mapping[str, Any],
        units: Mapping[str, str] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        units = dict(units or {})
        descriptions = dict(descriptions or {})
        unknown = (set(units) | set(descriptions)) - set(results)
        if unknown:
            raise KeyError(f"units/descriptions given for keys that are not results: {sorted(unknown)}")
        self._name = name
        results, empty = _without_empty(results)
        if empty:  # Tiled's event tables cannot hold an array with no element: their shapes are kept instead
            results[EMPTY_KEY] = json.dumps(empty, sort_keys=True)
            descriptions.setdefault(EMPTY_KEY, "arrays with no element (key -> [shape, dtype]); "
                                               "acc_bluesky's readers give them back as empty arrays")
        self._values = {k: _value(v) for k, v in results.items()}
        self._keys = {
            k: _data_key(k, v, units.get(k), descriptions.get(k), f"acc_bluesky:{name}")
            for k, v in results.items()
        }
        self._timestamp = time.time()

    def _signature(self) -> tuple[Any, ...]:
        return (self._name, tuple(sorted((k, repr(sorted(v.items()))) for k, v in self._keys.items())))

    # Equal when they describe the same stream (name, keys, shapes, dtypes, units): bluesky then adds the
    # readings of a later store_result to the same stream as a new event.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResultsReadable) and self._signature() == other._signature()

    def __hash__(self) -> int:
        return hash(self._signature())

    @property
    def name(self) -> str:
        return self._name

    @property
    def parent(self) -> None:
        return None

    def describe(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._keys.items()}

    def read(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": v, "timestamp": self._timestamp} for k, v in self._values.items()}


def store_result(
    results: Mapping[str, np.ndarray | float | int | bool | str],
    *,
    units: Mapping[str, str] | None = None,
    descriptions: Mapping[str, str] | None = None,
    stream: str = "results",
) -> MsgGenerator[None]:
    """Record results in the open run as one event of the stream ``stream``. Never opens a run.

    Args:
        results: key -> value: arrays of any shape and numeric dtype (e.g. a 224x448 orbit response matrix
            [m/rad]), numbers, booleans or strings. Keys must not be ``time`` or ``seq_num``.
        units: key -> units written in the descriptor (``units``); missing keys get ``""``.
        descriptions: key -> physics meaning written in the descriptor (``description``).
        stream: the stream name. Calling again in the same run with the same keys, shapes, dtypes and units
            adds an event to the stream (e.g. one per correction iteration; :func:`read_results` gives the
            last one, :func:`acc_bluesky.data.read_stream` all); other keys need another stream name.

    Example::

        yield from store_result({"orm": R, "s": s}, units={"orm": "m/rad", "s": "m/rad"},
                                descriptions={"orm": "orbit response, rows BPM x then y"})
    """
    reserved = {"time", "seq_num"} & set(results)
    if reserved:
        raise ValueError(f"Result keys {sorted(reserved)} are reserved by bluesky/Tiled; rename them")
    if not results:
        raise ValueError("store_result needs at least one result")
    obj = ResultsReadable(stream, results, units, descriptions)
    yield from bps.create(name=stream)
    yield from bps.read(obj)
    yield from bps.save()
