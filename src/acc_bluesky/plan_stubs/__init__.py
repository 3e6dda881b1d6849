"""Plan stubs: building blocks that never open a run (read the orbit, move families, snapshot/restore, results)."""

from . import machine as _machine
from .machine import *  # noqa: F403
from .results import store_result

# --- optics stubs (written by the optics engineer) --------------------------------------------------------------
from . import optics as _optics  # noqa: E402
from .optics import *  # noqa: E402,F403

__all__ = [*_machine.__all__, "store_result", *_optics.__all__]
