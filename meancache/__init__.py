"""MeanCache: training-free average-velocity caching for Flow Matching inference.

>>> from meancache import MeanCacheConfig, Schedule, enable_mean_cache
>>> enable_mean_cache(pipe, MeanCacheConfig(schedule=Schedule.preset("qwen-image", budget=10)))  # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

from meancache.calibration import Calibration, CalibrationStore, calibrate, calibration_store
from meancache.config import MeanCacheConfig
from meancache.method.sampler import sample
from meancache.schedule import PRESETS, Schedule
from meancache.schedule.pssp import solve_pssp

if TYPE_CHECKING:
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
    from meancache.models import load_digits_model

_PIPELINE_NAMES = frozenset({"MeanCacheSummary", "calibrate_pipeline", "disable_mean_cache", "enable_mean_cache",
                            "select_estimator", "select_schedule", "summary"})  # fmt: skip
_JVP_ATTENTION_NAMES = frozenset({"disable_jvp_attention", "enable_jvp_attention"})

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
    """The names that need diffusers are imported on first use: the pipeline integration (``enable_mean_cache``,
    ``summary``, ...), JVP attention on diffusers' attention modules and ``load_digits_model``. So ``import
    meancache.ops`` or ``from meancache import Schedule`` does not import diffusers, which takes about 4 s and, with
    bitsandbytes or torchao installed, prints their import notices."""
    if name in _PIPELINE_NAMES:
        from meancache.integrations import diffusers as module
    elif name in _JVP_ATTENTION_NAMES:
        from meancache.integrations import jvp_attention as module
    elif name == "load_digits_model":
        from meancache import models as module
    else:
        raise AttributeError(f"module 'meancache' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
