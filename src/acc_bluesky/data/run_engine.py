"""The RunEngine factory: every run recorded in Tiled, with FAIR metadata checked before the run opens."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import bluesky
import numpy as np
from bluesky.run_engine import RunEngineResult
from event_model import RunRouter

from .backup import BackupStore, BackupWriter, default_backup_dir
from .catalog import (
    ENV_CATALOG,
    MAX_TABLE_ARRAY_SIZE,
    CatalogUnavailableError,
    _embedded_client,
    _probe,
    catalog_paths,
    connect_tiled,
    default_catalog_dir,
    is_uri,
)
from .metadata import (
    DEFAULT_LICENSE,
    ENV_LICENSE,
    make_md_validator,
    operator_name,
    software_versions,
)
from .writer import WriterProcessRecorder

__all__ = ["EventArray", "RunEngine", "RunResult", "TiledRecorder", "make_run_engine"]

logger = logging.getLogger(__name__)


class RunResult(str):
    """What ``RE(plan)`` returns: the uid of the run the plan recorded, as a ``str``, carrying the fields of
    bluesky's :class:`~bluesky.run_engine.RunEngineResult` as attributes.

    The uid is the plan's return value when the plan returns one of its runs' uids (the convention of the
    plans of this project), else the uid of the last run the plan opened, else ``""``. So both
    ``uid = RE(plan)`` then ``cat[uid]``, and ``RE(plan).plan_result`` / ``.run_start_uids`` work.
    """

    run_start_uids: tuple[str, ...]
    plan_result: Any
    exit_status: str
    interrupted: bool
    reason: str
    exception: BaseException | None

    def __new__(
        cls,
        uid: str = "",
        *,
        run_start_uids: tuple[str, ...] = (),
        plan_result: Any = None,
        exit_status: str = "success",
        interrupted: bool = False,
        reason: str = "",
        exception: BaseException | None = None,
    ) -> RunResult:
        self = super().__new__(cls, uid)
        self.run_start_uids = tuple(run_start_uids)
        self.plan_result = plan_result
        self.exit_status = exit_status
        self.interrupted = interrupted
        self.reason = reason
        self.exception = exception
        return self

    @classmethod
    def from_result(cls, result: RunEngineResult) -> RunResult:
        uids = tuple(result.run_start_uids)
        if isinstance(result.plan_result, str) and result.plan_result in uids:
            uid = result.plan_result
        else:
            uid = uids[-1] if uids else ""
        return cls(
            uid,
            run_start_uids=uids,
            plan_result=result.plan_result,
            exit_status=result.exit_status,
            interrupted=result.interrupted,
            reason=result.reason,
            exception=result.exception,
        )

    @property
    def uid(self) -> str:
        """The run uid as a plain ``str``."""
        return str.__str__(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_run_result, (str(self), self.run_start_uids, self.exit_status))


def _rebuild_run_result(uid: str, run_start_uids: tuple[str, ...], exit_status: str) -> RunResult:
    return RunResult(uid, run_start_uids=run_start_uids, exit_status=exit_status)


class RunEngine(bluesky.RunEngine):
    """A bluesky RunEngine whose ``RE(plan)`` returns a :class:`RunResult` when ``call_returns_result``.

    Extra attributes set by :func:`make_run_engine`: ``catalog`` (the Tiled client the runs go to, or None
    when offline), ``tiled_recorder`` (the subscribed :class:`TiledRecorder`, or for an embedded catalogue the
    :class:`~acc_bluesky.data.writer.WriterProcessRecorder`), ``backup_dir``.
    """

    tiled_recorder: TiledRecorder | WriterProcessRecorder | None = None
    backup_dir: pathlib.Path | None = None
    #: Keep Python's full garbage collections off the objects that exist when a plan starts (``gc.freeze``),
    #: until it ends: a session holds a large heap (the lattice, the Tiled and FastAPI objects), which a full
    #: collection in the middle of a plan walks for ~0.3 s. Objects made during the plan are collected as usual.
    freeze_gc: bool = True
    #: ``RE(plan)`` returns only once its runs are written in the catalogue (readable from other processes too),
    #: not only handed to the writer process: for services whose clients read the catalogue as soon as they hear
    #: the plan ended (the queue server's worker).
    wait_written: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._running_plan():
            return super().__call__(*args, **kwargs)

    def resume(self) -> Any:
        with self._running_plan():
            return super().resume()

    @contextlib.contextmanager
    def _running_plan(self) -> Iterator[None]:
        """Around a plan's execution: the heap frozen (``freeze_gc``), then the runs written (``wait_written``)."""
        try:
            with _gc_frozen(self.freeze_gc):
                yield
        finally:
            if self.wait_written:
                self.wait_for_catalog()

    @property
    def catalog(self) -> Any:
        """The Tiled client the runs are written to (None while offline)."""
        return None if self.tiled_recorder is None else self.tiled_recorder.client

    def wait_for_catalog(self, timeout: float | None = None) -> None:
        """Wait until every run recorded so far is written in the catalogue (or backed up). Reads from this
        process wait by themselves; this is for other processes' readers (a Tiled server of the same folder)."""
        wait = getattr(self.tiled_recorder, "wait", None)
        if wait is not None:
            wait(timeout)

    def _create_result(self, plan_return: Any) -> RunResult:
        return RunResult.from_result(super()._create_result(plan_return))


@contextlib.contextmanager
def _gc_frozen(enabled: bool) -> Iterator[None]:
    if not enabled or gc.get_freeze_count():  # off, or frozen already (by the user, or an outer call)
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TiledRecorder:
    """Document callback: writes each run to Tiled with a :class:`~bluesky_tiled_plugins.TiledWriter`.

    If writing fails (server down, disk full), the whole run (from its start document on) goes to the backup
    folder instead (the TiledWriter's own fallback, with a numpy-aware :class:`BackupStore`). When a run
    starts, ``check`` (if given) asks whether the server still answers, and ``connect`` is tried again if no
    catalogue is connected; failing either, the run goes straight to the backup.
    """

    def __init__(
        self,
        client: Any | None,
        backup_dir: str | os.PathLike,
        *,
        connect: Callable[[], Any] | None = None,
        check: Callable[[], None] | None = None,
        batch_size: int | None = None,
        max_array_size: int = MAX_TABLE_ARRAY_SIZE,
    ) -> None:
        self.backup_dir = pathlib.Path(backup_dir).expanduser()
        self.backup_store = BackupStore(self.backup_dir)
        self._connect = connect
        self._check = check
        self._writer_kwargs: dict[str, Any] = {"max_array_size": max_array_size}
        if batch_size is not None:
            self._writer_kwargs["batch_size"] = batch_size
        self._lock = threading.Lock()
        self.client: Any | None = None
        self.writer: Any | None = None
        if client is not None:
            self._set_client(client)
        self._router = RunRouter([self._factory])

    def _set_client(self, client: Any) -> None:
        from bluesky_tiled_plugins import TiledWriter

        self.client = client
        self.writer = TiledWriter(client, backup_dictionary=self.backup_store, **self._writer_kwargs)

    def _factory(self, name: str, doc: dict[str, Any]) -> tuple[list[Callable], list[Any]]:
        with self._lock:
            try:
                if self.writer is None and self._connect is not None:
                    self._set_client(self._connect())
                    logger.info("Reconnected to the Tiled catalogue")
                elif self.writer is not None and self._check is not None:
                    self._check()  # a server that went away: back up at once, not after Tiled's retries
                online = self.writer is not None
            except CatalogUnavailableError as err:
                logger.warning("%s", err)
                online = False
        if not online:
            return [BackupWriter(self.backup_dir)], []
        return [self.writer], []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, plain_document(name, doc))


def plain_document(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """An event (page) with its numpy values as the writer takes them best (:func:`_plain`); others unchanged."""
    if name == "event":
        return {**doc, "data": {k: _plain(v) for k, v in doc["data"].items()}}
    if name == "event_page":
        return {**doc, "data": {k: [_plain(v) for v in vs] for k, vs in doc["data"].items()}}
    return doc


class EventArray(np.ndarray):
    """A numpy array that prints short, for event data.

    The TiledWriter validates every document against the event-model JSON schema, whose failing branches format
    (``repr``) each value: ~5 ms per event with two 448-value numpy arrays. Lists avoid that, but the writer then
    deep-copies each event float by float (~3 ms). This view is cheap for both (validation ~0.2 ms, copy ~0.01 ms);
    consumers see a numpy array with the same values.
    """

    def __repr__(self) -> str:
        return f"<array {self.shape} {self.dtype}>"

    __str__ = __repr__


def _plain(value: Any) -> Any:
    """numpy arrays as :class:`EventArray` views (no copy) and numpy scalars as Python numbers, for the writer."""
    if isinstance(value, np.ndarray):
        return value if type(value) is EventArray else value.view(EventArray)
    if isinstance(value, np.generic):
        return value.item()
    return value


def make_run_engine(
    tiled: str | None = None,
    api_key: str | None = None,
    md: dict[str, Any] | None = None,
    *,
    catalog_dir: str | os.PathLike | None = None,
    backup_dir: str | os.PathLike | None = None,
    progress: bool = True,
    call_returns_result: bool = True,
    validate: bool = True,
    offline_ok: bool = False,
    batch_size: int | None = None,
    max_array_size: int = MAX_TABLE_ARRAY_SIZE,
    writer: str | None = None,
    context_managers: list[Any] | None = None,
    during_task: Any | None = None,
) -> RunEngine:
    """A bluesky RunEngine that records every run in a Tiled catalogue with FAIR metadata.

    Args:
        tiled: URI of a Tiled server (``http://host:port``). Default: ``$ACC_BLUESKY_CATALOG`` if it is a URI,
            else the embedded catalogue (SQLite + files, in-process, no server) in ``catalog_dir``.
        api_key: the server's API key (writing needs a read-write key); default ``$TILED_API_KEY``.
        md: persistent metadata merged into ``RE.md`` (and so into every start document).
        catalog_dir: folder of the embedded catalogue; default ``$ACC_BLUESKY_CATALOG`` or
            ``platformdirs.user_data_dir("acc_bluesky")/catalog``.
        backup_dir: where runs go when Tiled cannot take them (JSON Lines, one file per run); default
            ``$ACC_BLUESKY_BACKUP`` or ``user_data_dir/backup``. Replay with ``acc-bluesky catalog replay``.
        progress: show bluesky progress bars while the RunEngine waits on motion.
        call_returns_result: ``RE(plan)`` returns a :class:`RunResult` (a ``str``, the run uid, with the
            fields of bluesky's ``RunEngineResult``: ``plan_result``, ``run_start_uids``, ``exit_status``...).
            If False, bluesky's legacy tuple of run uids.
        validate: refuse runs whose start document lacks FAIR metadata
            (:func:`acc_bluesky.data.metadata.validate_metadata`, raised as ``MetadataError`` when the run
            opens, before anything inside the run moves).
        offline_ok: if the server cannot be reached now, still return a RunEngine: runs go to ``backup_dir``
            until the server answers again (tried at each new run). If False (default), raise
            :class:`~acc_bluesky.data.catalog.CatalogUnavailableError` naming the URI.
        batch_size: with ``writer="inline"``, events the TiledWriter collects before writing (default the
            plugin's, 10000: events are written at the end of the run); use 1 for live readers. The writer process
            writes events as they come, in the groups that queued up meanwhile.
        max_array_size: arrays with more values than this are written as zarr arrays, smaller ones in the
            event table. Default 0 (every array as zarr): the SQLite event tables cannot hold lists.
        writer: ``"process"`` (default for the embedded catalogue): a child process writes the runs while the plans
            go on; reads from this process wait for it, so ``cat[uid]`` right after ``uid = RE(plan)`` is the
            complete run (see :mod:`acc_bluesky.data.writer`; ``RE.wait_for_catalog()`` for other processes).
            ``"inline"`` (default, and the only choice, for a Tiled server): the TiledWriter runs in the RunEngine's
            thread and ``RE(plan)`` returns with the run written.
        context_managers, during_task: passed to bluesky's RunEngine (defaults: bluesky's SIGINT handling and
            its matplotlib-aware waiting).

    Returns:
        A :class:`RunEngine` with a :class:`TiledRecorder` subscribed, ``RE.catalog`` the Tiled client (None
        while offline), ``RE.md_validator`` the FAIR validator and ``RE.waiting_hook`` a progress bar manager.

    Example::

        RE = make_run_engine()
        uid = RE(measure_orm(m))                       # plans return their run uid
        RE.catalog[uid].metadata["start"]["tool"]      # 'orbit_response'
    """
    from bluesky.utils import ProgressBarManager

    if tiled is None and catalog_dir is None:
        env = os.environ.get(ENV_CATALOG)
        if env and is_uri(env):
            tiled = env
    backup = pathlib.Path(backup_dir).expanduser() if backup_dir is not None else default_backup_dir()
    if writer is None:
        writer = "inline" if tiled is not None else "process"
    if writer not in ("process", "inline"):
        raise ValueError(f"writer must be 'process' or 'inline', got {writer!r}")
    if writer == "process" and tiled is not None:
        raise ValueError("writer='process' writes embedded catalogues only; a Tiled server is written inline")

    connect: Callable[[], Any]
    check: Callable[[], None] | None = None
    if tiled is not None:
        uri = tiled

        def connect() -> Any:
            return connect_tiled(uri, api_key)

        def check() -> None:
            _probe(uri, timeout=2.0)

    else:
        directory = catalog_paths(catalog_dir if catalog_dir is not None else default_catalog_dir())["root"]

        def connect() -> Any:
            return _embedded_client(directory)

    try:
        client = connect()
    except CatalogUnavailableError as err:
        if not offline_ok:
            raise
        logger.warning("%s -- recording to the backup folder %s until it answers", err, backup)
        client = None

    kwargs: dict[str, Any] = {"call_returns_result": call_returns_result}
    if context_managers is not None:
        kwargs["context_managers"] = context_managers
    if during_task is not None:
        kwargs["during_task"] = during_task
    RE = RunEngine(**kwargs)
    RE.md.setdefault("operator", operator_name())
    RE.md.setdefault("license", os.environ.get(ENV_LICENSE) or DEFAULT_LICENSE)
    RE.md.setdefault("software", software_versions())
    if md:
        RE.md.update(md)
    if validate:
        RE.md_validator = make_md_validator()

    def inline() -> TiledRecorder:
        return TiledRecorder(client, backup, connect=connect, check=check, batch_size=batch_size,
                             max_array_size=max_array_size)

    recorder: TiledRecorder | WriterProcessRecorder
    if writer == "process" and client is not None:
        recorder = WriterProcessRecorder(directory, client, backup, max_array_size=max_array_size, fallback=inline)
    else:
        recorder = inline()
    RE.subscribe(recorder)
    RE.tiled_recorder = recorder
    RE.backup_dir = backup
    if progress:
        RE.waiting_hook = ProgressBarManager()
    return RE
