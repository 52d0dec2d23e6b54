"""MeanCache on diffusers pipelines, without forking pipelines or patching classes.

The public functions are the ones listed in ``__all__``; the modules, from the user's calls down (every module's
place and what it owns: docs/design.md):

* :mod:`~meancache.integrations.diffusers.pipeline`: :func:`enable_mean_cache`, :func:`disable_mean_cache`,
  :func:`summary` and what MeanCache refuses to drive.
* :mod:`~meancache.integrations.diffusers.calibration`, :mod:`~meancache.integrations.diffusers.selection`:
  stability costs from a pipeline's own generations, validated choice among candidate schedules.
* :mod:`~meancache.integrations.diffusers.scheduler_hooks` and :mod:`~meancache.integrations.diffusers.gate`: the
  hooks on the scheduler instance and the gate in each transformer's call slot.
* :mod:`~meancache.integrations.diffusers.exact_jvp`: the forward-mode derivative path of the ``"exact-jvp"``
  estimator.
* :mod:`~meancache.integrations.diffusers.run`: the generation lifecycle, the per-pipeline state the hooks share.
* :mod:`~meancache.integrations.diffusers.first_use`, :mod:`~meancache.integrations.diffusers.key`,
  :mod:`~meancache.integrations.diffusers.guidance`: calibration on first use, its key, and the key's guidance part.
* :mod:`~meancache.integrations.diffusers.generation_summary`, :mod:`~meancache.integrations.diffusers.layout`,
  :mod:`~meancache.integrations.diffusers.components`, :mod:`~meancache.integrations.diffusers.distributed`,
  :mod:`~meancache.integrations.diffusers.ranks`: the summary type, latent layouts, the gated components, the
  checks and decisions across ranks.
"""

from meancache.integrations.diffusers.calibration import calibrate_pipeline
from meancache.integrations.diffusers.generation_summary import MeanCacheSummary
from meancache.integrations.diffusers.pipeline import (
    disable_mean_cache,
    enable_mean_cache,
    is_mean_cache_enabled,
    summary,
)
from meancache.integrations.diffusers.selection import select_estimator, select_schedule

__all__ = [
    "MeanCacheSummary",
    "calibrate_pipeline",
    "disable_mean_cache",
    "enable_mean_cache",
    "is_mean_cache_enabled",
    "select_estimator",
    "select_schedule",
    "summary",
]
