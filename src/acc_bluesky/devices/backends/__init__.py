"""Signal backends: ``sim`` (bound to the twin) and ``epics`` (PVs from the profile's templates)."""

from .epics import EpicsBackend, pv_names
from .sim import SimBackend

__all__ = ["EpicsBackend", "SimBackend", "pv_names"]
