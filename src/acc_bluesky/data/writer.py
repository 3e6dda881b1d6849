"""The catalogue writer process: runs are written into embedded Tiled catalogues by a child process.

Writing a run into Tiled costs CPU: the TiledWriter's requests and the Tiled application behind them (FastAPI,
SQLAlchemy, zarr), 10-40 ms per request. In the RunEngine's process that time is taken from the plan, whose own
work (the twin's tracking) holds the GIL. So the RunEngine hands every document to one child process per Python
process (``python -m acc_bluesky.data._writer_main``), which owns the writing side of the embedded catalogues and
writes each run while the plans go on, as bluesky facilities do with a message bus and a separate writer:

- events are written in groups, at most every :data:`WRITE_INTERVAL` seconds (live readers see a run grow);
- ``RE(plan)`` returns once every document of the run has been handed to the child (it is in the child's pipe or
  memory: the child finishes writing it even if this process is killed);
- every read of the catalogue *from this process* (``cat[uid]``, ``open_catalog``, the plans' ``orm=uid``) first
  waits until the child has written what it was given: right after ``uid = RE(plan)``, ``cat[uid]`` is the
  complete run. Other processes see it a few hundred ms later; :meth:`WriterProcessRecorder.wait` (or
  ``RE.wait_for_catalog()``) waits explicitly;
- if Tiled refuses a run, the child backs it up (the TiledWriter's own fallback, :class:`BackupStore`) and this
  process warns, naming the backup file; if the child dies, this process backs up every run it had not seen
  confirmed and writes in-process from then on. Nothing recorded is lost.

The parent side is :class:`WriterProcessRecorder` (a document callback, what ``make_run_engine`` subscribes for an
embedded catalogue) over the shared :class:`CatalogWriterProcess`. The protocol is pickled tuples on two pipes
(not ``multiprocessing``: spawning would re-import the user's ``__main__`` script in the child).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pathlib
import pickle
import queue
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = [
    "WRITE_INTERVAL",
    "CatalogWriterProcess",
    "WriterProcessError",
    "WriterProcessRecorder",
    "wait_for_writer",
    "writer_process",
]

logger = logging.getLogger(__name__)

#: Seconds between two writes of a run's events by the writer process (the events of that time go together).
WRITE_INTERVAL = 1.0
#: Seconds between two wake-ups of the thread that feeds the child's pipe (unless hurried: stop, sync, close).
_FEED_INTERVAL = 0.05
#: Seconds between liveness checks of the child while waiting for it.
_POLL = 0.5
#: Seconds the child may take to start (imports of the Tiled server stack) before the parent gives up on it.
_START_TIMEOUT = 120.0
#: Environment variable set in the writer process itself.
ENV_IN_WRITER = "ACC_BLUESKY_WRITER_PROCESS"


class WriterProcessError(RuntimeError):
    """The catalogue writer process could not be started or died; the message says what happened."""


# ======================================================================================================
# parent side
class CatalogWriterProcess:
    """The child process that writes runs into embedded catalogues, and the pipes to it.

    ``send`` never blocks: messages are pickled and written to the child's pipe by a feeder thread. ``sync`` waits
    until the child has handled everything sent before it. The child reports each run it finished (``done``) with
    what went wrong, if anything; ``take_reports`` hands those over. One instance serves every RunEngine of the
    process (:func:`writer_process`).
    """

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env.setdefault("MPLBACKEND", "Agg")
        env[ENV_IN_WRITER] = "1"
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "acc_bluesky.data._writer_main", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env, close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        _widen_pipe(to_child_w)
        self._out = os.fdopen(to_child_w, "wb", buffering=1 << 20)
        self._in = os.fdopen(from_child_r, "rb")
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._tokens = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[int, bool] = {}
        self._reports: dict[str, list[tuple[str, str, str]]] = {}  # catalogue folder -> [(kind, run, message)]
        self._unfinished: dict[str, set[str]] = {}  # catalogue folder -> runs whose stop is not written yet
        self._queued = 0  # messages put in the outbox
        self._fed = 0  # messages written to the pipe
        self._ready = False
        self._dead: str | None = None
        self._closed = False
        self._hurry = threading.Event()
        threading.Thread(target=self._feed, name="acc-bluesky-writer-feeder", daemon=True).start()
        threading.Thread(target=self._read, name="acc-bluesky-writer-reader", daemon=True).start()

    # -- threads -----------------------------------------------------------------------------------
    def _feed(self) -> None:
        # Wakes at most every _FEED_INTERVAL (or at once when hurried): a thread that takes the GIL for every
        # document would make the plan's thread wait for it hundreds of times a second.
        try:
            while True:
                items = [self._outbox.get()]
                while True:
                    try:
                        items.append(self._outbox.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    if item is None:
                        self._out.close()
                        return
                    pickle.dump(item, self._out, protocol=pickle.HIGHEST_PROTOCOL)
                self._out.flush()
                with self._cond:
                    self._fed += len(items)
                    self._cond.notify_all()
                self._hurry.wait(_FEED_INTERVAL)
                self._hurry.clear()
        except (OSError, ValueError, pickle.PicklingError) as err:
            self._mark_dead(f"writing to it failed ({err!r})")

    def _read(self) -> None:
        try:
            while True:
                msg = pickle.load(self._in)
                with self._cond:
                    kind = msg[0]
                    if kind == "ready":
                        self._ready = True
                    elif kind == "synced":
                        self._replies[msg[1]] = True
                    elif kind == "done":
                        _, directory, uid, reports = msg
                        self._unfinished.get(directory, set()).discard(uid)
                        self._reports.setdefault(directory, []).append(("done", uid, ""))
                        self._reports[directory].extend(reports)
                    elif kind == "fatal":
                        self._dead = msg[1]
                    self._cond.notify_all()
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self._proc.poll()
            self._mark_dead("it exited" + (f" with code {code}" if code is not None else ""))

    def _mark_dead(self, why: str) -> None:
        with self._cond:
            if self._dead is None and not self._closed:
                self._dead = why
            self._cond.notify_all()

    # -- API ---------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed and self._proc.poll() is None

    @property
    def error(self) -> str | None:
        """Why the child is not usable (None while it is)."""
        return self._dead

    def send(self, *message: Any) -> None:
        """Queue a message for the child (never blocks)."""
        if not self.alive:
            raise WriterProcessError(f"the catalogue writer process is not running: {self._dead or 'closed'}")
        with self._cond:
            if message[0] == "doc" and message[2] == "stop":
                self._unfinished.setdefault(message[1], set()).add(message[3]["run_start"])
            self._queued += 1
        self._outbox.put(message)
        if message[0] != "doc" or message[2] == "stop":
            self._hurry.set()

    def _wait(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        waited = 0.0
        with self._cond:
            while not done():
                if self._dead is not None or self._proc.poll() is not None:
                    raise WriterProcessError(f"the catalogue writer process died ({self._dead or 'it exited'}) "
                                             f"while {what}")
                limit = timeout if timeout is not None else (None if self._ready else _START_TIMEOUT)
                if limit is not None and waited >= limit:
                    raise WriterProcessError(
                        f"the catalogue writer process did not answer within {limit:.0f} s while {what}"
                        + ("" if self._ready else " (it was still starting: importing the Tiled server stack)"))
                self._cond.wait(_POLL)
                waited += _POLL

    def handed_over(self, timeout: float | None = None) -> None:
        """Wait until every message sent so far is in the child's pipe (the child then writes it even if this
        process dies)."""
        with self._cond:
            target = self._queued
        self._wait(lambda: self._fed >= target, timeout, "taking the documents")

    def sync(self, timeout: float | None = None) -> None:
        """Wait until the child has handled every message sent so far."""
        token = next(self._tokens)
        self.send("sync", token)
        self._wait(lambda: self._replies.pop(token, False), timeout, "writing the runs it was given")

    def pending(self, directory: str) -> bool:
        """True while runs of that catalogue folder are handed over but not all written."""
        with self._cond:
            return bool(self._unfinished.get(directory))

    def take_reports(self, directory: str, runs: set[str] | None = None) -> list[tuple[str, str, str]]:
        """The child's reports on runs of that folder (of ``runs`` only, if given; two RunEngines may record in
        one folder) since the last call: ``(kind, run uid, message)`` with kind ``done`` (written, or backed up:
        then a ``backup`` report follows), ``backup`` or ``error``."""
        with self._cond:
            reports = self._reports.pop(directory, [])
            if runs is None:
                return reports
            mine = [r for r in reports if r[1] in runs]
            others = [r for r in reports if r[1] not in runs]
            if others:
                self._reports[directory] = others
            return mine

    def close(self, timeout: float = 120.0) -> None:
        """Let the child finish what it was sent, then stop it (at interpreter exit this happens by itself)."""
        if self._closed:
            return
        if self.alive:
            try:
                self.sync(timeout=timeout)
            except WriterProcessError as err:
                logger.warning("%s", err)
        self._closed = True
        self._outbox.put(None)
        self._hurry.set()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._in.close()


def _widen_pipe(fd: int) -> None:
    """1 MiB of pipe (Linux; the default 64 KiB holds four ORM events): the feeder rarely waits for the child."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (OSError, ImportError):  # pragma: no cover - another OS, or a lower /proc/sys/fs/pipe-max-size
        pass


_process: CatalogWriterProcess | None = None
_process_lock = threading.Lock()
_recorders: dict[str, WriterProcessRecorder] = {}  # catalogue folder -> its recorder (the last one made)
_closing = False  # set at interpreter exit: no new writer process then


def writer_process(start: bool = True) -> CatalogWriterProcess | None:
    """The writer process of this Python process (started on first use when ``start``)."""
    global _process
    with _process_lock:
        if (_process is None or not _process.alive) and start and not _closing:
            _process = CatalogWriterProcess()
        return _process


@atexit.register
def _close_at_exit() -> None:
    global _closing
    _closing = True
    for recorder in list(_recorders.values()):
        try:
            recorder.wait()
        except Exception:  # pragma: no cover - reported by wait itself
            logger.exception("waiting for the catalogue writer at exit")
    proc = writer_process(start=False)
    if proc is not None:
        proc.close()


def wait_for_writer(directory: str | os.PathLike) -> None:
    """Wait until the writer process has written every run of that catalogue folder it was given (no-op in the
    writer process itself, or when no run is pending). Called before every request of this process's clients of
    an embedded catalogue."""
    if os.environ.get(ENV_IN_WRITER) == "1":
        return
    recorder = _recorders.get(str(directory))
    if recorder is not None and recorder.process is not None and recorder.process.pending(str(directory)):
        recorder.wait()


def forget_catalog(directory: str | os.PathLike) -> None:
    """Write what is pending for a catalogue folder, then have the writer process close its side of it."""
    if os.environ.get(ENV_IN_WRITER) == "1":
        return
    recorder = _recorders.pop(str(directory), None)
    if recorder is not None:
        recorder.wait()
    proc = writer_process(start=False)
    if proc is not None and proc.alive:
        try:
            proc.send("close_target", str(directory))
            proc.sync(timeout=120)
        except WriterProcessError as err:
            logger.warning("%s", err)


class _RunIndex:
    """Which run a document belongs to: a start document's own uid, ``run_start``, or for events the run of their
    descriptor (noted when the descriptor passes)."""

    def __init__(self) -> None:
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run uid

    def run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        if name == "start":
            return doc["uid"]
        if name == "descriptor":
            self._descriptors[doc["uid"]] = doc["run_start"]
        if name in ("event", "event_page"):
            return self._descriptors.get(doc["descriptor"])
        return doc.get("run_start")  # stop, descriptor; resources and datums when they say

    def forget(self, runs: set[str]) -> None:
        """Drop the descriptors of these runs."""
        self._descriptors = {d: r for d, r in self._descriptors.items() if r not in runs}


class WriterProcessRecorder:
    """Document callback: hands every document to the catalogue writer process, for one embedded catalogue.

    At each stop document it waits until the run's documents are handed over (in the child's pipe), not until
    they are written: reads from this process wait for that (:func:`wait_for_writer`). Keeps each run's
    documents until the child confirms the run, so that if the child dies they go to the backup folder (a warning
    names the file) and later runs are written in-process by ``fallback()``.

    Attributes: ``client`` (a Tiled client of the catalogue in this process, for reading), ``backup_dir``,
    ``process`` (the :class:`CatalogWriterProcess`, None after falling back).
    """

    def __init__(self, directory: str | os.PathLike, client: Any, backup_dir: str | os.PathLike, *,
                 max_array_size: int, fallback: Callable[[], Callable[[str, dict[str, Any]], None]]) -> None:
        self.directory = str(directory)
        self.client = client
        self.backup_dir = pathlib.Path(backup_dir).expanduser()
        self._fallback_factory = fallback
        self._fallback: Callable[[str, dict[str, Any]], None] | None = None
        self._open: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # run uid -> documents not confirmed
        self._runs = _RunIndex()
        self._orphans: dict[str, Callable[[str, dict[str, Any]], None]] = {}  # runs open when the child died
        self._lock = threading.RLock()
        self._config = {"backup_dir": str(self.backup_dir), "max_array_size": int(max_array_size)}
        self.process: CatalogWriterProcess | None = None
        try:
            self.process = writer_process()
            assert self.process is not None
            self.process.send("open", self.directory, self._config)
        except (OSError, WriterProcessError) as err:
            self._give_up(f"could not start it: {err}")
        _recorders[self.directory] = self

    @property
    def in_process(self) -> bool:
        """True once writing has fallen back to this process."""
        return self._fallback is not None

    def _give_up(self, why: str) -> None:
        logger.error("The catalogue writer process failed (%s); runs are written in this process from now on.",
                     why)
        self.process = None
        self._fallback = self._fallback_factory()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._lock:
            uid = self._runs.run_of(name, doc)
            if self._fallback is not None:
                # the rest of a run the child did not finish goes to its backup file; new runs to the fallback
                (self._orphans.get(uid or "") or self._fallback)(name, doc)
                if name == "stop" and uid is not None:
                    self._orphans.pop(uid, None)
                    self._runs.forget({uid})
                return
            assert self.process is not None
            if uid is not None:
                self._open.setdefault(uid, []).append((name, doc))
            try:
                if name == "start":  # (again: the folder may have been closed since, see close_catalog)
                    _recorders[self.directory] = self
                    self.process.send("open", self.directory, self._config)
                self.process.send("doc", self.directory, name, doc)
                if name == "stop":
                    self.process.handed_over()
            except WriterProcessError as err:
                self._lost(err)
                return
        if name in ("start", "stop"):
            self._handle_reports()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every run handed over is written (or backed up); warn about backups and errors."""
        with self._lock:
            if self.process is None:
                return
            try:
                self.process.sync(timeout)
            except WriterProcessError as err:
                self._lost(err)
                return
        self._handle_reports()

    def _lost(self, err: WriterProcessError) -> None:
        self._back_up_open(str(err))
        self._give_up(str(err))

    def _handle_reports(self) -> None:
        if self.process is None:
            return
        with self._lock:
            runs = set(self._open)
        for kind, run, message in self.process.take_reports(self.directory, runs):
            if kind == "done":
                with self._lock:
                    self._open.pop(run, None)
                    self._runs.forget({run})
            elif kind == "backup":
                logger.warning("%s", message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            else:
                logger.error("catalogue writer, run %s: %s", run, message)

    def _back_up_open(self, why: str) -> None:
        from .backup import BackupWriter

        for uid, docs in self._open.items():
            writer = BackupWriter(self.backup_dir)
            for name, doc in docs:
                writer(name, doc)
            if docs[-1][0] != "stop":
                self._orphans[uid] = writer
            logger.error("run %s was not confirmed by the catalogue writer process (%s): backed up in %s", uid, why,
                         self.backup_dir)
        self._runs.forget(set(self._open) - set(self._orphans))
        self._open.clear()


# ======================================================================================================
# child side
def _speed_up_tiled_server() -> None:
    """Process-local speed-up of the Tiled application (this process only writes embedded catalogues).

    FastAPI rebuilds the dependency tree of every route's dependencies at every request when an app has
    ``dependency_overrides`` (Tiled overrides ``get_settings``): ~160 ``get_dependant`` calls, about 40 % of a
    request's CPU. The tree depends only on the arguments, so it is memoised.
    """
    import fastapi.dependencies.utils as fdu

    original = fdu.get_dependant
    if getattr(original, "_acc_bluesky_memo", False):
        return
    memo: dict[Any, Any] = {}

    def get_dependant(*, path: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            key = (path, call, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
            found = memo.get(key)
        except TypeError:  # an unhashable argument: no memo
            return original(path=path, call=call, **kwargs)
        if found is None:
            found = memo[key] = original(path=path, call=call, **kwargs)
        return found

    get_dependant._acc_bluesky_memo = True  # type: ignore[attr-defined]
    fdu.get_dependant = get_dependant


def _stay_in_the_background() -> None:
    """The writer gives way to the plans: a lower CPU priority and one thread for compression and Arrow."""
    try:
        os.nice(5)
    except OSError:  # pragma: no cover - not permitted
        pass
    try:
        import pyarrow

        pyarrow.set_cpu_count(1)
        pyarrow.set_io_thread_count(1)
    except Exception:  # pragma: no cover - optional speed-up
        pass
    try:
        from numcodecs import blosc

        blosc.set_nthreads(1)
    except Exception:  # pragma: no cover - optional speed-up
        pass


def _writer_class() -> type:
    """A TiledWriter whose run writers write their cached events on demand (``write_cached``) and skip the
    stream-close requests (an embedded catalogue has no streaming cache: nobody listens to them)."""
    from bluesky_tiled_plugins.writing import tiled_writer as tw

    class RunWriter(tw._RunWriter):
        def _close_stream_tree(self) -> None:
            return None

        def write_cached(self) -> None:
            """Write the events collected so far (what ``stop`` does first)."""
            for desc_name, cache in self._internal_data_cache.items():
                if cache:
                    self._write_internal_data(cache, desc_node=self._desc_nodes[desc_name])
                    cache.clear()

    class Writer(tw.TiledWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.run_writers: dict[str, Any] = {}

        def _factory(self, name: str, doc: dict[str, Any]) -> tuple[list[Callable], list[Any]]:
            run_writer = RunWriter(self.client, batch_size=self._batch_size, max_array_size=self._max_array_size,
                                   validate=self._validate, ignore_errors=self.ignore_errors)
            self.run_writers[doc["uid"]] = run_writer
            cb: Any = run_writer
            if self._normalizer:
                cb = self._normalizer(patches=self.patches, spec_to_mimetype=self.spec_to_mimetype)
                cb.subscribe(run_writer)
            if self.backup_dictionary is not None:
                cb = tw._ConditionalBackup(cb, [tw.JSONDictWriter(self.backup_dictionary)])
            return [cb], []

    return Writer


class _Target:
    """One embedded catalogue the child writes to."""

    def __init__(self, directory: str, backup_dir: str, max_array_size: int, writer_cls: type) -> None:
        from .backup import BackupStore
        from .catalog import _embedded_client

        self.directory = directory
        self.client = _embedded_client(directory)
        self.store = BackupStore(backup_dir)
        # events are written by write_due (every WRITE_INTERVAL) and at the stop, never by count
        self.writer = writer_cls(self.client, backup_dictionary=self.store, batch_size=1 << 62,
                                 max_array_size=max_array_size)
        self.last_write: dict[str, float] = {}
        self.runs = _RunIndex()

    def deliver(self, name: str, doc: dict[str, Any]) -> list[tuple[str, str, str]] | None:
        """Hand one document to the writer; at a stop, return the run's reports."""
        from .run_engine import plain_document

        self.runs.run_of(name, doc)  # (notes the descriptors, for the error reports)
        self.writer(name, plain_document(name, doc))
        if name == "start":
            self.last_write[doc["uid"]] = time.monotonic()
        if name != "stop":
            return None
        uid = doc["run_start"]
        self.writer.run_writers.pop(uid, None)
        self.last_write.pop(uid, None)
        self.runs.forget({uid})
        path = self.store.directory / f"{uid}.jsonl"  # (the backup file of a run is named after its uid)
        if path.exists():
            return [("backup", uid, f"Tiled could not take run {uid}: its documents are backed up in {path}. "
                                    f"Load them later with `acc-bluesky catalog replay {self.store.directory}`.")]
        return []

    def write_due(self, force: bool = False) -> None:
        """Write the cached events of every run whose last write is WRITE_INTERVAL old (all with ``force``). A
        failure here is left to the stop document, which writes the cache again through the backup fallback."""
        now = time.monotonic()
        for uid, run_writer in list(self.writer.run_writers.items()):
            if force or now - self.last_write.get(uid, 0.0) >= WRITE_INTERVAL:
                self.last_write[uid] = now
                try:
                    run_writer.write_cached()
                except Exception as err:  # the stop retries through _ConditionalBackup
                    logger.warning("writing the events of run %s failed (%r); retried at its end", uid, err)


def _child_main(rfd: int, wfd: int) -> None:
    inp = os.fdopen(rfd, "rb")
    out = os.fdopen(wfd, "wb")

    def reply(*msg: Any) -> None:
        pickle.dump(msg, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(pickle.load(inp))
        except (EOFError, OSError, pickle.UnpicklingError):
            inbox.put(None)

    threading.Thread(target=read, name="reader", daemon=True).start()
    try:
        _stay_in_the_background()
        try:
            _speed_up_tiled_server()
        except Exception as err:  # an optional speed-up: another FastAPI may not have this function
            logger.warning("FastAPI dependency memo not installed: %r", err)
        writer_cls = _writer_class()
        from . import catalog  # noqa: F401 - the Tiled stack imported before "ready"
    except Exception as err:  # pragma: no cover - a broken installation
        reply("fatal", f"it could not import the Tiled writing stack: {err!r}")
        return
    reply("ready")
    targets: dict[str, _Target] = {}
    errors: dict[str, list[tuple[str, str, str]]] = {}
    while True:
        try:
            msg = inbox.get(timeout=WRITE_INTERVAL)
        except queue.Empty:
            for target in targets.values():
                target.write_due(force=True)
            continue
        if msg is None:  # the parent closed the pipe (or died): everything it sent has been handled
            for target in targets.values():
                target.write_due(force=True)  # a run cut short by the parent's death: its events so far
                _close_target(target)
            return
        kind = msg[0]
        try:
            if kind == "doc":
                target = targets[msg[1]]
                reports = target.deliver(msg[2], msg[3])
                if reports is not None:
                    uid = msg[3]["run_start"]
                    reply("done", msg[1], uid, reports + errors.pop(uid, []))
                elif inbox.empty():
                    target.write_due()
            elif kind == "sync":
                reply("synced", msg[1])
            elif kind == "open":
                if msg[1] not in targets:
                    targets[msg[1]] = _Target(msg[1], msg[2]["backup_dir"], msg[2]["max_array_size"], writer_cls)
            elif kind == "close_target":
                target = targets.pop(msg[1], None)
                if target is not None:
                    _close_target(target)
        except Exception as err:
            logger.exception("catalogue writer: %s failed", kind)
            if kind == "doc":
                target = targets.get(msg[1])
                uid = (target.runs.run_of(msg[2], msg[3]) if target is not None else msg[3].get("run_start")) or ""
                errors.setdefault(uid, []).append(("error", uid, f"the {msg[2]} document failed: {err!r}"))
                if msg[2] == "stop":
                    reply("done", msg[1], uid, errors.pop(uid, []))


def _close_target(target: _Target) -> None:
    from .catalog import close_catalog

    try:
        close_catalog(target.directory)
    except Exception:  # pragma: no cover - best effort at shutdown
        logger.exception("closing %s", target.directory)
