"""The write-ahead log: every document of a run is on disk before it is sent to the catalogue.

One JSON Lines file per open run, ``<wal folder>/<start uid>.jsonl`` (the backup format, :mod:`.backup`), appended
with one ``write`` per document in the RunEngine's thread (a process killed at any moment loses nothing the
RunEngine emitted: the kernel has the bytes). The writing process holds an ``flock`` on each file while its run is
open, and deletes the file once the run is written in the catalogue (stop document included).

A file nobody holds belongs to a process that died: :func:`recover` completes such runs in the catalogue -- every
document of the log, then, if the run never ended, a stop document with ``exit_status: "fail"`` and the reason
:data:`RECOVERY_REASON` -- and deletes the file. Replaying is idempotent (:func:`~.backup.write_run`): a run the
catalogue already holds complete is skipped, a partial copy replaced.

The WAL folder of a catalogue folder is ``<folder>/wal``; for a remote server ``<backup folder>/wal/<host-port>``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
import pathlib
import threading
import time
import urllib.parse
import uuid as _uuid
from typing import Any

import numpy as np
import orjson

from .backup import dumps_document, read_backup, write_run

__all__ = ["RECOVERY_REASON", "RecoveryReport", "WriteAheadLog", "orphan_logs", "recover", "remote_wal_dir"]

logger = logging.getLogger(__name__)

#: The ``reason`` of the stop document of a recovered run that never ended.
RECOVERY_REASON = "session ended without closing the run (recovered from the write-ahead log)"


# Stand-ins for the non-finite values of float64 arrays on orjson's fast path (orjson writes NaN and inf as null):
# orjson writes each in its shortest exact form, then the text is replaced by the token the json module reads back
# (NaN, Infinity, -Infinity; the negative one first: its text holds no other's). The line is kept only if each text
# occurs exactly as often as stand-ins were put in: a stand-in's own value anywhere else in the document (data,
# strings, timestamps) sends it the slow way.
_STAND_INS = ((-1.7976931348623151e308, b"-Infinity"), (1.7976931348623155e308, b"NaN"),
              (1.7976931348623153e308, b"Infinity"))
_STAND_IN_TEXT = [(orjson.dumps(v), token) for v, token in _STAND_INS]
_NO_STAND_INS = (0, 0, 0)


def _fast_value(value: Any) -> tuple[Any, tuple[int, int, int]] | None:
    """``(value for orjson, stand-ins put in per kind: -inf, NaN, +inf)``, or None when it must go the slow way (a
    non-finite scalar or non-float64 array)."""
    if isinstance(value, (float, np.floating)):  # (orjson writes numpy scalars itself: NaN as null)
        return (value, _NO_STAND_INS) if math.isfinite(value) else None
    if not isinstance(value, np.ndarray):
        return value, _NO_STAND_INS
    arr = value.view(np.ndarray) if type(value) is not np.ndarray else value  # orjson takes exact ndarrays only
    if arr.dtype.kind not in "fc" or np.isfinite(arr).all():
        return arr, _NO_STAND_INS
    if arr.dtype != np.float64:
        return None
    out = arr.copy()
    masks = (np.isneginf(arr), np.isnan(arr), np.isposinf(arr))
    for mask, (stand_in, _) in zip(masks, _STAND_INS):
        out[mask] = stand_in
    return out, tuple(int(np.count_nonzero(mask)) for mask in masks)


def encode_document(name: str, doc: dict[str, Any]) -> bytes:
    """One log line (the backup format, :func:`~.backup.dumps_document`). Events go through orjson (numpy arrays
    natively, floats in their shortest exact form: ~20x faster than the json module), their non-finite float64
    array values as stand-ins replaced by the json module's tokens (NaN, Infinity) in the text; every other
    document, and events with non-finite scalars, through the json module. The line reads back the same with
    ``json.loads``."""
    if name == "event":
        data: dict[str, Any] = {}
        counts = [0, 0, 0]
        for k, v in doc["data"].items():
            fast = _fast_value(v)
            if fast is None:
                break
            data[k] = fast[0]
            counts = [a + b for a, b in zip(counts, fast[1])]
        else:
            try:
                line = orjson.dumps({"name": name, "doc": {**doc, "data": data}}, default=_orjson_default,
                                    option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
            except (TypeError, orjson.JSONEncodeError):
                pass
            else:
                if not any(counts):
                    return line
                if all(line.count(text) == n for (text, _), n in zip(_STAND_IN_TEXT, counts)):
                    for text, token in _STAND_IN_TEXT:
                        line = line.replace(text, token)
                    return line
    return (dumps_document(name, doc) + "\n").encode()


def _orjson_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # (non-contiguous, or a dtype orjson does not take)
        if obj.dtype.kind in "fc" and not np.isfinite(obj).all():
            raise TypeError("not finite")
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def remote_wal_dir(backup_dir: str | os.PathLike, uri: str) -> pathlib.Path:
    """The WAL folder of the runs sent to a remote Tiled server."""
    parts = urllib.parse.urlsplit(uri)
    name = "".join(c if c.isalnum() or c in "-." else "-" for c in f"{parts.hostname}-{parts.port or ''}{parts.path}")
    return pathlib.Path(backup_dir).expanduser() / "wal" / name.strip("-")


class WriteAheadLog:
    """The open runs' log files of one writer (one RunEngine). Thread-safe."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = pathlib.Path(directory).expanduser()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, uid: str) -> pathlib.Path:
        return self.directory / f"{uid}.jsonl"

    def append(self, uid: str | None, name: str, doc: dict[str, Any]) -> None:
        """One document, written (``os.write``: in the kernel's hands) before this returns."""
        if uid is None:
            return
        line = encode_document(name, doc)
        with self._lock:
            fd = self._fds.get(uid)
            if fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path(uid), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fds[uid] = fd
            os.write(fd, line)

    def close(self, uid: str, *, delete: bool = True) -> None:
        """The run is safe elsewhere (written, or in the backup folder): delete its log (then release it)."""
        with self._lock:
            fd = self._fds.pop(uid, None)
            if delete:
                try:
                    self.path(uid).unlink()
                except FileNotFoundError:
                    pass
            if fd is not None:
                os.close(fd)

    def open_runs(self) -> list[str]:
        with self._lock:
            return list(self._fds)


def orphan_logs(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The log files in a WAL folder that no living process holds (oldest first)."""
    d = pathlib.Path(directory).expanduser()
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.jsonl"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out.append(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return out


@dataclasses.dataclass
class RecoveryReport:
    """What :func:`recover` did, by run uid: ``closed`` (runs that never ended, now closed with exit status fail),
    ``completed`` (written again from the log), ``already_complete``, ``failed`` (uid -> error; the log stays)."""

    closed: list[str] = dataclasses.field(default_factory=list)
    completed: list[str] = dataclasses.field(default_factory=list)
    already_complete: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return (f"{len(self.completed)} run(s) completed from the write-ahead log ({len(self.closed)} closed with "
                f"exit_status fail), {len(self.already_complete)} already complete, {len(self.failed)} failed")


def _stop_for(docs: list[tuple[str, dict[str, Any]]], reason: str) -> dict[str, Any]:
    start = next(d for n, d in docs if n == "start")
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    counts: dict[str, int] = {}
    times: list[float] = []
    for name, doc in docs:
        t = doc.get("time")
        if isinstance(t, (int, float)):
            times.append(float(t))
        elif isinstance(t, list):
            times.extend(float(x) for x in t)
        if name in ("event", "event_page"):
            stream = streams.get(doc["descriptor"], "primary")
            counts[stream] = counts.get(stream, 0) + (len(doc["seq_num"]) if name == "event_page" else 1)
    last = max(times, default=time.time())
    return {"uid": str(_uuid.uuid4()), "time": last, "run_start": start["uid"], "exit_status": "fail",
            "reason": reason, "num_events": counts}


def recover(directory: str | os.PathLike, client: Any, *, reason: str = RECOVERY_REASON) -> RecoveryReport:
    """Complete in ``client`` the runs of the orphaned logs of a WAL folder (see the module docs)."""
    report = RecoveryReport()
    for path in orphan_logs(directory):
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # taken meanwhile (another recovery)
                continue
            if os.fstat(fd).st_nlink == 0:  # its writer finished and deleted it meanwhile
                continue
            docs = read_backup(path)
            starts = [d for n, d in docs if n == "start"]
            if not starts:
                path.unlink()
                continue
            uid = starts[0]["uid"]
            if not any(n == "stop" for n, _ in docs):
                stop = _stop_for(docs, reason)
                os.write(fd, (dumps_document("stop", stop) + "\n").encode())  # (a second recovery replays it)
                docs.append(("stop", stop))
                report.closed.append(uid)
            try:
                outcome = write_run(client, docs)
            except Exception as err:
                logger.exception("recovering run %s from %s failed", uid, path)
                report.failed[uid] = repr(err)
                continue
            (report.already_complete if outcome == "skipped" else report.completed).append(uid)
            path.unlink()
            logger.warning("run %s completed from the write-ahead log %s (%s)", uid, path, outcome)
        finally:
            os.close(fd)
    return report
