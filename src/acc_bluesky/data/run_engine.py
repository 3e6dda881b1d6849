"""The RunEngine factory: every run recorded in Tiled, with FAIR metadata checked before the run opens."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import bluesky
from bluesky.run_engine import RunEngineResult

from .._compat.bluesky import TrustingRunBundler
from . import figures
from .backup import default_backup_dir
from .catalog import (
    ENV_CATALOG,
    MAX_TABLE_ARRAY_SIZE,
    CatalogUnavailableError,
    default_catalog_dir,
    is_uri,
)
from .client import connect_local, connect_tiled
from .metadata import (
    DEFAULT_LICENSE,
    ENV_LICENSE,
    FairFiller,
    make_md_validator,
    operator_name,
    software_versions,
)
from .recorder import CatalogWriter, EventArray, LocalTarget, RemoteTarget
from .wal import orphan_logs, recover

__all__ = ["CATALOG_COMMAND", "EventArray", "RunEngine", "RunResult", "make_run_engine"]

logger = logging.getLogger(__name__)

#: The RunEngine command a plan yields to get the catalogue its runs go to: ``cat = yield Msg("acc_catalog")``
#: (None when offline); every run recorded before is written by then.
CATALOG_COMMAND = "acc_catalog"


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
    """A bluesky RunEngine whose ``RE(plan)`` returns a :class:`RunResult` (with ``call_returns_result``) once the
    plan's runs are written in the catalogue.

    Extra attributes set by :func:`make_run_engine`: ``catalog`` (a Tiled client of the catalogue the runs go to,
    None while offline), ``recorder`` (the subscribed :class:`~acc_bluesky.data.recorder.CatalogWriter`),
    ``backup_dir``. A plan reaches the catalogue of the RunEngine it runs in with
    ``cat = yield Msg("acc_catalog")``.
    """

    #: The run bundlers compose events checking their keys against the descriptor, not the whole JSON schema
    #: (:mod:`acc_bluesky._compat.bluesky`: a third of an event's cost); descriptors are validated as before.
    RunBundler = TrustingRunBundler
    recorder: CatalogWriter | None = None
    backup_dir: pathlib.Path | None = None
    _catalog: Any = None
    #: Keep Python's full garbage collections off the objects that exist when a plan starts (``gc.freeze``),
    #: until it ends: a session holds a large heap (the lattice, the Tiled objects), which a full collection in
    #: the middle of a plan walks for ~0.3 s. Objects made during the plan are collected as usual.
    freeze_gc: bool = True
    #: ``RE(plan)`` returns once its runs are written in the catalogue (readable from any process) and their figures
    #: drawn. False: as soon as the plan ends (the runs are in the write-ahead log); then ``RE.wait_for_catalog()``
    #: before reading.
    wait_written: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._running_plan():
            return _as_run_result(super().__call__(*args, **kwargs))

    def resume(self) -> Any:
        with self._running_plan():
            return _as_run_result(super().resume())

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
        """A Tiled client of the catalogue the runs are written to (None while offline)."""
        if self._catalog is None and self.recorder is not None and self.recorder.client is not None:
            with contextlib.suppress(CatalogUnavailableError):
                self._catalog = self.recorder.target.connect()
        return self._catalog

    @property
    def tiled_recorder(self) -> CatalogWriter | None:
        """The recorder (former name)."""
        return self.recorder

    def wait_for_catalog(self, timeout: float | None = None) -> bool:
        """Wait until every run recorded so far is written in the catalogue (or backed up), and the figures of the
        tools' runs are drawn (:mod:`acc_bluesky.data.figures`: they are drawn while the writer writes). ``RE(plan)``
        does it before returning (``wait_written``). Returns False on timeout."""
        t0 = time.monotonic()
        drawn = figures.wait(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        written = True if self.recorder is None else self.recorder.wait(left)
        return drawn and written

    async def _catalog_command(self, msg: Any) -> Any:
        """``yield Msg("acc_catalog")``: the catalogue, once every run recorded before is written."""
        if self.recorder is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.recorder.wait)
        return self.catalog


def _as_run_result(result: Any) -> Any:
    return RunResult.from_result(result) if isinstance(result, RunEngineResult) else result


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
    context_managers: list[Any] | None = None,
    during_task: Any | None = None,
) -> RunEngine:
    """A bluesky RunEngine that records every run in a Tiled catalogue with FAIR metadata.

    Args:
        tiled: URI of a Tiled server (``http://host:port``, e.g. a team server). Default: ``$ACC_BLUESKY_CATALOG``
            if it is a URI, else the local catalogue folder ``catalog_dir`` (its Tiled server on loopback is
            started on demand and shared by every session of the machine: :mod:`acc_bluesky.data.local`).
        api_key: the server's API key; writing needs a read-write key (checked now: a read-only key raises
            :class:`~acc_bluesky.data.catalog.CatalogPermissionError` naming the URI and the missing scopes);
            default ``$TILED_API_KEY``. A local folder's key is its ``server.key``.
        md: persistent metadata merged into ``RE.md`` (and so into every start document).
        catalog_dir: the catalogue folder; default ``$ACC_BLUESKY_CATALOG`` or
            ``platformdirs.user_data_dir("acc_bluesky")/catalog``.
        backup_dir: where runs go when Tiled cannot take them (JSON Lines, one file per run); default
            ``$ACC_BLUESKY_BACKUP`` or ``user_data_dir/backup``. Replay with ``acc-bluesky catalog replay``.
        progress: show bluesky progress bars while the RunEngine waits on motion.
        call_returns_result: ``RE(plan)`` returns a :class:`RunResult` (a ``str``, the run uid, with the
            fields of bluesky's ``RunEngineResult``: ``plan_result``, ``run_start_uids``, ``exit_status``...).
            If False, bluesky's legacy tuple of run uids.
        validate: refuse runs whose start document lacks FAIR metadata
            (:func:`acc_bluesky.data.metadata.validate_metadata`, raised as ``MetadataError`` when the run
            opens, before anything inside the run moves). What a connected machine knows is filled in first
            (:func:`acc_bluesky.data.metadata.register_machine`).
        offline_ok: if the server cannot be reached now, still return a RunEngine: runs go to ``backup_dir``
            until the server answers again (tried at each new run). If False (default), raise
            :class:`~acc_bluesky.data.catalog.CatalogUnavailableError` naming the URI.
        batch_size: events a run's TiledWriter collects per stream before writing them (default: about 100, a
            divisor of the run's ``num_points`` when it has one near 100, so the last group is written with the last
            point, see :func:`~acc_bluesky.data.recorder.run_batch_size`; the rest at the run's end); 1 for live
            readers in other processes.
        max_array_size: arrays with more values than this are written as zarr arrays, smaller ones in the
            event table. Default 0 (every array as zarr).
        context_managers, during_task: passed to bluesky's RunEngine (defaults: bluesky's SIGINT handling and
            its matplotlib-aware waiting).

    Returns:
        A :class:`RunEngine` with a :class:`~acc_bluesky.data.recorder.CatalogWriter` subscribed, ``RE.catalog``
        a Tiled client (None while offline), ``RE.md_validator`` the FAIR validator and ``RE.waiting_hook`` a
        progress bar manager.

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
    if tiled is not None and not is_uri(tiled):
        tiled, catalog_dir = None, tiled
    backup = pathlib.Path(backup_dir).expanduser() if backup_dir is not None else default_backup_dir()
    target: LocalTarget | RemoteTarget
    if tiled is not None:
        uri = tiled
        target = RemoteTarget(uri, api_key, backup)

        def connect() -> Any:
            return connect_tiled(uri, api_key, require_write=True)
    else:
        target = LocalTarget(catalog_dir if catalog_dir is not None else default_catalog_dir())

        def connect() -> Any:
            return connect_local(target.root)

    try:
        client = connect()
    except CatalogUnavailableError as err:
        if not offline_ok or isinstance(err, PermissionError):
            raise
        logger.warning("%s -- recording to the backup folder %s until it answers", err, backup)
        client = None
    if client is not None and tiled is not None and orphan_logs(target.wal_dir):
        logger.warning("%s: %s", target, recover(target.wal_dir, client).summary())

    kwargs: dict[str, Any] = {"call_returns_result": call_returns_result}
    if context_managers is not None:
        kwargs["context_managers"] = context_managers
    if during_task is not None:
        kwargs["during_task"] = during_task
    RE = RunEngine(**kwargs)  # noqa: N806 - bluesky's name
    RE.md.setdefault("operator", operator_name())
    RE.md.setdefault("license", os.environ.get(ENV_LICENSE) or DEFAULT_LICENSE)
    RE.md.setdefault("software", software_versions())
    if md:
        RE.md.update(md)
    fill = FairFiller(strict=validate)
    RE.preprocessors.append(fill.preprocessor)
    RE.md_normalizer = fill
    if validate:
        RE.md_validator = make_md_validator(fill=fill)
    RE.register_command(CATALOG_COMMAND, RE._catalog_command)
    writer_client = None
    if client is not None:  # the writer thread's own client
        writer_client = target.connect() if tiled is None else connect_tiled(tiled, api_key)
    recorder = CatalogWriter(target, writer_client, backup, batch_size=batch_size, max_array_size=max_array_size)
    RE.recorder_token = RE.subscribe(recorder)
    RE.recorder = recorder
    RE._catalog = client
    RE.backup_dir = backup
    if progress:
        RE.waiting_hook = ProgressBarManager()
    return RE
