"""The Tiled catalogue of runs: the embedded one (SQLite + files in a folder), a Tiled server, and readers.

Layout of a catalogue folder (the same for the on-demand local server and for ``acc-bluesky catalog serve``)::

    catalog.db      SQLite: the tree of runs, streams and their metadata (start/stop documents, data keys)
    tables.sqlite   SQLite: the event tables (scalars and strings, one row per event; a results event's small
                    arrays packed in one JSON string, see acc_bluesky.plan_stubs.results)
    data/           zarr arrays (every array-valued data key, e.g. orbits, response matrices)
    wal/            write-ahead logs of the runs being written (one JSON Lines file per open run)
    server.*        the local server: lock, address, API key (mode 0600), log (see acc_bluesky.data.local)

A catalogue folder is served by one Tiled server process on loopback (:mod:`acc_bluesky.data.local`), shared by
every session of the machine; this module knows the folder's layout, builds the server-side adapter and reads runs.
It imports no other module of this package but :mod:`acc_bluesky._packed` (json and numpy).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pathlib
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._packed import PACKED_KEY, expand_data_keys, unpack_arrays

__all__ = [
    "ENV_CATALOG",
    "MAX_TABLE_ARRAY_SIZE",
    "CatalogPermissionError",
    "CatalogUnavailableError",
    "build_catalog_adapter",
    "catalog_paths",
    "default_catalog_dir",
    "find_runs",
    "init_catalog",
    "is_uri",
    "read_dataset",
    "read_results",
    "read_stream",
    "run_metadata",
    "stream_data_keys",
]

logger = logging.getLogger(__name__)

#: Environment variable: the catalogue folder, or the URI of a Tiled server.
ENV_CATALOG = "ACC_BLUESKY_CATALOG"

#: Spec of the catalogue's root node: gives the client bluesky conveniences (``cat[-1]``, ``cat[scan_id]``,
#: partial uids, ``TimeRange`` queries).
ROOT_SPEC = ("CatalogOfBlueskyRuns", "3.0")


#: Largest array (number of values) the TiledWriter may keep in a stream's event table; larger ones are zarr
#: arrays. 0: every array is a zarr array, because the SQLite event tables of our catalogues cannot hold list
#: columns ("Unsupported PyArrow type: list<item: double>"); the plugin's default, 16, would lose such runs.
MAX_TABLE_ARRAY_SIZE = 0


class CatalogUnavailableError(ConnectionError):
    """The Tiled catalogue cannot be reached or refuses us; the message says which and what to do."""


class CatalogPermissionError(CatalogUnavailableError, PermissionError):
    """The API key given cannot do what is asked (e.g. a read-only key used to record runs). ``missing``: the
    Tiled scopes it lacks."""

    def __init__(self, message: str, missing: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


def is_uri(value: str | os.PathLike | None) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in {"http", "https"}


def default_catalog_dir() -> pathlib.Path:
    """The default catalogue folder: ``$ACC_BLUESKY_CATALOG`` if it is a path, else
    ``platformdirs.user_data_dir("acc_bluesky")/catalog``."""
    env = os.environ.get(ENV_CATALOG)
    if env and not is_uri(env):
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_data_dir("acc_bluesky", appauthor=False)) / "catalog"


def catalog_paths(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Paths of a catalogue folder: ``catalog`` (SQLite tree), ``tables`` (SQLite event tables), ``data``.

    An empty name is refused (``Path("")`` is the working directory: a catalogue, its server's lock and key would
    land wherever the session happens to run)."""
    if not str(directory).strip():
        raise ValueError("the catalogue folder is an empty path: give the folder (e.g. catalog_dir='~/runs'), or "
                         "None for the default catalogue")
    d = pathlib.Path(directory).expanduser().resolve()
    return {"root": d, "catalog": d / "catalog.db", "tables": d / "tables.sqlite", "data": d / "data"}


def _sqlite_uri(path: pathlib.Path) -> str:
    return f"sqlite:///{path}"


_init_lock = threading.Lock()


def init_catalog(directory: str | os.PathLike) -> pathlib.Path:
    """Create (if needed) a catalogue folder and its SQLite database; return the resolved folder.

    Runs Tiled's own initialisation (tables + alembic stamp) in-process, on a helper thread so that it also
    works where an asyncio loop runs in the calling thread (Jupyter).
    """
    paths = catalog_paths(directory)
    paths["data"].mkdir(parents=True, exist_ok=True)
    if paths["catalog"].exists() and paths["catalog"].stat().st_size > 0:
        return paths["root"]
    error: list[BaseException] = []

    def work() -> None:
        try:
            init_sql_database(_sqlite_uri(paths["catalog"]), "catalog")
        except BaseException as err:  # re-raised in the calling thread
            error.append(err)

    with _init_lock:
        thread = threading.Thread(target=work, name="acc-bluesky-catalog-init")
        thread.start()
        thread.join()
    if error:
        raise CatalogUnavailableError(
            f"Could not create the Tiled catalogue in {paths['root']}: {error[0]}"
        ) from error[0]
    return paths["root"]


def init_sql_database(uri: str, kind: str = "catalog") -> bool:
    """Create a Tiled SQL database (``kind`` ``"catalog"`` or ``"authn"``) and stamp its schema revision, unless it
    already exists at the revision this Tiled needs. Returns True if it was created."""
    import asyncio
    import importlib

    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.utils import ensure_specified_sql_driver

    package = {"catalog": "tiled.catalog", "authn": "tiled.authn_database"}[kind]
    core = importlib.import_module(f"{package}.core")
    alembic = importlib.import_module(f"{package}.alembic_constants")
    uri = ensure_specified_sql_driver(uri)

    async def setup() -> bool:
        engine = create_async_engine(uri)
        try:
            await check_database(engine, core.REQUIRED_REVISION, core.ALL_REVISIONS)
            return False
        except UninitializedDatabase:
            await core.initialize_database(engine)
            return True
        finally:
            await engine.dispose()

    created = asyncio.run(setup())
    if created:
        stamp_head(alembic.ALEMBIC_INI_TEMPLATE_PATH, alembic.ALEMBIC_DIR, uri)
    return created

def build_catalog_adapter(
    directory: str | os.PathLike,
    *,
    database: str | None = None,
    streaming_cache: bool = False,
) -> Any:
    """The Tiled catalogue adapter (server side) over a catalogue folder, created if needed.

    Args:
        directory: the catalogue folder (zarr arrays in ``data/``; with the default database also the SQLite files).
        database: ``postgresql://user@host:port/db`` to keep the tree of runs *and* the event tables in PostgreSQL
            (a team server); default the folder's SQLite files.
        streaming_cache: keep Tiled's in-memory streaming cache (live clients subscribe to new events).
    """
    from tiled.catalog import from_uri as catalog_from_uri

    kwargs: dict[str, Any] = {}
    if streaming_cache:
        from tiled.config import StreamingCacheConfig

        kwargs["cache_config"] = StreamingCacheConfig(uri="memory").model_dump()
    if database is None:
        root = init_catalog(directory)
        paths = catalog_paths(root)
        catalog_uri, tables_uri = _sqlite_uri(paths["catalog"]), _sqlite_uri(paths["tables"])
        # one connection to the SQLite event tables: concurrent appends (several sessions at once) queue for it
        # instead of failing inside the server with "database is locked"
        kwargs.update(storage_pool_size=1, storage_max_overflow=0)
    else:
        if not database.startswith(("postgresql://", "postgresql+asyncpg://", "sqlite")):
            raise ValueError(f"database must be a postgresql:// (or sqlite:///) URI, got {redact_uri(database)!r}")
        paths = catalog_paths(directory)
        paths["data"].mkdir(parents=True, exist_ok=True)
        init_sql_database(database, "catalog")
        catalog_uri = tables_uri = database.replace("postgresql+asyncpg://", "postgresql://")
    return catalog_from_uri(
        catalog_uri,
        writable_storage=[str(paths["data"]), tables_uri],
        specs=[{"name": ROOT_SPEC[0], "version": ROOT_SPEC[1]}],
        **kwargs,
    )


def redact_uri(uri: str) -> str:
    """A URI without its password and ``api_key`` query value (for messages)."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        if ":" in cred:
            netloc = f"{cred.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if "api_key" in query:
        query = urllib.parse.urlencode(
            [(k, "***" if k == "api_key" else v) for k, v in urllib.parse.parse_qsl(query)])
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def serialization_registry() -> Any:
    """Tiled's serialisers plus bluesky's ``application/json-seq`` exporter (``run.documents()``)."""
    from tiled.media_type_registration import default_serialization_registry

    try:
        from bluesky_tiled_plugins.exporters import json_seq_exporter

        default_serialization_registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    except Exception:  # pragma: no cover - optional convenience
        logger.debug("bluesky json-seq exporter not registered", exc_info=True)
    return default_serialization_registry


# --------------------------------------------------------------------------------------------- queries


def _timestamp(value: float | int | str | _dt.datetime | _dt.date) -> float:
    """Seconds since the epoch from a number, a datetime/date (naive = local time) or an ISO string."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
        value = _dt.datetime.combine(value, _dt.time())
    return value.timestamp()


def find_runs(
    cat: Any,
    tool: str | None = None,
    facility: str | None = None,
    profile: str | None = None,
    mode: str | None = None,
    since: float | str | _dt.datetime | _dt.date | None = None,
    until: float | str | _dt.datetime | _dt.date | None = None,
    **where: Any,
) -> Any:
    """Search runs by their start document.

    Args:
        cat: the catalogue (or an earlier search result).
        tool: e.g. ``"orbit_response"``.
        facility: e.g. ``"ESRF"``.
        profile: profile name, e.g. ``"ebs"``.
        mode: ``"sim"`` or ``"epics"``.
        since: runs started at or after this time: epoch seconds [s], a datetime/date (naive means local
            time) or an ISO 8601 string.
        until: runs started strictly before this time (same forms).
        **where: further equalities on start-document keys, dotted for nested keys
            (``**{"parameters.delta": 1e-5}``).

    Returns:
        The matching runs as a Tiled container (``list(result)`` gives their uids, ``result.values()`` runs).
    """
    from tiled.queries import Key

    results = cat
    equal = {"tool": tool, "facility": facility, "profile.name": profile, "mode": mode, **where}
    for key, value in equal.items():
        if value is not None:
            results = results.search(Key(f"start.{key}") == value)
    if since is not None:
        results = results.search(Key("start.time") >= _timestamp(since))
    if until is not None:
        results = results.search(Key("start.time") < _timestamp(until))
    return results


# --------------------------------------------------------------------------------------------- readers


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_metadata(run: Any) -> dict[str, Any]:
    """The run's start document as a plain dict."""
    return _plain(run.metadata["start"])


def _stream_node(run: Any, stream: str) -> Any:
    try:
        node = run[stream]
    except KeyError:
        streams = sorted(run)
        raise KeyError(
            f"Run {run.metadata['start']['uid']} has no stream {stream!r}; its streams are {streams}"
        ) from None
    if not hasattr(node, "base") and hasattr(run, "v3"):
        # a databroker v2 view of the run (databroker's v1 API switches the runs of the process to it)
        node = run.v3[stream]
    return node


def _column(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object and len(arr) and isinstance(arr[0], (list, tuple, np.ndarray)):
        return np.stack([np.asarray(v) for v in arr])  # small arrays kept in the event table
    if arr.dtype == object and len(arr) and isinstance(arr[0], str):
        return arr.astype(str)
    return arr


def stream_data_keys(run: Any, stream: str = "primary") -> dict[str, dict[str, Any]]:
    """The descriptor's data keys of a stream: per key ``units``, ``description``, ``shape``, ``dtype``, ...; the
    small result arrays packed in ``packed_arrays`` (:mod:`acc_bluesky.plan_stubs.results`) have theirs too."""
    node = _stream_node(run, stream)
    return _plain(expand_data_keys(dict(node.metadata.get("data_keys", {}))))


def read_stream(run: Any, stream: str = "primary") -> dict[str, np.ndarray]:
    """The data of a stream as arrays stacked over events (first axis: event), plus ``time`` [s, epoch].

    Scalars give shape ``(n_events,)``, arrays of shape S give ``(n_events, *S)`` (the packed small result arrays
    too). Units are in :func:`stream_data_keys`. One request per part of the stream (its event table, each large
    array).
    """
    node = _stream_node(run, stream)
    base = getattr(node, "base", node)  # the plain container under the bluesky composite view
    out: dict[str, np.ndarray] = {}
    for part, client in base.items():
        family = str(getattr(client, "structure_family", ""))
        if family.endswith("table"):
            frame = client.read()
            for column in frame.columns:
                if column == "seq_num" or column.startswith("ts_"):
                    continue
                out[column] = _column(frame[column].to_numpy())
        elif family.endswith("array"):
            out[part] = np.asarray(client.read())
    if PACKED_KEY in out:  # small result arrays packed in one JSON string per event: unpacked, stacked
        events = [unpack_arrays(text) for text in out.pop(PACKED_KEY)]
        for key in events[0] if events else ():
            out[key] = np.stack([e[key] for e in events])
    if "time" in out:
        out["time"] = out.pop("time")  # last, after the data keys
    return out


def read_results(run: Any, stream: str = "results") -> dict[str, np.ndarray]:
    """The results a plan stored with :func:`acc_bluesky.plan_stubs.results.store_result`.

    Returns the last event of the stream: per key an array of the stored shape (0-d for scalars), in the
    units of :func:`stream_data_keys`.
    """
    data = read_stream(run, stream)
    data.pop("time", None)
    return {k: np.asarray(v[-1]) for k, v in data.items()}


def read_dataset(run: Any, stream: str = "primary") -> Any:
    """A stream as an :class:`xarray.Dataset`: one variable per data key (first dimension ``time``, the event),
    with the descriptor's ``units`` and ``description`` in each variable's ``attrs`` (what databroker users
    expect); ``time`` [s, epoch] as the coordinate."""
    import xarray as xr

    data = read_stream(run, stream)
    keys = stream_data_keys(run, stream)
    time = data.pop("time", None)
    n = len(time) if time is not None else (len(next(iter(data.values()))) if data else 0)
    variables = {}
    for key, values in data.items():
        dims = ["time", *(f"{key}_dim_{i}" for i in range(1, values.ndim))]
        attrs = {a: keys.get(key, {}).get(a) for a in ("units", "description", "source")}
        variables[key] = xr.Variable(dims, values, attrs={a: v for a, v in attrs.items() if v not in (None, "")})
    coords = {"time": ("time", time if time is not None else np.arange(n), {"units": "s"})}
    return xr.Dataset(variables, coords=coords, attrs={"uid": run_metadata(run).get("uid", ""), "stream": stream})
