"""Data layer: the RunEngine factory, Tiled writing and reading, FAIR metadata, backup/replay, export.

This package never imports the device, machine or plan layers: the machine is duck-typed.
"""

from .backup import BackupStore, ReplayReport, default_backup_dir, replay_backup
from .catalog import (
    CatalogUnavailableError,
    close_catalog,
    connect_tiled,
    default_catalog_dir,
    find_runs,
    init_catalog,
    open_catalog,
    read_results,
    read_stream,
    run_metadata,
    stream_data_keys,
)
from .export import export_run
from .metadata import (
    REQUIRED_KEYS,
    MetadataError,
    machine_metadata,
    software_versions,
    tool_metadata,
    validate_metadata,
)
from .run_engine import EventArray, RunEngine, RunResult, TiledRecorder, make_run_engine

__all__ = [
    "REQUIRED_KEYS",
    "BackupStore",
    "CatalogUnavailableError",
    "MetadataError",
    "ReplayReport",
    "EventArray",
    "RunEngine",
    "RunResult",
    "TiledRecorder",
    "close_catalog",
    "connect_tiled",
    "default_backup_dir",
    "default_catalog_dir",
    "export_run",
    "find_runs",
    "init_catalog",
    "machine_metadata",
    "make_run_engine",
    "open_catalog",
    "read_results",
    "read_stream",
    "replay_backup",
    "run_metadata",
    "software_versions",
    "stream_data_keys",
    "tool_metadata",
    "validate_metadata",
]
