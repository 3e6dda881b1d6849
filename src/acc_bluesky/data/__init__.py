"""Data layer: the RunEngine factory, Tiled writing and reading, FAIR metadata, backup/replay, export.

Modules, lowest first (each imports only those below it; an import-linter contract checks it): ``metadata`` and
``catalog`` (folder layout, readers, queries); ``backup``; ``wal`` (write-ahead log) and ``local`` (the on-demand
server of a folder); ``server`` (``acc-bluesky catalog serve``) and ``client`` (``open_catalog``); ``recorder`` (the
RunEngine's writer) and ``export``; ``run_engine``.

This package never imports the device, machine or plan layers: the machine is duck-typed.
"""

from .backup import BackupStore, ReplayReport, default_backup_dir, replay_backup
from .catalog import (
    CatalogPermissionError,
    CatalogUnavailableError,
    default_catalog_dir,
    find_runs,
    init_catalog,
    read_dataset,
    read_results,
    read_stream,
    run_metadata,
    stream_data_keys,
)
from .client import close_catalog, connect_tiled, open_catalog, recover_catalog
from .export import export_run
from .livetable import LiveReadings
from .metadata import (
    REQUIRED_KEYS,
    MetadataError,
    machine_metadata,
    register_machine,
    registered_machines,
    software_versions,
    tool_metadata,
    unregister_machine,
    validate_metadata,
)
from .run_engine import (
    CATALOG_COMMAND,
    EventArray,
    RunEngine,
    RunResult,
    make_run_engine,
)
from .wal import RecoveryReport, recover

__all__ = [
    "LiveReadings",
    "CATALOG_COMMAND",
    "REQUIRED_KEYS",
    "BackupStore",
    "CatalogPermissionError",
    "CatalogUnavailableError",
    "EventArray",
    "MetadataError",
    "RecoveryReport",
    "ReplayReport",
    "RunEngine",
    "RunResult",
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
    "read_dataset",
    "read_results",
    "read_stream",
    "recover",
    "recover_catalog",
    "register_machine",
    "registered_machines",
    "replay_backup",
    "run_metadata",
    "software_versions",
    "stream_data_keys",
    "tool_metadata",
    "unregister_machine",
    "validate_metadata",
]

