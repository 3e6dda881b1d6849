"""The pyAT digital twin: setpoints in, observables out. No bluesky or ophyd-async imports."""

from .anomalies import Anomalies
from .errors import ErrorModel, truncated_normal
from .model import BeamLost, Observables, Twin, UnknownDevice

__all__ = ["Anomalies", "BeamLost", "ErrorModel", "Observables", "Twin", "UnknownDevice", "truncated_normal"]
