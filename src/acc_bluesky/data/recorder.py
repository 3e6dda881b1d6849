"""The RunEngine's document callback: write-ahead log, then bluesky-tiled-plugins' public ``TiledWriter`` in a thread.

``CatalogWriter(name, doc)`` runs in the RunEngine's thread and only (1) appends the document to the run's
write-ahead log (:mod:`.wal`, one ``write`` per document) and (2) puts it in a queue: the RunEngine never waits on
HTTP. A writer thread takes the documents in order and hands each run to its own ``TiledWriter`` (the public class,
one per run), which writes the events in groups of ``batch_size`` (by default fitted to the run's ``num_points``:
:func:`run_batch_size`) and the rest at the stop document. The Tiled
server is another process (the folder's local server, or a team server), so the writing costs this process little.

When a write fails (the server was killed, restarted, or refused a request) the writer connects again (a local
folder's server is started again by then, :mod:`.local`), deletes the run's partial copy and writes the whole run
again from memory; if that fails too, the run goes to the backup folder (a warning names the file). Once a run is
in the catalogue with its stop document (or in the backup folder) its log is deleted.

:meth:`CatalogWriter.wait` waits until everything recorded so far is written: ``RE(plan)`` calls it before it
returns, so ``cat[uid]`` right after ``uid = RE(plan)`` is the complete run, from this process or any other.
"""

from __future__ import annotations

import logging
import os
import pathlib
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import local
from .backup import BackupWriter, lookup_run
from .catalog import (
    MAX_TABLE_ARRAY_SIZE,
    CatalogUnavailableError,
    catalog_paths,
    redact_uri,
)
from .client import connect_local, connect_tiled, probe
from .wal import WriteAheadLog, remote_wal_dir

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CatalogWriter",
    "EventArray",
    "LocalTarget",
    "RemoteTarget",
    "plain_document",
    "run_batch_size",
]

logger = logging.getLogger(__name__)

#: Events a run's TiledWriter collects per stream before writing them (the rest go at the stop document). Live
#: readers of another process see a run grow in such groups; 1 writes every event at once.
DEFAULT_BATCH_SIZE = 100
#: Seconds between two wake-ups of the writer thread while documents come (at once when someone waits for it).
WAKE_PERIOD = 0.1
#: Attempts to write a run again (whole, from memory) after a failed write, before it goes to the backup folder.
RETRIES = 2


class LocalTarget:
    """Runs go to a local catalogue folder, through its on-demand server."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.root = catalog_paths(directory)["root"]
        self.wal_dir = self.root / "wal"

    def connect(self) -> Any:
        self._uri = local.attach(self.root).uri
        return connect_local(self.root, recover=False)

    def check(self) -> bool:
        """Before each run: the server still lives (else it is started again). True if its address changed."""
        return local.attach(self.root).uri != getattr(self, "_uri", None)

    def __str__(self) -> str:
        return f"the catalogue folder {self.root}"


class RemoteTarget:
    """Runs go to a Tiled server by URI (e.g. a team server)."""

    def __init__(self, uri: str, api_key: str | None, backup_dir: str | os.PathLike) -> None:
        self.uri = uri
        self.api_key = api_key
        self.wal_dir = remote_wal_dir(backup_dir, uri)

    def connect(self) -> Any:
        return connect_tiled(self.uri, self.api_key, probe_timeout=2.0)

    def check(self) -> bool:
        """Before each run: the server answers (a server gone between runs: backed up at once, not after Tiled's
        45 s of retries)."""
        probe(self.uri, 2.0)
        return False

    def __str__(self) -> str:
        return f"the Tiled server at {redact_uri(self.uri)}"


class _Run:
    __slots__ = ("backup", "docs", "num_points", "uid", "writer")

    def __init__(self, uid: str, num_points: Any = None) -> None:
        self.uid = uid
        self.num_points = num_points  # the start document's (the batch size of its writer)
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self.writer: Callable[[str, dict[str, Any]], None] | None = None
        self.backup: BackupWriter | None = None


class _RunIndex:
    """Which run a document belongs to (events through their descriptor)."""

    def __init__(self) -> None:
        self._descriptors: dict[str, str] = {}

    def run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        if name == "start":
            return doc["uid"]
        if name == "descriptor":
            self._descriptors[doc["uid"]] = doc["run_start"]
            return doc["run_start"]
        if name in ("event", "event_page"):
            return self._descriptors.get(doc["descriptor"])
        if name == "stop":
            uid = doc["run_start"]
            self._descriptors = {d: r for d, r in self._descriptors.items() if r != uid}
            return uid
        return doc.get("run_start")  # resources; stream resources and datums carry no run uid


class CatalogWriter:
    """Document callback subscribed by :func:`~acc_bluesky.data.make_run_engine` (see the module docs).

    Attributes: ``target`` (where runs go), ``client`` (the writer thread's Tiled client, None while offline),
    ``backup_dir``, ``wal`` (the :class:`~acc_bluesky.data.wal.WriteAheadLog`).
    """

    def __init__(self, target: LocalTarget | RemoteTarget, client: Any | None, backup_dir: str | os.PathLike, *,
                 batch_size: int | None = None, max_array_size: int = MAX_TABLE_ARRAY_SIZE) -> None:
        self.target = target
        self.client = client
        self.backup_dir = pathlib.Path(backup_dir).expanduser()
        self.wal = WriteAheadLog(target.wal_dir)
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
        self._align = batch_size is None  # the default: groups fitted to each run's num_points (run_batch_size)
        self.max_array_size = max_array_size
        self._index = _RunIndex()
        self._runs: dict[str, _Run] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._queued = 0
        self._done = 0
        self._warnings: list[str] = []
        self._hurry = threading.Event()
        self._sources: Any = None  # client.include_data_sources() of the client it was made from
        self._sources_of: Any = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="acc-bluesky-catalog-writer")
        self._thread.start()

    # -- the RunEngine's thread ----------------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        uid = self._index.run_of(name, doc)
        self.wal.append(uid, name, doc)
        with self._cond:
            self._queued += 1
        self._queue.put((uid, name, plain_document(name, doc)))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every document recorded so far is written (or backed up); warn (in the calling thread)
        about runs that went to the backup folder. Returns False on timeout."""
        self._hurry.set()
        with self._cond:
            target = self._queued
            ok = self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)
            pending, self._warnings = self._warnings, []
        for message in pending:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return ok

    @property
    def pending(self) -> int:
        """Documents recorded but not written yet."""
        with self._cond:
            return self._queued - self._done

    # -- the writer thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        # Takes what queued up at most every WAKE_PERIOD (at once when someone waits): a thread that woke for every
        # document would take the GIL from the plan's thread hundreds of times a second.
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for uid, name, doc in items:
                try:
                    self._handle(uid, name, doc)
                except Exception:  # noqa: BLE001 - never let the thread die: the log keeps the run
                    logger.exception("catalogue writer: the %s document of run %s failed", name, uid)
            with self._cond:
                self._done += len(items)
                self._cond.notify_all()
            self._hurry.wait(WAKE_PERIOD)
            self._hurry.clear()

    def _handle(self, uid: str | None, name: str, doc: dict[str, Any]) -> None:
        if uid is None:
            logger.warning("catalogue writer: a %s document of no known run is not written", name)
            return
        run = self._runs.get(uid)
        if run is None:
            run = self._runs[uid] = _Run(uid, doc.get("num_points") if name == "start" else None)
            self._open(run)
        run.docs.append((name, doc))
        if run.writer is not None:
            try:
                run.writer(name, doc)
            except Exception as err:  # noqa: BLE001 - any failure: write the whole run again, else back it up
                self._rewrite(run, err)
        elif run.backup is not None:
            run.backup(name, doc)
        if name == "stop":
            del self._runs[uid]
            self.wal.close(uid, delete=True)

    def _tiled_writer(self, client: Any, run: _Run) -> Callable[[str, dict[str, Any]], None]:
        from bluesky_tiled_plugins import TiledWriter

        size = run_batch_size(run.num_points, self.batch_size) if self._align else self.batch_size
        # the writer's variation of the client (data sources included) fetched once per connection, not per run:
        # TiledWriter asks for it at every run otherwise (one more request in every run's wait)
        if self._sources_of is not client:
            self._sources, self._sources_of = client.include_data_sources(), client
        return TiledWriter(self._sources, normalizer=_normalizer_class(), batch_size=size,
                           max_array_size=self.max_array_size)

    def _connect(self) -> Any:
        self.client = self.target.connect()
        return self.client

    def _open(self, run: _Run) -> None:
        client = self.client
        try:
            if client is None:
                client = self._connect()
            elif self.target.check():
                client = self._connect()
        except CatalogUnavailableError as err:
            self.client = None
            self._to_backup(run, f"{self.target} is unreachable ({err})")
            return
        run.writer = self._tiled_writer(client, run)

    def _rewrite(self, run: _Run, err: BaseException) -> None:
        last: BaseException = err
        for attempt in range(RETRIES):
            logger.warning("writing run %s to %s failed (%r): writing it again (%d/%d)", run.uid, self.target,
                           last, attempt + 1, RETRIES)
            try:
                client = self._connect()
                existing = lookup_run(client, run.uid)
                if existing is not None:
                    existing.delete(recursive=True, external_only=False)
                writer = self._tiled_writer(client, run)
                for name, doc in run.docs:
                    writer(name, doc)
            except Exception as again:  # noqa: BLE001
                last = again
                continue
            run.writer = writer
            return
        self.client = None  # try again at the next run
        self._to_backup(run, f"{self.target} could not take it ({last!r})")

    def _to_backup(self, run: _Run, why: str) -> None:
        run.writer = None
        run.backup = BackupWriter(self.backup_dir)
        for name, doc in run.docs:
            run.backup(name, doc)
        message = (f"Run {run.uid} was not written to the catalogue: {why}. Its documents are backed up in "
                   f"{self.backup_dir / (run.uid + '.jsonl')}; load them later with "
                   f"`acc-bluesky catalog replay {self.backup_dir}`.")
        logger.warning("%s", message)
        with self._cond:
            self._warnings.append(message)


def run_batch_size(num_points: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """The batch size of a run announcing ``num_points`` events: a divisor of ``num_points`` within a factor 2 of
    ``batch_size`` (the closest), so the last group is written when the last point arrives -- while the plan
    stores its results and draws its figures -- instead of at the stop document, when ``RE(plan)`` waits for it.
    ``num_points`` up to ``batch_size``: the whole stream at its last point. Otherwise ``batch_size``."""
    try:
        n = int(num_points)
    except (TypeError, ValueError):
        return batch_size
    if n < 1:
        return batch_size
    if n <= batch_size:
        return n
    fits = [s for s in range(max(1, batch_size // 2), 2 * batch_size + 1) if n % s == 0]
    return min(fits, key=lambda s: (abs(s - batch_size), s)) if fits else batch_size


_NORMALIZER: type | None = None


def _normalizer_class() -> type:
    """bluesky-tiled-plugins' ``RunNormalizer`` (TiledWriter's ``normalizer`` option) that does not validate each
    event against the event-model JSON schema again (0.5 ms per ORM event, in the writer thread, which takes the
    GIL from the plan): a RunEngine builds its events valid, and their descriptors are still validated."""
    global _NORMALIZER
    if _NORMALIZER is None:
        from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

        class EventTrustingNormalizer(RunNormalizer):
            def emit(self, name: Any, doc: dict[str, Any]) -> None:
                # (the normalizer names documents by event_model's DocumentNames, an Enum: not equal to "event")
                if getattr(name, "value", name) == "event":
                    self.dispatcher.process(name, doc)
                else:
                    super().emit(name, doc)

        _NORMALIZER = EventTrustingNormalizer
    return _NORMALIZER


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
