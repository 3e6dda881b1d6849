"""Clients of a catalogue: a Tiled server by URI (a team server), or a local catalogue folder (its on-demand server).

``open_catalog(PATH_OR_URI)`` is what analysis code calls; ``connect_tiled`` checks up front that a server answers
and, for recording, that the API key may write.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Any

from . import local
from .backup import default_backup_dir
from .catalog import (
    ENV_CATALOG,
    CatalogPermissionError,
    CatalogUnavailableError,
    catalog_paths,
    default_catalog_dir,
    is_uri,
    redact_uri,
)
from .wal import RecoveryReport, orphan_logs, remote_wal_dir
from .wal import recover as recover_logs

__all__ = [
    "WRITE_SCOPES", "close_catalog", "connect_local", "connect_tiled", "open_catalog", "probe", "recover_catalog",
]

logger = logging.getLogger(__name__)

#: Tiled scopes a key needs to record runs (create the run's nodes, write its data and its stop document).
WRITE_SCOPES: tuple[str, ...] = ("create:node", "write:metadata", "write:data")


def probe(uri: str, timeout: float) -> None:
    """Fail fast, without Tiled's retries, when nothing answers at ``uri``."""
    import httpx

    parts = urllib.parse.urlsplit(uri)
    health = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/healthz", "", ""))
    try:
        httpx.get(health, timeout=timeout, trust_env=False)
    except httpx.TransportError as err:
        raise CatalogUnavailableError(
            f"Cannot reach the Tiled server at {redact_uri(uri)} ({type(err).__name__}: {err}). Check the address "
            "and that the server runs (e.g. `acc-bluesky catalog serve --port PORT --api-key KEY`). To record "
            "while it is down, use make_run_engine(tiled=URI, offline_ok=True): runs then go to the local backup "
            "folder and `acc-bluesky catalog replay BACKUP_DIR --tiled URI` loads them later; or record in a "
            "local catalogue folder with catalog_dir=PATH."
        ) from err


def _check_write(client: Any, uri: str) -> None:
    """Raise :class:`CatalogPermissionError` if the key cannot record runs (read-only key)."""
    context = client.context
    links = getattr(context.server_info.authentication, "links", None)
    if not links:  # single-user mode: the one key does everything
        return
    try:
        info = context.which_api_key()
    except Exception as err:  # noqa: BLE001 - a server without API-key introspection: find out when writing
        logger.debug("could not list the scopes of the API key at %s: %r", uri, err)
        return
    scopes = set(info.get("scopes") or ())
    if "inherit" in scopes:  # the key has its principal's scopes
        roles = (info.get("principal") or {}).get("roles") or []
        scopes |= {s for role in roles for s in role.get("scopes", [])}
    missing = [s for s in WRITE_SCOPES if s not in scopes]
    if missing:
        raise CatalogPermissionError(
            f"The API key given for the Tiled server at {redact_uri(uri)} cannot record runs: it lacks the scope(s) "
            f"{', '.join(missing)} (it has {', '.join(sorted(scopes)) or 'none'}). A read-only key reads runs "
            "(open_catalog); to record, pass the server's read-write key (api_key=... or $TILED_API_KEY).",
            missing,
        )


def connect_tiled(uri: str, api_key: str | None = None, *, probe_timeout: float = 5.0,
                  require_write: bool = False) -> Any:
    """A Tiled client on a server, with errors that name the URI and say what to do.

    Args:
        uri: ``http(s)://host:port`` (optionally with ``/api/v1/metadata/PATH``).
        api_key: the server's API key; default ``$TILED_API_KEY`` (Tiled's convention).
        probe_timeout: seconds to wait for the server's first answer [s].
        require_write: also check that the key may record runs (:data:`WRITE_SCOPES`), else raise
            :class:`~acc_bluesky.data.catalog.CatalogPermissionError` naming the URI and the missing scopes.
    """
    import httpx
    from tiled.client import from_uri

    probe(uri, probe_timeout)
    try:
        client = from_uri(uri, api_key=api_key)
    except httpx.HTTPStatusError as err:
        code = err.response.status_code
        if code in (401, 403):
            raise CatalogUnavailableError(
                f"The Tiled server at {redact_uri(uri)} refused the request (HTTP {code}): give a valid API key "
                "(api_key=... or $TILED_API_KEY)."
            ) from err
        raise CatalogUnavailableError(f"The Tiled server at {redact_uri(uri)} answered HTTP {code}: {err}") from err
    except httpx.TransportError as err:
        raise CatalogUnavailableError(f"Lost the Tiled server at {redact_uri(uri)}: {err!r}") from err
    except RuntimeError as err:  # Tiled: "This server requires API key authentication."
        raise CatalogUnavailableError(
            f"The Tiled server at {redact_uri(uri)} requires an API key: pass api_key=... or set $TILED_API_KEY."
        ) from err
    if require_write:
        _check_write(client, uri)
    return client


def connect_local(directory: str | os.PathLike, *, recover: bool = True) -> Any:
    """A client of a local catalogue folder's server (started if none runs). With ``recover``, runs left open by
    a process that died are first completed from their write-ahead logs (:func:`acc_bluesky.data.wal.recover`)."""
    root = catalog_paths(directory)["root"]
    try:
        server = local.attach(root)
    except OSError as err:
        raise CatalogUnavailableError(
            f"Could not use the catalogue folder {root}: {err}. Check that the folder is writable, or choose another "
            f"one with catalog_dir=... or ${ENV_CATALOG}."
        ) from err
    client = connect_tiled(server.uri, server.api_key, probe_timeout=30.0)
    if recover and orphan_logs(root / "wal"):
        logger.warning("catalogue %s: %s", root, recover_logs(root / "wal", client).summary())
    return client


def open_catalog(
    tiled: str | os.PathLike | None = None,
    api_key: str | None = None,
    catalog_dir: str | os.PathLike | None = None,
) -> Any:
    """Open the catalogue of runs for analysis: ``cat[uid]`` is a run, ``cat[-1]`` the latest one.

    Args:
        tiled: URI of a Tiled server, or the path of a catalogue folder; default ``$ACC_BLUESKY_CATALOG``
            (either), else the default folder.
        api_key: API key of the server (a read-only key is enough); default ``$TILED_API_KEY``.
        catalog_dir: a catalogue folder (its local server is started if none runs).

    Returns:
        A Tiled container of runs (``CatalogOfBlueskyRuns``).
    """
    if tiled is not None and not is_uri(os.fspath(tiled)):
        tiled, catalog_dir = None, tiled
    if tiled is None and catalog_dir is None:
        env = os.environ.get(ENV_CATALOG)
        if env and is_uri(env):
            tiled = env
    if tiled is not None:
        return connect_tiled(os.fspath(tiled), api_key)
    return connect_local(catalog_dir if catalog_dir is not None else default_catalog_dir())


def close_catalog(catalog_dir: str | os.PathLike | None = None, *, stop: bool = True) -> None:
    """Stop being a user of a local catalogue folder's server (of every one this process uses if None) and, with
    ``stop``, stop that server unless another process uses it. The runs stay on disk; the next ``open_catalog``/
    ``make_run_engine`` (or a RunEngine of that folder recording again) starts it again. For test suites; at the end
    of a process the server stops by itself once idle. (``RE(plan)`` returns with its runs written; with
    ``RE.wait_written = False`` call ``RE.wait_for_catalog()`` first.)"""
    roots = local.attached() if catalog_dir is None else [catalog_paths(catalog_dir)["root"]]
    for root in roots:
        if stop:
            local.stop_server(root)
        else:
            local.detach(root)



def recover_catalog(
    catalog_dir: str | os.PathLike | None = None,
    tiled: str | None = None,
    api_key: str | None = None,
    backup_dir: str | os.PathLike | None = None,
) -> RecoveryReport:
    """Complete the runs whose writer died, from their write-ahead logs (``acc-bluesky catalog recover``): those of
    a local folder (the default one if neither is given), or those of the runs sent to the server ``tiled`` from
    this machine (in ``backup_dir``'s ``wal/``)."""
    if tiled is not None and not is_uri(tiled):
        catalog_dir, tiled = tiled, None
    if tiled is not None:
        backup = backup_dir if backup_dir is not None else default_backup_dir()
        return recover_logs(remote_wal_dir(backup, tiled), connect_tiled(tiled, api_key, require_write=True))
    root = catalog_paths(catalog_dir if catalog_dir is not None else default_catalog_dir())["root"]
    return recover_logs(root / "wal", connect_local(root, recover=False))
