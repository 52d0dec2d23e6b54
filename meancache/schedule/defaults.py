"""Schedules that pick themselves: ``MeanCacheConfig(budget=B)`` without a schedule.

Resolution, in order (the schedule's ``metadata["source"]`` says which applied):

1. a schedule shipped with the checkpoint: ``<model folder>/meancache_schedules/*.json`` (what
   ``meancache schedule --out-dir`` writes) with this step count and budget;
2. a stored calibration for this model and these settings (``calibrated.stored``: the diffusers integration's
   calibrations made on first use, :mod:`meancache.calibration.store`), solved with PSSP for the budget;
3. a published or third-party table for the model at this step count and budget (``PRESETS``: Qwen-Image,
   Qwen-Image-2512 and Z-Image from the authors; FLUX.1-dev, Qwen-Image, HunyuanVideo and Wan2.1 from an
   independent group; all at 50 steps), recognised by the model family (the transformer's class: every
   pipeline around Qwen-Image's or Z-Image's transformer gets their tables) and the checkpoint name;
4. calibrate on first use (``calibrated.calibrating``): a schedule that computes every step while the
   stability costs are measured, until enough generations are observed for step 2 to apply;
5. only when calibration is off (or the budget is too small for the calibration's largest gap), the
   documented fallback, ``Schedule.uniform(num_steps, budget, span=1)``: evenly spaced computed steps with
   plain velocity reuse (Euler on the coarse grid), and a log message suggesting calibration.

A table is never stretched to another step count here: that would be a schedule made for another run.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Protocol

from meancache.schedule.presets import PRESETS
from meancache.schedule.schedule import Schedule

SHIPPED_SCHEDULES_DIR = "meancache_schedules"

logger = logging.getLogger(__name__)

MODEL_FAMILIES = {"QwenImageTransformer2DModel": "qwen-image", "ZImageTransformer2DModel": "z-image"}
"""Transformer class -> the preset family of its tables. Tables belong to a model, not to a pipeline: every
pipeline around that transformer (Qwen-Image's edit, img2img, inpainting, ...; Z-Image's variants) gets them."""
CHECKPOINT_PRESETS = {
    "FluxTransformer2DModel": ("flux.1-dev", "flux.1-dev"),
    "HunyuanVideoTransformer3DModel": ("hunyuanvideo", "hunyuan-video"),
    "WanTransformer3DModel": ("wan2.1", "wan2.1"),
}
"""Transformer class -> (text the checkpoint name must contain, case-insensitive; preset): these transformers also
run other checkpoints (FLUX.1-schnell, HunyuanVideo-1.5, Wan2.2), whose trajectories the presets were not made on."""


class CalibratedSchedules(Protocol):
    """Schedules calibrated for the run's model and settings (the diffusers integration's calibrate-on-first-use)."""

    def stored(self, num_steps: int, budget: int) -> Schedule | None:
        """The schedule solved from a stored calibration of this key, if one is complete."""

    def calibrating(self, num_steps: int, budget: int) -> Schedule | None:
        """An all-computed schedule that calibrates during this generation, or None when calibration is off."""


def preset_name_for(model: str, checkpoint: str) -> str | None:
    """The preset family of a transformer class (``model``) and checkpoint name (``_name_or_path``), if any;
    Qwen-Image checkpoints whose name contains ``2512`` get the Qwen-Image-2512 tables."""
    if model in CHECKPOINT_PRESETS:
        contains, name = CHECKPOINT_PRESETS[model]
        return name if contains in checkpoint.lower() else None
    name = MODEL_FAMILIES.get(model)
    if name == "qwen-image" and "2512" in checkpoint:
        return "qwen-image-2512"
    return name


def default_schedule(
    pipeline: str,
    checkpoint: str,
    num_steps: int,
    budget: int,
    model: str,
    calibrated: CalibratedSchedules | None = None,
) -> Schedule:
    """The schedule ``MeanCacheConfig(budget=budget)`` runs for pipeline class ``pipeline`` around transformer
    class ``model`` (``checkpoint``: the pipeline's ``name_or_path``, a local folder or a hub id) and step count;
    ``calibrated``: steps 2 and 4 of the module docstring (None: skipped).

    A shipped schedule file that cannot be read or is invalid is skipped with a logged warning naming the file
    and the reason, so one corrupt file does not break the budgets the other files (or the fallbacks) serve."""
    shipped = Path(checkpoint) / SHIPPED_SCHEDULES_DIR if checkpoint else None
    if shipped is not None and shipped.is_dir():
        for path in sorted(shipped.glob("*.json")):
            try:
                stat = path.stat()
                schedule = _shipped_schedule(str(path), stat.st_mtime_ns, stat.st_size)
            except (OSError, TypeError, ValueError) as e:
                logger.warning("MeanCache: skipping the unreadable shipped schedule %s: %s", path, e)
                continue
            if schedule.num_steps == num_steps and schedule.budget == budget:
                return schedule
    if calibrated is not None and (stored := calibrated.stored(num_steps, budget)) is not None:
        return stored
    name = preset_name_for(model, checkpoint)
    if name is not None and num_steps == 50 and budget in PRESETS[name]:
        return Schedule.preset(name, budget)
    if budget > num_steps:
        raise ValueError(f"budget {budget} is larger than the {num_steps} steps of this run")
    if calibrated is not None and (calibrating := calibrated.calibrating(num_steps, budget)) is not None:
        return calibrating
    logger.info(
        "MeanCache: no published or shipped schedule for %s (%s) at %d steps and budget %d; using evenly spaced "
        "computed steps with plain reuse. Set MeanCacheConfig(calibration_runs=R) > 0 to calibrate on first use, "
        "or run `meancache calibrate` and `meancache schedule` for a schedule made for this model.",
        pipeline, checkpoint or "unnamed checkpoint", num_steps, budget,
    )  # fmt: skip
    fallback = Schedule.uniform(num_steps, budget, span=1)
    return Schedule(fallback.num_steps, fallback.compute_steps, fallback.spans, {"source": "fallback: uniform, K=1"})


@functools.lru_cache(maxsize=64)
def _shipped_schedule(path: str, mtime_ns: int, size: int) -> Schedule:
    """:meth:`Schedule.load` of a shipped file, read once per version of the file (``mtime_ns`` and ``size`` are
    the cache key's part that changes when it is rewritten): every generation resolves its schedule, and reading
    the folder's files again each time cost a twentieth of a budget generation on the bundled models."""
    return Schedule.load(path)
