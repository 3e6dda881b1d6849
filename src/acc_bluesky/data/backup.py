"""Local backup of runs that could not be written to Tiled, and their replay.

A backup folder holds one JSON Lines file per run, ``<start uid>.jsonl``: one ``{"name": ..., "doc": ...}``
per line, every document of the run from its start document on (numpy arrays as lists; float64 values are
written with ``repr`` precision, so they replay bit for bit). Replayed files move to ``replayed/``.

Exactly once: :func:`replay_backup` skips a run that the catalogue already holds complete (it has a stop
document), and deletes a partial copy (the server died mid-run) before writing the whole run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "ENV_BACKUP",
    "BackupStore",
    "BackupWriter",
    "ReplayReport",
    "default_backup_dir",
    "dumps_document",
    "iter_backup_files",
    "lookup_run",
    "read_backup",
    "replay_backup",
    "write_run",
]

logger = logging.getLogger(__name__)

#: Environment variable: the backup folder.
ENV_BACKUP = "ACC_BLUESKY_BACKUP"


def default_backup_dir() -> pathlib.Path:
    """``$ACC_BLUESKY_BACKUP``, else ``platformdirs.user_data_dir("acc_bluesky")/backup``."""
    env = os.environ.get(ENV_BACKUP)
    if env:
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_data_dir("acc_bluesky", appauthor=False)) / "backup"


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def dumps_document(name: str, doc: Any) -> str:
    """One backup line: ``{"name": name, "doc": doc}`` with numpy values as JSON numbers/lists."""
    return json.dumps({"name": name, "doc": doc}, default=_default)


class _RunFile:
    """Append-only JSONL file of one run; named after the start document's uid."""

    def __init__(self, directory: pathlib.Path, key: str) -> None:
        self.directory = directory
        self.key = key
        self.path: pathlib.Path | None = None
        self._lock = threading.Lock()

    def append(self, item: dict[str, Any]) -> None:
        name, doc = item["name"], item["doc"]
        with self._lock:
            if self.path is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                stem = doc["uid"] if name == "start" else f"{self.key}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.path = self.directory / f"{stem}.jsonl"
                msg = (
                    f"Tiled could not take run {stem}: its documents are backed up in {self.path}. "
                    f"Load them later with `acc-bluesky catalog replay {self.directory}`."
                )
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            line = dumps_document(name, doc)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


class BackupStore:
    """A mapping that :class:`bluesky_tiled_plugins.TiledWriter` uses as its ``backup_dictionary``.

    ``store[key].append({"name": ..., "doc": ...})`` appends to ``<directory>/<start uid>.jsonl``; numpy
    arrays are written as JSON lists (the plugin's own ``backup_directory`` writer cannot serialise them).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = pathlib.Path(directory).expanduser()
        self._files: dict[str, _RunFile] = {}
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __getitem__(self, key: str) -> _RunFile:
        return self._files[key]

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            if key not in self._files:
                self._files[key] = _RunFile(self.directory, key)
        for item in value or ():
            self._files[key].append(item)

    def __repr__(self) -> str:
        return f"BackupStore({str(self.directory)!r})"


class BackupWriter:
    """A document callback for one run that writes every document to the backup folder (offline mode)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self._file: _RunFile | None = None
        self.directory = pathlib.Path(directory).expanduser()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._file is None:
            self._file = _RunFile(self.directory, doc.get("uid", "run"))
        self._file.append({"name": name, "doc": doc})


def iter_backup_files(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
    """The run files waiting in a backup folder (oldest first); ``replayed/`` is not included."""
    d = pathlib.Path(directory).expanduser()
    if not d.is_dir():
        return iter(())
    return iter(sorted(d.glob("*.jsonl"), key=lambda p: p.stat().st_mtime))


def read_backup(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The ``(name, doc)`` pairs of one backup file (a truncated last line, from a crash, is dropped)."""
    docs: list[tuple[str, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable line skipped (truncated write?)", path, lineno)
                continue
            docs.append((item["name"], item["doc"]))
    return docs


@dataclasses.dataclass
class ReplayReport:
    """What :func:`replay_backup` did, by run uid."""

    written: list[str] = dataclasses.field(default_factory=list)
    replaced_partial: list[str] = dataclasses.field(default_factory=list)
    skipped_complete: list[str] = dataclasses.field(default_factory=list)
    incomplete: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (
            f"{len(self.written)} run(s) written ({len(self.replaced_partial)} replacing a partial copy), "
            f"{len(self.skipped_complete)} already complete, {len(self.incomplete)} without stop document, "
            f"{len(self.failed)} failed"
        )


def write_run(client: Any, docs: list[tuple[str, dict[str, Any]]], *, batch_size: int | None = None) -> str:
    """Write one run's documents into a Tiled catalogue, exactly once: ``"skipped"`` if the catalogue holds it
    complete already (with a stop document), ``"replaced"`` if a partial copy was deleted first, else ``"written"``.
    """
    from bluesky_tiled_plugins import TiledWriter

    from .catalog import MAX_TABLE_ARRAY_SIZE

    starts = [d for n, d in docs if n == "start"]
    if not starts:
        raise ValueError("the documents hold no start document")
    uid = starts[0]["uid"]
    existing = lookup_run(client, uid)
    outcome = "written"
    if existing is not None:
        if existing.metadata.get("stop"):
            return "skipped"
        existing.delete(recursive=True, external_only=False)
        outcome = "replaced"
    kwargs: dict[str, Any] = {"max_array_size": MAX_TABLE_ARRAY_SIZE}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    writer = TiledWriter(client, **kwargs)
    for name, doc in docs:
        writer(name, doc)
    return outcome


def replay_backup(
    directory: str | os.PathLike,
    client: Any,
    *,
    move: bool = True,
    batch_size: int | None = None,
) -> ReplayReport:
    """Write the runs of a backup folder into a Tiled catalogue, each exactly once.

    Args:
        directory: the backup folder.
        client: a writable Tiled container (``open_catalog(...)`` or ``RE.catalog``).
        move: move each replayed (or already present) file to ``<directory>/replayed/``.
        batch_size: events per write (default: the TiledWriter default).

    Returns:
        A :class:`ReplayReport`.
    """
    report = ReplayReport()
    directory = pathlib.Path(directory).expanduser()
    done_dir = directory / "replayed"
    for path in iter_backup_files(directory):
        docs = read_backup(path)
        starts = [d for n, d in docs if n == "start"]
        if not starts:
            report.failed[path.name] = "no start document"
            continue
        uid = starts[0]["uid"]
        try:
            outcome = write_run(client, docs, batch_size=batch_size)
        except Exception as err:  # keep going with the other runs; the file stays for another try
            logger.exception("Replay of %s failed", path)
            report.failed[uid] = repr(err)
            continue
        if outcome == "skipped":
            report.skipped_complete.append(uid)
        else:
            report.written.append(uid)
            if outcome == "replaced":
                report.replaced_partial.append(uid)
            if not any(n == "stop" for n, _ in docs):
                report.incomplete.append(uid)
        if move:
            done_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(done_dir / path.name))
    return report


def lookup_run(client: Any, uid: str) -> Any:
    """The run of exactly this uid in the catalogue, or None (no partial-uid or scan-id matching)."""
    from tiled.client.container import Container

    try:
        return Container.__getitem__(client, uid)  # the plain container lookup: exact key
    except KeyError:
        return None
