"""Store a plan's results (a measured matrix, a fit, the correction applied) in the run itself.

The results go to one event of a separate stream (``"results"`` by default), with their units and meaning in the
stream's descriptor: each number (or string) its own data key (a column of the stream's event table), each large
array (more than :data:`~acc_bluesky._packed.PACK_MAX_SIZE` values, e.g. an ORM matrix) its own data
key (a zarr array), and the small arrays packed together, exactly, in one JSON string data key ``packed_arrays``
whose descriptor entry lists each array's shape, dtype, units and meaning (``packed``). In Tiled every array key
is a node of its own, ~3 requests to write and one to read (~0.05-0.2 s each on a local server): a correction
storing ten short arrays took seconds to write. Read them back with :func:`acc_bluesky.data.read_results`
(values; packed arrays unpacked, and runs recorded with one data key per array read the same) and
:func:`acc_bluesky.data.stream_data_keys` (units, descriptions, per packed array too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from .._packed import PACKED_KEY, pack_arrays, packable

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
        pack: bool = True,
    ) -> None:
        units = dict(units or {})
        descriptions = dict(descriptions or {})
        unknown = (set(units) | set(descriptions)) - set(results)
        if unknown:
            raise KeyError(f"units/descriptions given for keys that are not results: {sorted(unknown)}")
        if pack and PACKED_KEY in results:
            raise ValueError(f"Result key {PACKED_KEY!r} is reserved for the packed small arrays; rename it")
        self._name = name
        source = f"acc_bluesky:{name}"
        keys = {k: _data_key(k, v, units.get(k), descriptions.get(k), source) for k, v in results.items()}
        packed = [k for k, v in results.items() if pack and packable(v)]
        self._values = {k: _value(v) for k, v in results.items() if k not in packed}
        self._keys = {k: v for k, v in keys.items() if k not in packed}
        if packed:
            self._values[PACKED_KEY] = pack_arrays({k: results[k] for k in packed})
            self._keys[PACKED_KEY] = {
                "source": source, "dtype": "string", "shape": [], "units": "",
                "description": ("the small result arrays, packed: a JSON object {name: {dtype, shape, data (the "
                                "values, flat, C order)}}; each one's units and meaning in 'packed'"),
                "packed": {k: {a: keys[k][a] for a in ("dtype_numpy", "shape", "units", "description")}
                           for k in packed},
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
    pack: bool = True,
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
        pack: pack the small arrays into one data key (see the module docs); False: one data key per array (the
            layout of runs recorded before; slower to write and read).

    Example::

        yield from store_result({"orm": R, "s": s}, units={"orm": "m/rad", "s": "m/rad"},
                                descriptions={"orm": "orbit response, rows BPM x then y"})
    """
    reserved = {"time", "seq_num"} & set(results)
    if reserved:
        raise ValueError(f"Result keys {sorted(reserved)} are reserved by bluesky/Tiled; rename them")
    if not results:
        raise ValueError("store_result needs at least one result")
    obj = ResultsReadable(stream, results, units, descriptions, pack=pack)
    yield from bps.create(name=stream)
    yield from bps.read(obj)
    yield from bps.save()
