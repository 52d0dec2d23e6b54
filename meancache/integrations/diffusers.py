"""MeanCache on diffusers pipelines, without forking pipelines or patching classes.

Two instance-level pieces share one :class:`MeanCacheState`:

* :class:`MeanCacheHook`, registered in the transformer's ``HookRegistry`` as ``"mean_cache"`` (registered
  last, so it is outermost: parallelism split hooks and block caches inside it never run on a skipped
  step). On a skipped step it answers every CFG branch with a placeholder of the velocity's shape and
  dtype without running the transformer.
* :class:`SchedulerStepHook`, installed as the pipeline's scheduler *instance*'s ``step``. It sees the
  guided, post-CFG velocity (Qwen-Image's norm rescale included): on computed steps it logs it; on skipped
  steps it discards the placeholder-derived value and steps with the estimator's average velocity.

So the estimator works on exactly the velocity the sampler uses, for every pipeline, as the paper's rule
requires. Estimators that need ``dv/dsigma`` (``"exact-jvp"``) get it per CFG branch from a forward-mode
pass of the transformer (:meth:`MeanCacheHook.forward_with_derivative`); the scheduler hook combines the
branch derivatives the way the pipeline combined the branches (:func:`guided_derivative`).

A generation starts when the scheduler has been reset by ``set_timesteps`` (its ``step_index`` is
``None``) and ends when the pipeline calls ``maybe_free_model_hooks()``; the latents history is freed then,
and only the counters shown by :func:`summary` are kept.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from meancache.config import MeanCacheConfig
from meancache.integrations.jvp_attention import sdpa_as_jvp_attention
from meancache.method.estimators import Estimator, make_estimator
from meancache.schedule import Schedule
from meancache.schedule.calibration import Calibration, StabilityCostAccumulator
from meancache.schedule.defaults import default_schedule

HOOK_NAME = "mean_cache"
logger = logging.getLogger(__name__)


@dataclass
class MeanCacheSummary:
    """What MeanCache did in one generation."""

    num_steps: int
    steps_run: int
    schedule: Schedule
    transformer_calls: int
    skipped_calls: int
    derivative_calls: int = 0
    """Transformer calls run as forward-mode (JVP) passes; included in ``transformer_calls``."""

    @property
    def computed_steps(self) -> int:
        return sum(self.schedule.is_computed(i) for i in range(self.steps_run))

    @property
    def reused_steps(self) -> int:
        return self.steps_run - self.computed_steps

    @property
    def spans_used(self) -> dict[int, int]:
        """Span ``K`` -> number of skipped steps that used it."""
        counts = Counter(self.schedule.span(i) for i in range(self.steps_run) if not self.schedule.is_computed(i))
        return dict(sorted(counts.items()))

    @property
    def ideal_speedup(self) -> float:
        """Steps per computed step: the speedup if the transformer were the only cost."""
        return self.steps_run / max(self.computed_steps, 1)

    def __str__(self) -> str:
        spans = ", ".join(f"K={k}: {n}" for k, n in self.spans_used.items()) or "none"
        mapped = self.schedule.metadata.get("mapped_from_steps")
        origin = f" (schedule mapped from {mapped} steps)" if mapped else ""
        unfinished = "" if self.steps_run == self.num_steps else f" of {self.num_steps} (interrupted)"
        jvp = f" ({self.derivative_calls} forward-mode)" if self.derivative_calls else ""
        return (
            f"MeanCache: {self.steps_run} steps{unfinished}{origin}, {self.computed_steps} computed, "
            f"{self.reused_steps} reused (spans {spans}); transformer calls: {self.transformer_calls} run{jvp}, "
            f"{self.skipped_calls} skipped; ideal speedup {self.ideal_speedup:.2f}x"
        )


@dataclass
class _Run:
    """One generation's state."""

    sigmas: list[float]
    timesteps: torch.Tensor
    estimator: Estimator
    steps_run: int = 0
    transformer_calls: int = 0
    skipped_calls: int = 0
    derivative_calls: int = 0
    branches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    """This step's (velocity, dv/dsigma) per transformer call, when the estimator asked for derivatives."""
    output_shape: torch.Size | None = None
    output_dtype: torch.dtype | None = None
    placeholder: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def schedule(self) -> Schedule:
        return self.estimator.schedule

    def summary(self) -> MeanCacheSummary:
        return MeanCacheSummary(
            len(self.sigmas) - 1, self.steps_run, self.schedule, self.transformer_calls, self.skipped_calls,
            self.derivative_calls,
        )  # fmt: skip


class MeanCacheState:
    """State shared by the transformer hook and the scheduler hook of one pipeline."""

    def __init__(self, config: MeanCacheConfig, pipe: DiffusionPipeline) -> None:
        self.config = config
        self.scheduler: FlowMatchEulerDiscreteScheduler = pipe.scheduler
        self.pipeline_name = type(pipe).__name__
        self.checkpoint = str(pipe.name_or_path or pipe.transformer.config.get("_name_or_path", "") or "")
        self._mapping_warned: set[int] = set()
        self.run: _Run | None = None
        self.last_summary: MeanCacheSummary | None = None

    def current_run(self) -> _Run:
        """The generation in progress, starting a new one when the scheduler has just been reset."""
        if self.scheduler.step_index is None:
            if self.run is None or self.run.steps_run > 0 or self.run.timesteps is not self.scheduler.timesteps:
                self._start_run()
        elif self.run is None:
            raise RuntimeError(
                f"MeanCache saw a generation already at step {self.scheduler.step_index}: enable it before "
                "the pipeline call, not during one"
            )
        assert self.run is not None
        return self.run

    def end_run(self) -> None:
        """Free the generation's history, keeping its summary."""
        if self.run is not None:
            self.last_summary = self.run.summary()
        self.run = None

    def _start_run(self) -> None:
        self.end_run()
        scheduler = self.scheduler
        if scheduler.timesteps is None:
            raise RuntimeError("the scheduler has no timesteps: the pipeline must call set_timesteps first")
        if scheduler.begin_index not in (None, 0):
            raise ValueError(
                f"the scheduler starts at step {scheduler.begin_index}, not 0; MeanCache schedules cover whole "
                "trajectories (image-to-image with strength < 1 is not supported)"
            )
        num_steps = len(scheduler.timesteps)
        sigmas = [float(s) for s in scheduler.sigmas.tolist()]
        if len(sigmas) != num_steps + 1:
            raise ValueError(f"expected {num_steps + 1} sigmas for {num_steps} steps, the scheduler has {len(sigmas)}")
        estimator = make_estimator(self.config.estimator, self._schedule_for(num_steps))
        self.run = _Run(sigmas=sigmas, timesteps=scheduler.timesteps, estimator=estimator)

    def _schedule_for(self, num_steps: int) -> Schedule:
        config = self.config
        if config.schedule is None:
            assert config.budget is not None
            return default_schedule(self.pipeline_name, self.checkpoint, num_steps, config.budget)
        schedule = config.schedule.for_steps(num_steps)
        if schedule is not config.schedule and num_steps not in self._mapping_warned:
            self._mapping_warned.add(num_steps)
            logger.warning(
                "MeanCache: the schedule was made for %d steps; this run has %d, so its computed steps are mapped "
                "in sigma space (budget %d kept). Calibrate for %d steps for a schedule made for this run.",
                config.schedule.num_steps, num_steps, schedule.budget, num_steps,
            )  # fmt: skip
        return schedule


class MeanCacheHook(ModelHook):
    """Transformer-root hook: runs the transformer on computed steps, answers skipped steps from cache."""

    _is_stateful = True

    def __init__(self, state: MeanCacheState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.state.current_run()
        if run.schedule.is_computed(run.steps_run):
            if run.estimator.needs_derivative(run.steps_run):
                output = self.forward_with_derivative(module, run, args, kwargs)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
            sample = output[0] if isinstance(output, tuple) else output.sample
            run.output_shape, run.output_dtype = sample.shape, sample.dtype
            run.transformer_calls += 1
            return output
        run.skipped_calls += 1
        placeholder = self._placeholder(run)
        return Transformer2DModelOutput(sample=placeholder) if kwargs.get("return_dict", True) else (placeholder,)

    def forward_with_derivative(
        self, module: torch.nn.Module, run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """One forward-mode pass: the velocity and its derivative along the trajectory, kept in ``run.branches``.

        Tangents: the velocity the previous step used on ``hidden_states`` (tiled over batched CFG branches;
        at step 0 the call's own output, one more call), and ``d timestep / d sigma`` on ``timestep``."""
        hidden, timestep = kwargs.get("hidden_states"), kwargs.get("timestep")
        if not (isinstance(hidden, torch.Tensor) and isinstance(timestep, torch.Tensor)):
            raise TypeError(
                f"the {run.estimator.name!r} estimator needs the transformer called with hidden_states= and "
                "timestep= tensors; this pipeline passes them differently"
            )

        def velocity(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            call = {**kwargs, "hidden_states": h, "timestep": t, "return_dict": False}
            return self.fn_ref.original_forward(*args, **call)[0]

        if run.steps_run == 0:
            tangent = velocity(hidden, timestep)
            run.transformer_calls += 1
        else:
            tangent = _tiled_over_branches(run.estimator.last_velocity(), hidden.shape, hidden.dtype, "hidden_states")
        timestep = timestep.contiguous()  # pipelines may pass an expanded (stride-0) batch of timesteps
        timestep_rate = timestep / run.sigmas[run.steps_run]  # the pipeline passes sigma times a constant
        with sdpa_as_jvp_attention(module):
            v, derivative = torch.func.jvp(velocity, (hidden, timestep), (tangent, timestep_rate))
        run.branches.append((v, derivative))
        run.derivative_calls += 1
        return Transformer2DModelOutput(sample=v) if kwargs.get("return_dict", True) else (v,)

    @staticmethod
    def _placeholder(run: _Run) -> torch.Tensor:
        """The previous step's velocity in the transformer's output dtype and shape (tiled over the batch when
        CFG branches are batched into one call). The scheduler hook replaces whatever the pipeline makes of it."""
        if run.placeholder is None or run.placeholder[0] != run.steps_run:
            assert run.output_shape is not None and run.output_dtype is not None
            velocity = run.estimator.last_velocity()
            placeholder = _tiled_over_branches(velocity, run.output_shape, run.output_dtype, "the transformer output")
            run.placeholder = (run.steps_run, placeholder)
        return run.placeholder[1]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.end_run()
        return module


def _tiled_over_branches(velocity: torch.Tensor, shape: torch.Size, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A copy of the latent-shaped ``velocity`` in ``dtype``, repeated along the batch to ``shape`` when CFG
    branches are batched into one transformer call (the pipeline must never see the estimator's own tensors)."""
    if velocity.shape[1:] != shape[1:] or shape[0] % velocity.shape[0]:
        raise RuntimeError(
            f"MeanCache needs {what} to have the latents' shape (or a multiple of their batch); got "
            f"{tuple(shape)} for latents {tuple(velocity.shape)}: this pipeline's model output is not the velocity "
            "the scheduler steps with"
        )
    copy = velocity.to(dtype, copy=True)
    tiles = shape[0] // velocity.shape[0]
    return copy.repeat(tiles, *[1] * (velocity.dim() - 1)) if tiles > 1 else copy


class SchedulerStepHook:
    """Installed as ``scheduler.step`` on the instance: logs or replaces the guided velocity of each step."""

    def __init__(self, state: MeanCacheState) -> None:
        self.state = state
        self.original_step = state.scheduler.step
        self._signature = inspect.signature(self.original_step)

    def __call__(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        bound = self._signature.bind(model_output, timestep, sample, *args, **kwargs)
        if bound.arguments.get("per_token_timesteps") is not None:
            raise ValueError("MeanCache does not support per_token_timesteps (every token must share one sigma)")
        run = self.state.current_run()
        step = run.steps_run
        scheduler_step = self.state.scheduler.step_index  # None before the first step of a generation
        if scheduler_step != step and not (step == 0 and scheduler_step is None):
            raise RuntimeError(f"the scheduler is at step {scheduler_step} but MeanCache expected step {step}")
        sigma, sigma_next = run.sigmas[step], run.sigmas[step + 1]
        if run.schedule.is_computed(step):
            derivative = guided_derivative(run.branches, model_output) if run.branches else None
            run.branches.clear()
            run.estimator.record(step, sample, sigma, model_output, derivative)
        else:
            _, u_hat = run.estimator.estimate(step, sample, sigma, sigma_next)
            model_output = u_hat.to(model_output.dtype)
        output = self.original_step(model_output, timestep, sample, *args, **kwargs)
        run.steps_run += 1
        return output


def guided_derivative(branches: list[tuple[torch.Tensor, torch.Tensor]], guided: torch.Tensor) -> torch.Tensor:
    r"""``d guided / d sigma`` from each transformer call's velocity and derivative.

    Per sample, the guided velocity is written as the least-squares combination of the branch velocities,
    ``g = sum_b w_b v_b``, and the same weights combine the derivatives, ``dg = sum_b w_b dv_b``. This is
    exact for linear guidance (one branch, CFG, true CFG); for Qwen-Image's norm rescale, ``g`` is still in
    the branches' span, but the derivative of the rescale factor itself is left out. Batched CFG calls
    are split into their latent-sized parts."""
    batch = guided.shape[0]
    velocities, derivatives = [], []
    for v, d in branches:
        if v.shape[0] % batch or v.shape[1:] != guided.shape[1:]:
            raise RuntimeError(
                f"a transformer output of shape {tuple(v.shape)} does not split into latents {tuple(guided.shape)}"
            )
        velocities += v.reshape(-1, *guided.shape).unbind(0)
        derivatives += d.reshape(-1, *guided.shape).unbind(0)
    v = torch.stack(velocities, 1).reshape(batch, len(velocities), -1).double()  # (B, branches, features)
    d = torch.stack(derivatives, 1).reshape(batch, len(derivatives), -1).float()
    g = guided.reshape(batch, -1, 1).double()
    weights = torch.linalg.pinv(v @ v.transpose(1, 2)) @ (v @ g)  # (B, branches, 1)
    return (weights.float().transpose(1, 2) @ d).reshape(guided.shape)


def enable_mean_cache(pipe: DiffusionPipeline, config: MeanCacheConfig) -> None:
    """Make ``pipe`` skip transformer evaluations per ``config`` (instance-level, undone by :func:`disable_mean_cache`).

    ``pipe`` must have a ``transformer`` module and a ``FlowMatchEulerDiscreteScheduler`` as ``scheduler``
    (FLUX.1, Qwen-Image, HunyuanVideo and other flow-matching pipelines).
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
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise RuntimeError("MeanCache is already enabled on this pipeline; call disable_mean_cache(pipe) first")
    if isinstance(scheduler.__dict__.get("step"), SchedulerStepHook):
        raise RuntimeError("this scheduler is already driven by MeanCache on another pipeline; give each its own")
    state = MeanCacheState(config, pipe)
    step_hook = SchedulerStepHook(state)
    registry.register_hook(MeanCacheHook(state), HOOK_NAME)
    scheduler.step = step_hook


def disable_mean_cache(pipe: DiffusionPipeline) -> None:
    """Remove MeanCache from ``pipe``: the transformer and scheduler behave exactly as before enabling."""
    hook = _hook(pipe)
    scheduler = hook.state.scheduler
    del scheduler.step
    pipe.transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)


def summary(pipe: DiffusionPipeline) -> MeanCacheSummary:
    """What MeanCache did in ``pipe``'s last (or current) generation."""
    state = _hook(pipe).state
    result = state.run.summary() if state.run is not None else state.last_summary
    if result is None:
        raise RuntimeError("no generation has run since MeanCache was enabled on this pipeline")
    return result


def _hook(pipe: DiffusionPipeline) -> MeanCacheHook:
    registry = getattr(getattr(pipe, "transformer", None), "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if not isinstance(hook, MeanCacheHook):
        raise ValueError(f"MeanCache is not enabled on this {type(pipe).__name__}; call enable_mean_cache first")
    return hook


StepObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextmanager
def observe_steps(pipe: DiffusionPipeline, observer: StepObserver) -> Iterator[None]:
    """While active, call ``observer(step, z, v, sigmas)`` on every scheduler step of ``pipe``: the latent
    before the step, the guided velocity it steps with, and the scheduler's sigmas. MeanCache must be off."""
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"observing steps needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    if "step" in scheduler.__dict__:
        raise RuntimeError("the scheduler's step is already wrapped (MeanCache enabled?); disable it first")
    original = scheduler.step

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        observer(scheduler.step_index or 0, sample, model_output, scheduler.sigmas)
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step


def calibrate_pipeline(
    pipe: DiffusionPipeline,
    calls: Iterable[dict[str, Any]],
    num_inference_steps: int,
    max_gap: int = 8,
    max_span: int = 5,
    aggregate: str = "mean",
) -> Calibration:
    """Measure stability costs on full-compute generations of ``pipe``, one per element of ``calls`` (the
    pipeline's keyword arguments: prompts or embeddings, seeds via ``generator``, size, guidance, ...)."""
    accumulator: StabilityCostAccumulator | None = None
    count = 0
    settings: dict[str, Any] = {}

    def observer(step: int, z: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor) -> None:
        nonlocal accumulator
        if accumulator is None:
            accumulator = StabilityCostAccumulator(sigmas.tolist(), max_gap, max_span, aggregate)
        accumulator.add_step(step, z, v)

    start = time.perf_counter()
    with observe_steps(pipe, observer):
        for kwargs in calls:
            pipe(**{"output_type": "latent", **kwargs, "num_inference_steps": num_inference_steps})
            count += 1
            if not settings:  # size, guidance, CFG: the plain (non-tensor) arguments of the first call
                settings = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
    if accumulator is None:
        raise ValueError("calls is empty: nothing was generated to calibrate on")
    first = next(iter(pipe.transformer.parameters()))
    metadata = {
        "pipeline": type(pipe).__name__,
        "model": pipe.transformer.config.get("_name_or_path", "") or type(pipe.transformer).__name__,
        "num_inference_steps": num_inference_steps,
        "scheduler": dict(pipe.scheduler.config),
        "dtype": str(first.dtype),
        "generations": count,
        "generation_settings": settings,
        "calibration_seconds": time.perf_counter() - start,
        "cost_kinds": ["one-shot", "closed-loop"],
    }
    return accumulator.result(metadata)


def select_schedule(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], candidates: Sequence[Schedule], num_inference_steps: int
) -> Schedule:
    """The candidate whose MeanCache runs of ``calls`` land closest to the full runs' final latents.

    Each call (pipeline keyword arguments, seeds via ``generator``) runs once in full and once per candidate,
    from the same noise (generators are rewound). The error of a candidate is the mean over calls of
    ``||z_hat - z|| / ||z||`` on the final latents; it is stored in the returned schedule's metadata
    (``validation_error``, with ``validation_candidates``). Use calls disjoint from those you evaluate on.
    """
    if not calls:
        raise ValueError("calls is empty: nothing to validate the candidates on")
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    wrong = sorted({c.num_steps for c in candidates} - {num_inference_steps})
    if wrong:
        raise ValueError(f"candidates for {wrong} steps cannot run with num_inference_steps={num_inference_steps}")
    seeded = []  # per call: its generators and their states, to rewind before each run
    for index, kwargs in enumerate(calls):
        generator = kwargs.get("generator")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(
                f"calls[{index}] has generator={generator!r}: each call needs a torch.Generator (or a list of "
                "them) so that every candidate starts from the same noise"
            )
        seeded.append([(g, g.get_state()) for g in generators])

    def final_latents() -> list[torch.Tensor]:
        latents = []
        for kwargs, states in zip(calls, seeded, strict=True):
            for generator, state in states:
                generator.set_state(state)
            with torch.inference_mode():
                out = pipe(**{**kwargs, "output_type": "latent", "num_inference_steps": num_inference_steps,
                              "return_dict": False})  # fmt: skip
            latents.append(out[0].float())
        return latents

    references = final_latents()
    errors = []
    for candidate in candidates:
        enable_mean_cache(pipe, MeanCacheConfig(candidate))
        try:
            latents = final_latents()
        finally:
            disable_mean_cache(pipe)
        errors.append(sum(float((z - r).norm() / r.norm()) for z, r in zip(latents, references, strict=True)))
    best = min(range(len(candidates)), key=errors.__getitem__)
    chosen = candidates[best]
    metadata = {**chosen.metadata, "validation_error": errors[best] / len(calls),
                "validation_candidates": len(candidates)}  # fmt: skip
    return Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)
