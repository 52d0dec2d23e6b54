"""MeanCache: training-free average-velocity caching for Flow Matching inference.

>>> from meancache import MeanCacheConfig, Schedule, enable_mean_cache
>>> enable_mean_cache(pipe, MeanCacheConfig(schedule=Schedule.preset("qwen-image", budget=10)))  # doctest: +SKIP
"""

from typing import Any

from meancache.calibration import Calibration, CalibrationStore, calibrate, calibration_store
from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers import (
    MeanCacheSummary,
    calibrate_pipeline,
    disable_mean_cache,
    enable_mean_cache,
    select_estimator,
    select_schedule,
    summary,
)
from meancache.integrations.jvp_attention import disable_jvp_attention, enable_jvp_attention
from meancache.method.sampler import sample
from meancache.schedule import PRESETS, Schedule
from meancache.schedule.pssp import solve_pssp

__all__ = [
    "PRESETS",
    "Calibration",
    "CalibrationStore",
    "MeanCacheConfig",
    "MeanCacheSummary",
    "Schedule",
    "calibrate",
    "calibrate_pipeline",
    "calibration_store",
    "disable_jvp_attention",
    "disable_mean_cache",
    "enable_jvp_attention",
    "enable_mean_cache",
    "load_digits_model",
    "sample",
    "select_estimator",
    "select_schedule",
    "solve_pssp",
    "summary",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``meancache.load_digits_model`` is imported on first use: it needs diffusers' pipeline classes (and through
    them transformers' image processors), which ``import meancache`` itself does not."""
    if name == "load_digits_model":
        from meancache.models import load_digits_model

        return load_digits_model
    raise AttributeError(f"module 'meancache' has no attribute {name!r}")
