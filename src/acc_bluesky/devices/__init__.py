"""ophyd-async devices of an accelerator. The same classes serve the twin and EPICS; only the backend differs."""

from .backends import EpicsBackend, SimBackend, pv_names
from .beam import BeamLosses, BpmAcquisition, Injection, Pinger
from .diagnostics import BeamCurrent, Bpm, Orbit, RfCavity, TuneMonitor
from .magnet import Corrector, Magnet, MagnetFamily

__all__ = [
    "BeamCurrent",
    "BeamLosses",
    "BpmAcquisition",
    "Injection",
    "Pinger",
    "Bpm",
    "Corrector",
    "EpicsBackend",
    "Magnet",
    "MagnetFamily",
    "Orbit",
    "RfCavity",
    "SimBackend",
    "TuneMonitor",
    "pv_names",
]
