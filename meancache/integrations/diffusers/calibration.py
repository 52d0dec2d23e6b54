"""Stability costs measured on a pipeline's own full-compute generations (``meancache calibrate``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from meancache.calibration import Calibration, StabilityCostAccumulator

StepObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextmanager
def observe_steps(pipe: DiffusionPipeline, observer: StepObserver) -> Iterator[None]:
    """While active, call ``observer(step, z, v, sigmas)`` on every scheduler step of ``pipe``: the latent
    before the step, the guided velocity it steps with, and the sigmas of the steps the generation runs. ``step``
    counts from the generation's first step: image-to-image and inpainting at ``strength < 1`` start the scheduler
    at step ``b`` (told by ``set_begin_index``, or only by the timestep, as Wan video-to-video), and are observed as
    ``N - b`` steps over ``sigmas[b:]``. MeanCache must be off."""
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"observing steps needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    if "step" in scheduler.__dict__:
        raise RuntimeError("the scheduler's step is already wrapped (MeanCache enabled?); disable it first")
    original = scheduler.step
    begin = 0

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal begin
        index = scheduler.step_index
        if index is None:  # a generation's first step: where the scheduler is about to start
            begin = scheduler.index_for_timestep(timestep) if scheduler.begin_index is None else scheduler.begin_index
            index = begin
        observer(index - begin, sample, model_output, scheduler.sigmas[begin:])
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
