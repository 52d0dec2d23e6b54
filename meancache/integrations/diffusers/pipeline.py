"""Switch MeanCache on and off on a diffusers pipeline instance, and report what it did."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.hooks import (
    SchedulerStepHook,
    SetTimestepsHook,
    attach_gate,
    refuse_diffusers_cache,
)
from meancache.integrations.diffusers.run import MeanCacheState, MeanCacheSummary

STATE_ATTRIBUTE = "_mean_cache_state"
"""Where a pipeline instance keeps its :class:`MeanCacheState` while MeanCache is on."""


def enable_mean_cache(pipe: DiffusionPipeline, config: MeanCacheConfig) -> None:
    """Make ``pipe`` skip transformer evaluations per ``config`` (instance-level, undone by :func:`disable_mean_cache`).

    ``pipe`` must have a ``transformer`` module and a ``FlowMatchEulerDiscreteScheduler`` as ``scheduler``
    (FLUX.1, Qwen-Image, HunyuanVideo and other flow-matching pipelines). Works in any order with
    ``transformer.compile()``, ``torch.compile(pipe.transformer)``, regional compilation, offloading and
    context parallelism (MeanCache decides before any of them runs); diffusers' own caches are refused.
    """
    if not isinstance(config, MeanCacheConfig):
        raise TypeError(f"config must be a meancache.MeanCacheConfig, got {type(config).__name__}")
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no `transformer` module for MeanCache to skip")
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(
            f"MeanCache needs a FlowMatchEulerDiscreteScheduler (Euler flow matching); "
            f"{type(pipe).__name__} has {type(scheduler).__name__}"
        )
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError("MeanCache needs deterministic Euler steps; the scheduler has stochastic_sampling=True")
    if getattr(pipe, STATE_ATTRIBUTE, None) is not None:
        raise RuntimeError("MeanCache is already enabled on this pipeline; call disable_mean_cache(pipe) first")
    if isinstance(scheduler.__dict__.get("step"), SchedulerStepHook):
        raise RuntimeError("this scheduler is already driven by MeanCache on another pipeline; give each its own")
    refuse_diffusers_cache(transformer)
    state = MeanCacheState(config, pipe)
    attach_gate(state)
    scheduler.step = SchedulerStepHook(state)
    scheduler.set_timesteps = SetTimestepsHook(state)
    setattr(pipe, STATE_ATTRIBUTE, state)


def disable_mean_cache(pipe: DiffusionPipeline) -> None:
    """Remove MeanCache from ``pipe``: the transformer and scheduler behave exactly as before enabling (and every
    hook or compilation added since stays as it is)."""
    state = _state(pipe)
    if state.gate is not None:
        state.gate.remove()
    del state.scheduler.step, state.scheduler.set_timesteps
    delattr(pipe, STATE_ATTRIBUTE)


def summary(pipe: DiffusionPipeline) -> MeanCacheSummary:
    """What MeanCache did in ``pipe``'s last (or current) generation."""
    state = _state(pipe)
    result = state.run.summary() if state.run is not None else state.last_summary
    if result is None:
        raise RuntimeError("no generation has run since MeanCache was enabled on this pipeline")
    return result


def is_mean_cache_enabled(pipe: DiffusionPipeline) -> bool:
    """Whether :func:`enable_mean_cache` is in effect on ``pipe``."""
    return isinstance(getattr(pipe, STATE_ATTRIBUTE, None), MeanCacheState)


def _state(pipe: DiffusionPipeline) -> MeanCacheState:
    state = getattr(pipe, STATE_ATTRIBUTE, None)
    if not isinstance(state, MeanCacheState):
        raise ValueError(f"MeanCache is not enabled on this {type(pipe).__name__}; call enable_mean_cache first")
    return state
