"""Schedules that pick themselves: ``MeanCacheConfig(budget=B)`` without a schedule.

Resolution, in order:

1. a schedule shipped with the checkpoint: ``<model folder>/meancache_schedules/*.json`` (what
   ``meancache schedule --out-dir`` writes) with this step count and budget;
2. a published table for the model at this step count and budget (``PRESETS``: Qwen-Image, Qwen-Image-2512
   and Z-Image at 50 steps), recognised by the transformer's class (the model family) and checkpoint name;
3. otherwise the documented fallback, ``Schedule.uniform(num_steps, budget, span=1)``: evenly spaced
   computed steps with plain velocity reuse (Euler on the coarse grid), and a log message suggesting
   ``meancache calibrate`` for a schedule made for this model.

A table is never stretched to another step count here: that would be a schedule made for another run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from meancache.schedule.presets import PRESETS, preset_schedule
from meancache.schedule.schedule import Schedule

SHIPPED_SCHEDULES_DIR = "meancache_schedules"

logger = logging.getLogger(__name__)

MODEL_FAMILIES = {"QwenImageTransformer2DModel": "qwen-image", "ZImageTransformer2DModel": "z-image"}
"""Transformer class -> the preset family of the published tables. Tables belong to a model, not to a pipeline:
every pipeline around that transformer (Qwen-Image's edit, img2img, inpainting, ...; Z-Image's variants) gets
them."""


def preset_name_for(model: str, checkpoint: str) -> str | None:
    """The preset family of a transformer class (``model``) and checkpoint name (``_name_or_path``), if any:
    Qwen-Image checkpoints whose name contains ``2512`` get the Qwen-Image-2512 tables."""
    name = MODEL_FAMILIES.get(model)
    if name == "qwen-image" and "2512" in checkpoint:
        return "qwen-image-2512"
    return name


def default_schedule(pipeline: str, checkpoint: str, num_steps: int, budget: int, model: str) -> Schedule:
    """The schedule ``MeanCacheConfig(budget=budget)`` runs for pipeline class ``pipeline`` around transformer
    class ``model`` (``checkpoint``: the pipeline's ``name_or_path``, a local folder or a hub id) and step count."""
    shipped = Path(checkpoint) / SHIPPED_SCHEDULES_DIR if checkpoint else None
    if shipped is not None and shipped.is_dir():
        for path in sorted(shipped.glob("*.json")):
            schedule = Schedule.load(path)
            if schedule.num_steps == num_steps and schedule.budget == budget:
                return schedule
    name = preset_name_for(model, checkpoint)
    if name is not None and num_steps == 50 and budget in PRESETS[name]:
        return preset_schedule(name, budget)
    if budget > num_steps:
        raise ValueError(f"budget {budget} is larger than the {num_steps} steps of this run")
    logger.info(
        "MeanCache: no published or shipped schedule for %s (%s) at %d steps and budget %d; using evenly spaced "
        "computed steps with plain reuse. Run `meancache calibrate` and `meancache schedule` for a schedule made "
        "for this model.",
        pipeline, checkpoint or "unnamed checkpoint", num_steps, budget,
    )  # fmt: skip
    fallback = Schedule.uniform(num_steps, budget, span=1)
    return Schedule(fallback.num_steps, fallback.compute_steps, fallback.spans, {"source": "fallback: uniform, K=1"})
