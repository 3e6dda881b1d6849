"""Commissioning sequences: the virtual commissioning demo and Dask campaigns over error seeds."""

from .campaign import SeedResult, commission_seed, measure_orm_on_twin, run_campaign, warm_worker
from .demo import DemoResult, run_demo

__all__ = ["DemoResult", "SeedResult", "commission_seed", "measure_orm_on_twin", "run_campaign", "run_demo", "warm_worker"]
