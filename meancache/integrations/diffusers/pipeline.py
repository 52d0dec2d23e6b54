"""Switch MeanCache on and off on a diffusers pipeline instance, and report what it did."""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.components import gated_modules, refuse_diffusers_cache
from meancache.integrations.diffusers.gate import attach_gates
from meancache.integrations.diffusers.generation_summary import MeanCacheSummary
from meancache.integrations.diffusers.run import MeanCacheState
from meancache.integrations.diffusers.scheduler_hooks import SchedulerStepHook, SetTimestepsHook

STATE_ATTRIBUTE = "_mean_cache_state"
"""Where a pipeline instance keeps its :class:`MeanCacheState` while MeanCache is on."""


def enable_mean_cache(pipe: DiffusionPipeline, config: MeanCacheConfig) -> None:
    """Make ``pipe`` skip transformer evaluations per ``config`` (instance-level, undone by :func:`disable_mean_cache`).

    ``pipe`` must pass :func:`check_supported`: flow-matching transformers (every one it holds is gated: Wan2.2's
    two experts share one schedule) stepped by a deterministic ``FlowMatchEulerDiscreteScheduler`` or the flow
    DPM-Solver++. Works in any order with ``transformer.compile()``, ``torch.compile(pipe.transformer)``,
    regional compilation, offloading and context parallelism (MeanCache decides before any of them runs);
    diffusers' own caches are refused.
    """
    if not isinstance(config, MeanCacheConfig):
        raise TypeError(f"config must be a meancache.MeanCacheConfig, got {type(config).__name__}")
    check_supported(pipe)
    if getattr(pipe, STATE_ATTRIBUTE, None) is not None:
        raise RuntimeError("MeanCache is already enabled on this pipeline; call disable_mean_cache(pipe) first")
    scheduler = pipe.scheduler
    if isinstance(scheduler.__dict__.get("step"), SchedulerStepHook):
        raise RuntimeError("this scheduler is already driven by MeanCache on another pipeline; give each its own")
    for name in gated_modules(pipe):
        refuse_diffusers_cache(getattr(pipe, name))
    state = MeanCacheState(config, pipe)
    attach_gates(state)
    scheduler.step = SchedulerStepHook(state)
    scheduler.set_timesteps = SetTimestepsHook(state)
    setattr(pipe, STATE_ATTRIBUTE, state)


def check_supported(pipe: DiffusionPipeline) -> None:
    """Refuse, naming the pipeline and the reason, what MeanCache cannot drive: a pipeline without a ``transformer``
    module (nothing to skip), or a scheduler whose steps MeanCache's estimate does not hold on.

    Supported: a deterministic ``FlowMatchEulerDiscreteScheduler`` (the paper's setting: each step is
    ``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i``), and the flow DPM-Solver++ (``DPMSolverMultistepScheduler``
    with ``use_flow_sigmas``, ``prediction_type="flow_prediction"``, ``algorithm_type="dpmsolver++"``, order 1 or
    2: Sana's default), which is fed the estimated velocity on skipped steps. Its steps are not Euler steps, but
    the estimate was measured to hold on it (``benchmarks/bench_multistep_schedulers.py``; the figures are in
    docs/pipelines.md). Refused: UniPC (Wan's default; its corrector rewrites the latents the estimate was
    computed from, and MeanCache measured worse than UniPC run with the budget's steps, same benchmark), the SDE
    solvers, and every other scheduler."""
    name = type(pipe).__name__
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        inner = getattr(pipe, "pipe", None)
        hint = f"; pass its pipeline, `.pipe` ({type(inner).__name__})" if hasattr(inner, "transformer") else ""
        raise TypeError(
            f"MeanCache cannot drive {name}: it has no `transformer` module to skip (MeanCache accelerates "
            f"flow-matching transformer pipelines: FLUX, Qwen-Image, Wan, ...){hint}"
        )
    if (reason := unsupported_loop(type(pipe))) is not None:
        raise TypeError(f"MeanCache cannot drive {name}: {reason}")
    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", {})
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if config.get("stochastic_sampling", False):
            raise ValueError(
                f"MeanCache cannot drive {name}: its FlowMatchEulerDiscreteScheduler has stochastic_sampling=True; "
                "MeanCache needs deterministic Euler steps (stochastic_sampling=False)"
            )
        return
    flow_dpm = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++"}
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        wrong = {k: config.get(k) for k, v in flow_dpm.items() if config.get(k) != v}
        if config.get("solver_order") not in (1, 2):
            wrong["solver_order"] = config.get("solver_order")
        if not wrong:
            return
        raise ValueError(
            f"MeanCache cannot drive {name} with its DPMSolverMultistepScheduler configured with {wrong}: MeanCache "
            f"drives the flow DPM-Solver++ only ({flow_dpm}, solver_order 1 or 2), or a FlowMatchEulerDiscreteScheduler"
        )
    kind = type(scheduler).__name__
    raise TypeError(
        f"MeanCache cannot drive {name} with its {kind}: MeanCache needs a FlowMatchEulerDiscreteScheduler (Euler "
        "flow matching) or the flow DPM-Solver++, the schedulers its estimate was measured to hold on. Use "
        f"pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=...) with the model's flow shift, or keep {kind} "
        "without MeanCache and run fewer steps"
    )


def unsupported_loop(pipeline: type) -> str | None:
    """Why the denoising loop of ``pipeline`` (read from its class's source) steps in a way MeanCache does not follow,
    or None. Refused rather than run wrong: a scheduler step with ``per_token_timesteps`` moves each token from its
    own sigma (LTX-Video's condition pipeline), a second latent stream stepped by a ``copy.deepcopy`` of the
    scheduler (LTX-2's audio) would carry a copy of MeanCache's hooks into a second generation over the same
    transformer, which fails on its first step, and a loop
    over ``timesteps[:-1]`` (LTX-Video's long multi-prompt pipeline) never runs the last step MeanCache planned
    for."""
    try:
        source = inspect.getsource(pipeline)
    except (OSError, TypeError):  # no source (compiled or built at run time): nothing to read
        return None
    if re.search(r"per_token_timesteps\s*=", source):
        return (
            "its loop steps the scheduler with per_token_timesteps (each token from its own sigma); MeanCache's "
            "estimate needs one sigma per step"
        )
    if re.search(r"deepcopy\(\s*self\.scheduler\s*\)", source):
        return (
            "its loop steps a second latent stream (e.g. audio) with a copy of the scheduler, which would carry a "
            "copy of MeanCache's hooks: a second generation over the same transformer, whose skipped steps the copy "
            "cannot follow"
        )
    if re.search(r"for\s[^\n]*\bin\b[^\n]*timesteps\[\s*:\s*-1\s*\]", source):
        return (
            "its loop leaves the scheduler's last step out (`timesteps[:-1]`), and MeanCache plans its budget over "
            "every step the scheduler was given: the last computed step would never run"
        )
    return None


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
