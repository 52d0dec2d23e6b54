"""MeanCache on diffusers pipelines, without forking pipelines or patching classes.

* :mod:`~meancache.integrations.diffusers.pipeline`: :func:`enable_mean_cache`, :func:`disable_mean_cache`,
  :func:`summary`.
* :mod:`~meancache.integrations.diffusers.hooks`: the transformer gate and the scheduler hooks that do it.
* :mod:`~meancache.integrations.diffusers.run`: the per-pipeline state and one generation's bookkeeping.
* :mod:`~meancache.integrations.diffusers.distributed`: the check that every rank of a parallelized transformer
  holds the same schedule.
* :mod:`~meancache.integrations.diffusers.calibration`: stability costs from a pipeline's own generations.
* :mod:`~meancache.integrations.diffusers.selection`: validated choice among candidate schedules.
"""

from meancache.integrations.diffusers.calibration import calibrate_pipeline, observe_steps
from meancache.integrations.diffusers.hooks import guided_derivative
from meancache.integrations.diffusers.pipeline import (
    disable_mean_cache,
    enable_mean_cache,
    is_mean_cache_enabled,
    summary,
)
from meancache.integrations.diffusers.run import MeanCacheSummary
from meancache.integrations.diffusers.selection import select_schedule

__all__ = [
    "MeanCacheSummary",
    "calibrate_pipeline",
    "disable_mean_cache",
    "enable_mean_cache",
    "guided_derivative",
    "is_mean_cache_enabled",
    "observe_steps",
    "select_schedule",
    "summary",
]
