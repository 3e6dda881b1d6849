"""Serve a catalogue folder over HTTP with a real Tiled server (``acc-bluesky catalog serve``).

The same code serves a team (a fixed port, ``--database postgresql://...``, read-only keys for analysts) and the
on-demand server of a local folder (``--port 0 --on-demand``: started by the first session that needs the folder,
see :mod:`acc_bluesky.data.local`).

Two authentication set-ups, both refusing anonymous requests:

* **one key** (``api_key`` only): Tiled's single-user mode; the key reads and writes.
* **a writer key and read-only keys** (``read_only_keys``): Tiled's multi-user mode. Tiled only gives scoped
  API keys to principals of an authentication database, so this module writes a Tiled configuration file
  (``<folder>/tiled-server.yml``: the catalogue, an authentication provider with no password users, a
  SQLite authentication database ``<folder>/authn.sqlite``) and registers the given keys in that database
  as two service principals: the writer key (scopes: read, write, create, delete, register) and each
  read-only key (scopes ``read:metadata``, ``read:data``). Keys are then hexadecimal strings, as Tiled's own
  (``python -c "import secrets; print(secrets.token_hex(32))"``). The same file also runs with
  ``tiled serve config <folder>/tiled-server.yml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from .catalog import (
    ROOT_SPEC,
    build_catalog_adapter,
    catalog_paths,
    init_catalog,
    init_sql_database,
    redact_uri,
    serialization_registry,
)
from .local import ServerBookkeeping, folder_api_key

__all__ = [
    "READ_ONLY_SCOPES",
    "WRITER_SCOPES",
    "ServerKeyError",
    "build_server_app",
    "serve_catalog",
    "write_server_config",
]

logger = logging.getLogger(__name__)

#: Scopes of a read-only (analyst) key.
READ_ONLY_SCOPES: tuple[str, ...] = ("read:metadata", "read:data")
#: Scopes of the writer key in multi-key mode.
WRITER_SCOPES: tuple[str, ...] = (
    "read:metadata",
    "read:data",
    "create:node",
    "write:metadata",
    "write:data",
    "delete:revision",
    "delete:node",
    "register",
    "metrics",
)
_KEY_NOTE = "acc-bluesky"
_CONFIG_NAME = "tiled-server.yml"
_AUTHN_NAME = "authn.sqlite"


class ServerKeyError(ValueError):
    """An API key that Tiled would not accept."""


def _check_keys(api_key: str, read_only_keys: Sequence[str]) -> None:
    how = 'Make one with: python -c "import secrets; print(secrets.token_hex(32))"'
    if not api_key.isalnum():
        raise ServerKeyError(f"The API key must be alphanumeric (Tiled's rule). {how}")
    if not read_only_keys:
        return
    for label, key in [("writer", api_key), *(("read-only", k) for k in read_only_keys)]:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) < 8:
            raise ServerKeyError(
                f"With read-only keys, Tiled needs every API key as hexadecimal, at least 16 hex digits; the "
                f"{label} key is not. {how}"
            )
    if api_key in read_only_keys:
        raise ServerKeyError("The writer key and a read-only key are the same")


def write_server_config(
    directory: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    database: str | None = None,
) -> pathlib.Path:
    """Write ``<folder>/tiled-server.yml`` (multi-key mode) and return its path. Mode 0600: it holds the
    token-signing secret."""
    import yaml

    paths = catalog_paths(directory)
    config = {
        "trees": [
            {
                "path": "/",
                "tree": "catalog",
                "args": {
                    "uri": database or f"sqlite:///{paths['catalog']}",
                    "writable_storage": [str(paths["data"]), database or f"sqlite:///{paths['tables']}"],
                    "specs": [{"name": ROOT_SPEC[0], "version": ROOT_SPEC[1]}],
                },
            }
        ],
        "authentication": {
            "providers": [
                {
                    # Required by Tiled for scoped API keys; it has no users: only the API keys work.
                    "provider": "local",
                    "authenticator": "tiled.authenticators:DictionaryAuthenticator",
                    "args": {"users_to_passwords": {}},
                }
            ],
            "secret_keys": [secrets.token_hex(32)],
            "allow_anonymous_access": False,
        },
        "database": {"uri": f"sqlite:///{paths['root'] / _AUTHN_NAME}", "init_if_not_exists": True},
        "media_types": {
            "BlueskyRun": {"application/json-seq": "bluesky_tiled_plugins.exporters:json_seq_exporter"}
        },
        "uvicorn": {"host": host, "port": port},
    }
    path = paths["root"] / _CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Written by acc-bluesky catalog serve. API keys live (hashed) in the authn database.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def _run_in_thread(fn: Any, *args: Any) -> Any:
    result: list[Any] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn(*args))
        except BaseException as err:
            error.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0] if result else None


def _register_keys(authn_uri: str, api_key: str, read_only_keys: Sequence[str]) -> None:
    """Initialise the authentication database if needed and (re)register our keys in it."""
    import asyncio

    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from tiled.authn_database import orm
    from tiled.authn_database.core import create_service
    from tiled.utils import ensure_specified_sql_driver

    uri = ensure_specified_sql_driver(authn_uri)
    init_sql_database(uri, "authn")

    async def register() -> None:
        engine = create_async_engine(uri)
        try:
            async with AsyncSession(engine, expire_on_commit=False) as db:
                old = (
                    (await db.execute(select(orm.APIKey).filter(orm.APIKey.note.like(f"{_KEY_NOTE}%"))))
                    .unique()
                    .scalars()
                    .all()
                )
                principals = {k.principal_id for k in old}
                for key in old:
                    await db.delete(key)
                await db.commit()
                for pid in principals:  # services created for our keys only
                    principal = await db.get(orm.Principal, pid)
                    if principal is not None:
                        await db.delete(principal)
                await db.commit()
                for role, note, scopes, keys in (
                    ("admin", f"{_KEY_NOTE} writer", WRITER_SCOPES, [api_key]),
                    ("user", f"{_KEY_NOTE} read-only", READ_ONLY_SCOPES, list(read_only_keys)),
                ):
                    principal = await create_service(db, role)
                    for key in keys:
                        secret = bytes.fromhex(key)
                        db.add(
                            orm.APIKey(
                                first_eight=secret.hex()[:8],
                                hashed_secret=hashlib.sha256(secret).digest(),
                                principal_id=principal.id,
                                scopes=list(scopes),
                                note=note,
                            )
                        )
                    await db.commit()
        finally:
            await engine.dispose()

    asyncio.run(register())


def build_server_app(
    directory: str | os.PathLike,
    *,
    api_key: str,
    read_only_keys: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    database: str | None = None,
) -> Any:
    """The Tiled ASGI application serving a catalogue folder (created if needed), refusing anonymous use.

    ``database``: a ``postgresql://`` URI holding the tree of runs and the event tables (arrays stay in the
    folder's ``data/``); default the folder's SQLite files."""
    from tiled.config import Authentication

    _check_keys(api_key, read_only_keys)
    root = init_catalog(directory) if database is None else catalog_paths(directory)["root"]
    if not read_only_keys:
        from tiled.server.app import build_app

        adapter = build_catalog_adapter(root, database=database, streaming_cache=True)
        return build_app(
            adapter,
            authentication=Authentication(single_user_api_key=api_key, allow_anonymous_access=False),
            serialization_registry=serialization_registry(),
        )
    from tiled.config import parse_configs
    from tiled.server.app import build_app_from_config

    if database is not None:
        _run_in_thread(init_sql_database, database, "catalog")
    config_path = write_server_config(root, host=host, port=port, database=database)
    _run_in_thread(_register_keys, f"sqlite:///{root / _AUTHN_NAME}", api_key, list(read_only_keys))
    return build_app_from_config(parse_configs(config_path))


def serve_catalog(
    directory: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    read_only_keys: Sequence[str] = (),
    database: str | None = None,
    log_level: str = "warning",
    on_demand: bool = False,
    idle_timeout: float | None = None,
    ready_fd: int | None = None,
) -> None:
    """Serve a catalogue folder until interrupted (Ctrl-C or SIGTERM), or idle (``on_demand``). Blocks.

    Args:
        directory: the catalogue folder (created if needed).
        host: interface to listen on; keep 127.0.0.1 unless the network is trusted and firewalled.
        port: TCP port; 0 picks a free one (printed, and written to ``server.json`` with ``on_demand``).
        api_key: the read-write key; default ``$TILED_SINGLE_USER_API_KEY``, with ``on_demand`` the folder's
            ``server.key``, else a random one (printed).
        read_only_keys: keys that can only read (analysts); needs hexadecimal keys (see module docs).
        database: ``postgresql://user@host:port/db`` for the tree of runs and the event tables (team scale);
            default the folder's SQLite files.
        log_level: uvicorn log level.
        on_demand: the local server of a folder: publish the address in ``server.json``, hold ``server.alive``,
            stop after ``idle_timeout`` seconds without users (see :mod:`acc_bluesky.data.local`).
        idle_timeout: with ``on_demand`` [s]; None: never.
        ready_fd: a file descriptor to write ``ready URI`` to once the server listens (then closed).
    """
    import socket

    import uvicorn

    root = catalog_paths(directory)["root"]
    generated = False
    if api_key is None:
        api_key = os.environ.get("TILED_SINGLE_USER_API_KEY")
    if api_key is None:
        if on_demand:
            api_key = folder_api_key(root)
        else:
            generated, api_key = True, secrets.token_hex(32)
    book = ServerBookkeeping(root, idle_timeout) if on_demand else None
    from .._compat.tiled import direct_path_lookup, memoize_fastapi_dependants, reuse_node_aliases

    if not memoize_fastapi_dependants():  # this process only serves: ~40 % less CPU per request
        logger.info("FastAPI's dependency trees are rebuilt per request (no memo for this FastAPI)")
    if not reuse_node_aliases():
        logger.info("Tiled's node lookups make new table aliases per request (no reuse for this Tiled)")
    if not direct_path_lookup():
        logger.info("Tiled looks a request's path up one segment at a time (no direct lookup for this Tiled)")
    try:
        if book is not None:
            book.acquire()
        app = build_server_app(root, api_key=api_key, read_only_keys=read_only_keys, host=host, port=port,
                               database=database)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            if not (on_demand and port):
                raise
            sock.bind((host, 0))  # the port of a previous server of the folder is taken: any free one
        sock.listen(1024)
        port = sock.getsockname()[1]
        uri = f"http://{host}:{port}"
        if book is not None:
            app = book.track(app)
            book.publish(uri)
        where = f" (database {redact_uri(database)})" if database else ""
        print(f"acc-bluesky: serving the catalogue {root}{where} at {uri}", flush=True)
        if generated:
            print(f"acc-bluesky: API key (read-write): {api_key}", flush=True)
        if read_only_keys:
            print(f"acc-bluesky: {len(read_only_keys)} read-only key(s); config {root / _CONFIG_NAME}", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        if book is not None:
            book.watch_idle(server)
    except BaseException as err:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"error {err!r}\n".encode())
                os.close(ready_fd)
        if book is not None:
            book.close()
        raise
    if ready_fd is not None:
        os.write(ready_fd, f"ready {uri}\n".encode())
        os.close(ready_fd)
    try:
        server.run(sockets=[sock])
    finally:
        if book is not None:
            book.close()
