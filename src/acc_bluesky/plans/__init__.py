"""Bluesky plans (each opens one run, records its results to Tiled, returns the run uid, restores on abort).

Orbit: :func:`measure_orm`, :func:`correct_orbit`, :func:`orbit_bump`, :func:`measure_dispersion`; BPMs:
:func:`monitor_bpms` (mean, noise, dead / frozen / noisy BPMs);
configurations: :func:`save_config`, :func:`restore_config` (and :func:`compare_config`);
optics: tune and chromaticity (:mod:`acc_bluesky.plans.optics`); LOCO: :func:`loco`, :func:`correct_optics`;
turn-by-turn optics (:func:`measure_tbt`); first turns: :func:`measure_trajectory_response`,
:func:`correct_trajectory`, :func:`thread_first_turns`, :func:`ramp_sextupoles` (the sextupoles down until the
threaded beam stores, back up with orbit corrections); beam-based alignment: :func:`measure_bba`, :func:`apply_bba`.
"""

from . import bpm as _bpm, config as _config, orbit as _orbit
from .bpm import *  # noqa: F403
from .config import *  # noqa: F403
from .orbit import *  # noqa: F403

# --- optics plans (tune, chromaticity: written by the optics engineer) ----------------------------------------
from . import optics as _optics  # noqa: E402
from .optics import *  # noqa: E402,F403

# --- beam-based alignment (bba engineer) -------------------------------------------------------------------
from . import bba as _bba  # noqa: E402
from .bba import *  # noqa: E402,F403

# --- LOCO: optics fit and correction (loco engineer) --------------------------------------------------------
from . import loco as _loco  # noqa: E402
from .loco import *  # noqa: E402,F403

# --- turn-by-turn optics and first turns (tbt engineer) ------------------------------------------------------
from . import tbt as _tbt  # noqa: E402
from . import trajectory as _trajectory  # noqa: E402
from .tbt import *  # noqa: E402,F403
from .trajectory import *  # noqa: E402,F403

__all__ = [*_orbit.__all__, *_bpm.__all__, *_config.__all__, *_optics.__all__, *_bba.__all__, *_loco.__all__,
           *_tbt.__all__, *_trajectory.__all__]
