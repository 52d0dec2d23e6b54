"""The block-level caches the quality benchmark compares against, each as a sweep of settings.

* diffusers' hooks: FirstBlockCache (threshold), TaylorSeer (interval x order, full and lite) and MagCache
  (threshold x max skipped steps x retention) with magnitude ratios from MagCache's own calibration mode,
  run on the calibration seeds, never the evaluated ones;
* cache-dit: DBCache F1B0 (threshold), with and without its TaylorSeer calibrator (order 1 and 2);
* for video pipelines, the attention-level caches (:func:`attention_caches`): diffusers'
  PyramidAttentionBroadcast and FasterCache (skip range x the timestep window where they skip).

These caches skip part of the transformer (or all of it) per step by their own rule, so their compute is
*measured*, not set: block caches by the blocks that really run, attention caches by the FLOPs that really run
(:mod:`benchmarks.quality_speed`).
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is imported
import cache_dit


@dataclass(frozen=True)
class BlockCache:
    """One setting of a peer cache: how to switch it on and off on a pipeline."""

    family: str
    setting: str
    enable: Callable[[Any], None]
    disable: Callable[[Any], None]
    attention: bool = False
    """Whether it skips attention inside blocks (its compute is then counted in FLOPs, not blocks)."""

    @property
    def method(self) -> str:
        return f"{self.family} {self.setting}"


def _diffusers(family: str, setting: str, config: Any, attention: bool = False) -> BlockCache:
    return BlockCache(family, setting, lambda pipe: pipe.transformer.enable_cache(config),
                      lambda pipe: pipe.transformer.disable_cache(), attention)  # fmt: skip


def _cache_dit(family: str, setting: str, threshold: float, taylorseer_order: int | None, steps: int) -> BlockCache:
    def enable(pipe: Any) -> None:
        calibrator = (
            cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
        )
        cache_dit.enable_cache(
            pipe, cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
            residual_diff_threshold=threshold, max_warmup_steps=2, num_inference_steps=steps),
            calibrator_config=calibrator,
        )  # fmt: skip

    return BlockCache(family, setting, enable, cache_dit.disable_cache)


def magcache_ratios(pipe: Any, calls: list[dict[str, Any]], steps: int) -> list[float]:
    """MagCache's own calibration mode on full runs of ``calls``: the per-step residual magnitude ratios it
    prints at the end of each run (one list per run and CFG branch), averaged."""
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), torch.inference_mode():
            for kwargs in calls:
                pipe(**kwargs, num_inference_steps=steps, output_type="latent")
    finally:
        pipe.transformer.disable_cache()
    lines = printed.getvalue().splitlines()
    runs = [ast.literal_eval(line) for line in lines if line.startswith("[") and not line.startswith("[MagCache]")]
    if not runs or any(len(r) != steps for r in runs):
        raise RuntimeError(f"MagCache calibration printed {[len(r) for r in runs]} ratio lists, expected {steps}")
    return torch.tensor(runs).mean(0).tolist()


def block_caches(steps: int, mag_ratios: list[float]) -> Iterator[BlockCache]:
    """Every peer setting the benchmark sweeps, for ``steps``-step generation."""
    for t in (0.05, 0.1, 0.2, 0.4, 0.6, 1.0):
        yield _diffusers("diffusers FirstBlockCache", f"threshold={t:g}", FirstBlockCacheConfig(threshold=t))
    for k in (3, 5, 8):
        for order in (1, 2):
            for lite in (False, True) if order == 2 else (True,):
                config = TaylorSeerCacheConfig(cache_interval=k, disable_cache_before_step=1, max_order=order,
                                               use_lite_mode=lite)  # fmt: skip
                yield _diffusers("diffusers TaylorSeer", f"interval={k} order={order}{' lite' if lite else ''}", config)
    for t in (0.03, 0.1, 0.3, 1.0):
        for skips in (3, 6):
            for retention in (0.04, 0.12):
                config = MagCacheConfig(threshold=t, max_skip_steps=skips, retention_ratio=retention,
                                        num_inference_steps=steps, mag_ratios=mag_ratios)  # fmt: skip
                setting = f"threshold={t:g} max_skip={skips} retention={retention:g}"
                yield _diffusers("diffusers MagCache", setting, config)
    for t in (0.1, 0.2, 0.4, 0.8):
        yield _cache_dit("cache-dit DBCache", f"F1B0 threshold={t:g}", t, None, steps)
        for order in (1, 2):
            yield _cache_dit("cache-dit DBCache+TaylorSeer", f"F1B0 threshold={t:g} order={order}", t, order, steps)


def attention_caches(current_timestep: Callable[[], Any]) -> Iterator[BlockCache]:
    """The attention-level settings swept on video pipelines: reuse of the spatial attention output for
    ``skip`` - 1 of every ``skip`` steps inside a timestep window (the defaults, and the whole trajectory).
    ``current_timestep``: the pipeline's ``current_timestep`` (both hooks ask it which step runs). FasterCache
    runs with ``is_guidance_distilled`` (a guidance-embedding pipeline has no unconditional batch to skip)."""
    for skip in (2, 3, 4, 6):
        for window in ((100, 800), (0, 1000)):
            setting = f"skip={skip} timesteps={window[0]}-{window[1]}"
            config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip,
                                                     spatial_attention_timestep_skip_range=window,
                                                     current_timestep_callback=current_timestep)  # fmt: skip
            yield _diffusers("diffusers PyramidAttentionBroadcast", setting, config, attention=True)
    for skip in (2, 3, 4, 6):
        for window in ((-1, 681), (-1, 1000)):
            setting = f"skip={skip} timesteps={window[0]}-{window[1]}"
            config = FasterCacheConfig(spatial_attention_block_skip_range=skip,
                                       spatial_attention_timestep_skip_range=window,
                                       current_timestep_callback=current_timestep, is_guidance_distilled=True,
                                       attention_weight_callback=lambda _: 0.5)  # fmt: skip
            yield _diffusers("diffusers FasterCache", setting, config, attention=True)
