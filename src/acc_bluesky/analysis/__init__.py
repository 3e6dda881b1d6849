"""Pure analysis (numpy / pyAT, no bluesky): response matrices, SVD correction, bumps, dispersion, configs, optics.

Everything here runs from a notebook or a Dask worker without a RunEngine; ``*.from_run(run)`` reads what a plan
stored in the Tiled catalogue.
"""

# --- orbit tools ---------------------------------------------------------------------------------------------
from .bpm import NOISY_FACTOR, BpmStatistics, bpm_statistics
from .bump import (
    BumpGeometry,
    BumpSolution,
    angle_response,
    angle_rows_hw,
    bump_geometry,
    choose_bump_correctors,
    constrained_lstsq,
    needs_rf,
    solve_bump,
)
from .config import (
    RF_KEYS,
    ConfigDifference,
    compare_config,
    config_from_run,
    config_to_results,
    format_differences,
)
from .correction import CorrectionSystem, StepLimits, SvdCorrector, limit_step, orbit_rms
from .dispersion import (
    Dispersion,
    dispersion_from_orbits,
    dp_from_df,
    model_dispersion,
    model_momentum_compaction_of,
    rf_step_for_dp,
)
from .orm import OrbitResponse, model_orm, momentum_compaction, response_from_orbits, rf_frequency_of

# --- turn-by-turn optics and first turns (tbt engineer) -------------------------------------------------------
from .tbt import (
    ModelOptics,
    TbtResult,
    analyse_tbt,
    beta_from_phase,
    bpm_tunes,
    error_sources,
    kick_for_amplitude,
    model_optics,
)
from .trajectory import (
    ThreadingRequest,
    ThreadingResult,
    TrajectoryReading,
    TrajectoryResponse,
    TrajectoryStep,
    model_trajectory_response,
    thread_first_turns,
    trajectory_step,
)

# --- beam-based alignment (bba engineer) -----------------------------------------------------------------------
from .bba import BBAResult, BbaModel, BbaPair, bba_model, bba_pairs, bowtie_fit, true_offset, true_orbit_at_quads

# --- optics tools (tune, chromaticity: written by the optics engineer) ----------------------------------------
from .tune import *  # noqa: E402,F403
from .chromaticity import *  # noqa: E402,F403
from . import chromaticity as _chromaticity, tune as _tune  # noqa: E402

# --- LOCO (written by the loco engineer) ----------------------------------------------------------------------
from .loco import *  # noqa: E402,F403
from . import loco as _loco  # noqa: E402

__all__ = [
    # orbit tools
    "NOISY_FACTOR",
    "BpmStatistics",
    "bpm_statistics",
    "BumpGeometry",
    "BumpSolution",
    "ConfigDifference",
    "CorrectionSystem",
    "Dispersion",
    "OrbitResponse",
    "RF_KEYS",
    "StepLimits",
    "SvdCorrector",
    "angle_response",
    "angle_rows_hw",
    "bump_geometry",
    "choose_bump_correctors",
    "compare_config",
    "config_from_run",
    "config_to_results",
    "constrained_lstsq",
    "dispersion_from_orbits",
    "dp_from_df",
    "format_differences",
    "limit_step",
    "model_dispersion",
    "model_momentum_compaction_of",
    "model_orm",
    "momentum_compaction",
    "needs_rf",
    "orbit_rms",
    "response_from_orbits",
    "rf_frequency_of",
    "rf_step_for_dp",
    "solve_bump",
    # turn-by-turn optics and first turns
    "ModelOptics",
    "TbtResult",
    "ThreadingRequest",
    "ThreadingResult",
    "TrajectoryReading",
    "TrajectoryResponse",
    "TrajectoryStep",
    "analyse_tbt",
    "beta_from_phase",
    "bpm_tunes",
    "error_sources",
    "kick_for_amplitude",
    "model_optics",
    "model_trajectory_response",
    "thread_first_turns",
    "trajectory_step",
    # beam-based alignment
    "BBAResult",
    "BbaModel",
    "BbaPair",
    "bba_model",
    "bba_pairs",
    "bowtie_fit",
    "true_offset",
    "true_orbit_at_quads",
    # optics tools
    *_tune.__all__,
    *_chromaticity.__all__,
    # LOCO
    *_loco.__all__,
]
