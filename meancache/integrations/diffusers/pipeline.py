"""Switch MeanCache on and off on a diffusers pipeline instance, and report what it did."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.hooks import (
    SchedulerStepHook,
    SetTimestepsHook,
    attach_gates,
    refuse_diffusers_cache,
    transformer_names,
)
from meancache.integrations.diffusers.run import MeanCacheState, MeanCacheSummary

STATE_ATTRIBUTE = "_mean_cache_state"
"""Where a pipeline instance keeps its :class:`MeanCacheState` while MeanCache is on."""


def enable_mean_cache(pipe: DiffusionPipeline, config: MeanCacheConfig) -> None:
    """Make ``pipe`` skip transformer evaluations per ``config`` (instance-level, undone by :func:`disable_mean_cache`).

    ``pipe`` must pass :func:`check_supported`: flow-matching transformers (every one it holds is gated: Wan2.2's
    two experts share one schedule) stepped by a deterministic ``FlowMatchEulerDiscreteScheduler``. Works in any
    order with ``transformer.compile()``, ``torch.compile(pipe.transformer)``, regional compilation, offloading
    and context parallelism (MeanCache decides before any of them runs); diffusers' own caches are refused.
    """
    if not isinstance(config, MeanCacheConfig):
        raise TypeError(f"config must be a meancache.MeanCacheConfig, got {type(config).__name__}")
    check_supported(pipe)
    if getattr(pipe, STATE_ATTRIBUTE, None) is not None:
        raise RuntimeError("MeanCache is already enabled on this pipeline; call disable_mean_cache(pipe) first")
    scheduler = pipe.scheduler
    if isinstance(scheduler.__dict__.get("step"), SchedulerStepHook):
        raise RuntimeError("this scheduler is already driven by MeanCache on another pipeline; give each its own")
    for name in transformer_names(pipe):
        refuse_diffusers_cache(getattr(pipe, name))
    state = MeanCacheState(config, pipe)
    attach_gates(state)
    scheduler.step = SchedulerStepHook(state)
    scheduler.set_timesteps = SetTimestepsHook(state)
    setattr(pipe, STATE_ATTRIBUTE, state)


def check_supported(pipe: DiffusionPipeline) -> None:
    """Refuse, naming the pipeline and the reason, what MeanCache cannot drive: a pipeline without a ``transformer``
    module (nothing to skip) or a scheduler other than a deterministic ``FlowMatchEulerDiscreteScheduler``.

    The estimator's rule reads each step as an Euler step ``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i``: it
    takes the realised latents' average velocity for the trajectory's. Multistep solvers (UniPC, DPM-Solver++
    with flow sigmas: Wan's and Sana's defaults) and stochastic or second-order flow schedulers break that, and
    measured on the bundled models the rule fed to a multistep solver loses to that solver run with as few
    steps (``benchmarks/bench_multistep_schedulers.py``), so they are refused rather than run silently worse."""
    name = type(pipe).__name__
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise TypeError(
            f"MeanCache cannot drive {name}: it has no `transformer` module to skip (MeanCache accelerates "
            "flow-matching transformer pipelines: FLUX, Qwen-Image, Wan, ...)"
        )
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(
            f"MeanCache cannot drive {name} with its {type(scheduler).__name__}: MeanCache needs a "
            "FlowMatchEulerDiscreteScheduler (Euler flow matching), because its estimate assumes Euler steps. Use "
            "pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=...) with the model's flow shift, or keep "
            f"{type(scheduler).__name__} without MeanCache and run fewer steps"
        )
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError(
            f"MeanCache cannot drive {name}: its FlowMatchEulerDiscreteScheduler has stochastic_sampling=True; "
            "MeanCache needs deterministic Euler steps (stochastic_sampling=False)"
        )


def disable_mean_cache(pipe: DiffusionPipeline) -> None:
    """Remove MeanCache from ``pipe``: the transformer and scheduler behave exactly as before enabling (and every
    hook or compilation added since stays as it is)."""
    state = _state(pipe)
    for gate in state.gates.values():
        gate.remove()
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
