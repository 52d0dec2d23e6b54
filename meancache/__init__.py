"""MeanCache: training-free average-velocity caching for Flow Matching inference.

>>> from meancache import MeanCacheConfig, Schedule, enable_mean_cache
>>> enable_mean_cache(pipe, MeanCacheConfig(schedule=Schedule.preset("qwen-image", budget=10)))  # doctest: +SKIP
"""

from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers import MeanCacheSummary, disable_mean_cache, enable_mean_cache, summary
from meancache.method.sampler import sample
from meancache.schedule import PRESETS, Schedule

__all__ = [
    "PRESETS",
    "MeanCacheConfig",
    "MeanCacheSummary",
    "Schedule",
    "disable_mean_cache",
    "enable_mean_cache",
    "sample",
    "summary",
]
__version__ = "0.1.0"
