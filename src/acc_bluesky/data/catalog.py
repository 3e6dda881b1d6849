"""The Tiled catalogue of runs: the embedded one (SQLite + files in a folder), a Tiled server, and readers.

Layout of a catalogue folder (the same for the embedded catalogue and for ``acc-bluesky catalog serve``)::

    catalog.db      SQLite: the tree of runs, streams and their metadata (start/stop documents, data keys)
    tables.sqlite   SQLite: the event tables (scalars and strings, one row per event)
    data/           zarr arrays (every array-valued data key, e.g. orbits, tunes, response matrices)

The embedded catalogue is a Tiled application running inside the Python process (no server, no port): the
RunEngine's :class:`~bluesky_tiled_plugins.TiledWriter` and the analysis client talk to it in-process. One
application is shared by every client of the same folder in a process.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pathlib
import threading
import urllib.parse
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "ENV_CATALOG",
    "MAX_TABLE_ARRAY_SIZE",
    "CatalogUnavailableError",
    "catalog_paths",
    "close_catalog",
    "connect_tiled",
    "default_catalog_dir",
    "find_runs",
    "init_catalog",
    "is_uri",
    "open_catalog",
    "read_results",
    "read_stream",
    "run_metadata",
    "stream_data_keys",
]

logger = logging.getLogger(__name__)

#: Environment variable: folder of the embedded catalogue, or the URI of a Tiled server.
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


def is_uri(value: str | os.PathLike | None) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in {"http", "https"}


def default_catalog_dir() -> pathlib.Path:
    """The embedded catalogue's folder: ``$ACC_BLUESKY_CATALOG`` if it is a path, else
    ``platformdirs.user_data_dir("acc_bluesky")/catalog``."""
    env = os.environ.get(ENV_CATALOG)
    if env and not is_uri(env):
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_data_dir("acc_bluesky", appauthor=False)) / "catalog"


def catalog_paths(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Paths of a catalogue folder: ``catalog`` (SQLite tree), ``tables`` (SQLite event tables), ``data``."""
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


def build_catalog_adapter(directory: str | os.PathLike, *, streaming_cache: bool = False) -> Any:
    """The Tiled catalogue adapter (server side) over a catalogue folder, created if needed."""
    from tiled.catalog import from_uri as catalog_from_uri

    root = init_catalog(directory)
    paths = catalog_paths(root)
    kwargs: dict[str, Any] = {}
    if streaming_cache:
        from tiled.config import StreamingCacheConfig

        kwargs["cache_config"] = StreamingCacheConfig(uri="memory").model_dump()
    return catalog_from_uri(
        _sqlite_uri(paths["catalog"]),
        writable_storage=[str(paths["data"]), _sqlite_uri(paths["tables"])],
        specs=[{"name": ROOT_SPEC[0], "version": ROOT_SPEC[1]}],
        **kwargs,
    )


class _Embedded:
    """One in-process Tiled application over a catalogue folder."""

    def __init__(self, directory: pathlib.Path) -> None:
        from tiled.client.context import Context
        from tiled.server.app import build_app

        self.directory = directory
        self.adapter = build_catalog_adapter(directory)
        app_logger = logging.getLogger("tiled.server.app")  # prints "Tiled version ..." at start-up
        level = app_logger.level
        app_logger.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # starlette's TestClient-with-httpx deprecation notice
                self.app = build_app(self.adapter, serialization_registry=_serialization_registry())
                self.context = Context.from_app(self.app)
        finally:
            app_logger.setLevel(level)
        # runs written by the writer process: every request of this process first waits for what is pending
        from .writer import wait_for_writer

        http = self.context.http_client
        send = http.send

        def send_after_writer(request: Any, **kwargs: Any) -> Any:
            wait_for_writer(directory)
            return send(request, **kwargs)

        http.send = send_after_writer

    def client(self) -> Any:
        from tiled.client import from_context

        return from_context(self.context)


_embedded: dict[pathlib.Path, _Embedded] = {}
_embedded_lock = threading.Lock()


def _embedded_client(directory: str | os.PathLike) -> Any:
    root = catalog_paths(directory)["root"]
    with _embedded_lock:
        emb = _embedded.get(root)
        if emb is None:
            try:
                emb = _embedded[root] = _Embedded(root)
            except CatalogUnavailableError:
                raise
            except Exception as err:
                raise CatalogUnavailableError(
                    f"Could not open the embedded Tiled catalogue in {root}: {err!r}. Check that the folder is "
                    f"writable, or choose another one with catalog_dir=... or ${ENV_CATALOG}."
                ) from err
    return emb.client()


def close_catalog(catalog_dir: str | os.PathLike | None = None) -> None:
    """Shut down the in-process Tiled application of an embedded catalogue folder (of all of them if None).

    What the catalogue writer process still has to write there is written first, then it closes its side too.
    Clients of that folder stop working; the next ``open_catalog``/``make_run_engine`` starts a fresh one (a
    RunEngine of that folder goes on recording). Useful in test suites that make many catalogues; at interpreter
    exit this happens by itself.
    """
    from .writer import forget_catalog

    with _embedded_lock:
        roots = list(_embedded) if catalog_dir is None else [catalog_paths(catalog_dir)["root"]]
    for root in roots:
        forget_catalog(root)
    with _embedded_lock:
        for root in roots:
            emb = _embedded.pop(root, None)
            if emb is not None:
                emb.context.close()


def _serialization_registry() -> Any:
    """Tiled's serialisers plus bluesky's ``application/json-seq`` exporter (``run.documents()``)."""
    from tiled.media_type_registration import default_serialization_registry

    try:
        from bluesky_tiled_plugins.exporters import json_seq_exporter

        default_serialization_registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    except Exception:  # pragma: no cover - optional convenience
        logger.debug("bluesky json-seq exporter not registered", exc_info=True)
    return default_serialization_registry


def _probe(uri: str, timeout: float) -> None:
    """Fail fast, without Tiled's retries, when nothing answers at ``uri``."""
    import httpx

    parts = urllib.parse.urlsplit(uri)
    probe = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/healthz", "", ""))
    try:
        httpx.get(probe, timeout=timeout, trust_env=False)
    except httpx.TransportError as err:
        raise CatalogUnavailableError(
            f"Cannot reach the Tiled server at {_redact(uri)} ({type(err).__name__}: {err}). Check the address "
            "and that the server runs (e.g. `acc-bluesky catalog serve --port PORT --api-key KEY`). To record "
            "while it is down, use make_run_engine(tiled=URI, offline_ok=True): runs then go to the local backup "
            "folder and `acc-bluesky catalog replay BACKUP_DIR --tiled URI` loads them later; or record in the "
            "embedded catalogue with tiled=None."
        ) from err


def _redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if "api_key" not in parts.query:
        return uri
    query = urllib.parse.urlencode(
        [(k, "***" if k == "api_key" else v) for k, v in urllib.parse.parse_qsl(parts.query)]
    )
    return urllib.parse.urlunsplit(parts._replace(query=query))


def connect_tiled(uri: str, api_key: str | None = None, *, probe_timeout: float = 5.0) -> Any:
    """A Tiled client on a server, with errors that name the URI and say what to do.

    Args:
        uri: ``http(s)://host:port`` (optionally with ``/api/v1/metadata/PATH``).
        api_key: the server's API key; default ``$TILED_API_KEY`` (Tiled's convention).
        probe_timeout: seconds to wait for the server's first answer [s].
    """
    import httpx
    from tiled.client import from_uri

    _probe(uri, probe_timeout)
    try:
        return from_uri(uri, api_key=api_key)
    except httpx.HTTPStatusError as err:
        code = err.response.status_code
        if code in (401, 403):
            raise CatalogUnavailableError(
                f"The Tiled server at {_redact(uri)} refused the request (HTTP {code}): give a valid API key "
                "(api_key=... or $TILED_API_KEY)."
            ) from err
        raise CatalogUnavailableError(f"The Tiled server at {_redact(uri)} answered HTTP {code}: {err}") from err
    except httpx.TransportError as err:
        raise CatalogUnavailableError(f"Lost the Tiled server at {_redact(uri)}: {err!r}") from err
    except RuntimeError as err:  # Tiled: "This server requires API key authentication."
        raise CatalogUnavailableError(
            f"The Tiled server at {_redact(uri)} requires an API key: pass api_key=... or set $TILED_API_KEY."
        ) from err


def open_catalog(
    tiled: str | None = None,
    api_key: str | None = None,
    catalog_dir: str | os.PathLike | None = None,
) -> Any:
    """Open the catalogue of runs for analysis: ``cat[uid]`` is a run, ``cat[-1]`` the latest one.

    Args:
        tiled: URI of a Tiled server; default ``$ACC_BLUESKY_CATALOG`` if it is a URI, else the embedded
            catalogue.
        api_key: API key of the server (a read-only key is enough); default ``$TILED_API_KEY``.
        catalog_dir: folder of the embedded catalogue; default ``$ACC_BLUESKY_CATALOG`` or the user data folder.

    Returns:
        A Tiled container of runs (``CatalogOfBlueskyRuns`` for catalogues made here).
    """
    if tiled is None and catalog_dir is None:
        env = os.environ.get(ENV_CATALOG)
        if env and is_uri(env):
            tiled = env
    if tiled is not None:
        return connect_tiled(tiled, api_key)
    return _embedded_client(catalog_dir if catalog_dir is not None else default_catalog_dir())


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
        return run[stream]
    except KeyError:
        streams = sorted(run)
        raise KeyError(
            f"Run {run.metadata['start']['uid']} has no stream {stream!r}; its streams are {streams}"
        ) from None


def _column(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object and len(arr) and isinstance(arr[0], (list, tuple, np.ndarray)):
        return np.stack([np.asarray(v) for v in arr])  # small arrays kept in the event table
    if arr.dtype == object and len(arr) and isinstance(arr[0], str):
        return arr.astype(str)
    return arr


def stream_data_keys(run: Any, stream: str = "primary") -> dict[str, dict[str, Any]]:
    """The descriptor's data keys of a stream: per key ``units``, ``description``, ``shape``, ``dtype``, ..."""
    node = _stream_node(run, stream)
    return _plain(dict(node.metadata.get("data_keys", {})))


def read_stream(run: Any, stream: str = "primary") -> dict[str, np.ndarray]:
    """The data of a stream as arrays stacked over events (first axis: event), plus ``time`` [s, epoch].

    Scalars give shape ``(n_events,)``, arrays of shape S give ``(n_events, *S)``. Units are in
    :func:`stream_data_keys`. One request per part of the stream (its event table, each large array).
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
