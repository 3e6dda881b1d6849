"""Plan stubs: building blocks that never open a run (read the orbit, move families, snapshot/restore, results),
the tool scaffold (:mod:`.tool`) and run references (:mod:`.runs`)."""

from . import bba as _bba
from . import machine as _machine
from . import optics as _optics
from . import orbit as _orbit
from . import runs as _runs
from . import tool as _tool
from .bba import *  # noqa: F403
from .machine import *  # noqa: F403
from .optics import *  # noqa: F403
from .orbit import *  # noqa: F403
from .results import store_result
from .runs import *  # noqa: F403
from .tool import *  # noqa: F403

__all__ = [*_machine.__all__, "store_result", *_optics.__all__, *_orbit.__all__, *_runs.__all__, *_tool.__all__]
__all__ += _bba.__all__  # beam-based alignment stubs (bba engineer)

# --- tbt: beam devices, shots and corrector vectors (trajectory tools) ---
from . import trajectory as _trajectory  # noqa: E402
from .trajectory import *  # noqa: E402,F403

__all__ += _trajectory.__all__
