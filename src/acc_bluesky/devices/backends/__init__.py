"""Signal backends: ``sim`` (bound to the twin) and ``epics`` (PVs from the profile's templates)."""

from .epics import EpicsBackend, pv_names
from .sim import SimBackend
from .tango import TangoBackend, tango_names  # tango: Tango attributes from the profile's Tango templates

__all__ = ["EpicsBackend", "SimBackend", "pv_names"]
__all__ += ["TangoBackend", "tango_names"]  # tango
