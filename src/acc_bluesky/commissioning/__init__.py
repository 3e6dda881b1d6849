"""Commissioning: the virtual commissioning demo, and campaigns of a sequence of the tool plans over error seeds
on Dask (:mod:`.sequence`, :mod:`.campaign`, :mod:`.truth`)."""

from .campaign import CampaignResult, SeedResult, StepRecord, run_campaign, run_seed, warm_worker
from .demo import DemoResult, run_demo
from .sequence import CampaignSequence, SequenceError, Step, default_sequence, load_sequence, registered_tools

__all__ = ["CampaignResult", "CampaignSequence", "DemoResult", "SeedResult", "SequenceError", "Step", "StepRecord",
           "default_sequence", "load_sequence", "registered_tools", "run_campaign", "run_demo", "run_seed",
           "warm_worker"]
