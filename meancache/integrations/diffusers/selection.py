"""Validated selection on a pipeline: the candidate schedule and its estimator, chosen together by replaying them on
full runs of the pipeline recorded step by step (:func:`meancache.calibration.select_by_replay`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from meancache.calibration import select_by_replay, select_estimator_by_replay
from meancache.calibration.replay import Run, replay_sample
from meancache.integrations.diffusers.calibration import observe_steps
from meancache.schedule import Schedule


def select_schedule(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], candidates: Sequence[Schedule], num_inference_steps: int
) -> Schedule:
    """The candidate, and the estimator it runs with, whose replay on the full runs of ``calls`` drifts least
    (:func:`~meancache.calibration.select_by_replay`; the estimator named in the returned schedule's metadata).

    Each call (pipeline keyword arguments: prompts, size, guidance, seeds via ``generator``) runs once in full,
    recorded step by step; no MeanCache run is needed. Use calls disjoint from those you evaluate on.

    Replay rather than MeanCache runs scored on their final latents (what this function did before the estimator
    was chosen with the schedule): on the bundled models the replayed and refined picks gain 20.2 dB summed over the ten
    image cells and 5.8 dB over the five held-out video cells (``docs/schedule_study.md``)."""
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    wrong = sorted({c.num_steps for c in candidates} - {num_inference_steps})
    if wrong:
        raise ValueError(f"candidates for {wrong} steps cannot run with num_inference_steps={num_inference_steps}")
    return select_by_replay(candidates, record_runs(pipe, calls, num_inference_steps))


def select_estimator(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], schedule: Schedule, num_inference_steps: int
) -> Schedule:
    """``schedule`` (steps and spans unchanged) with the estimator whose replay on the full runs of ``calls`` drifts
    least (:func:`~meancache.calibration.select_estimator_by_replay`; its name and every estimator's replay error in
    the metadata)."""
    if schedule.num_steps != num_inference_steps:
        raise ValueError(
            f"a schedule for {schedule.num_steps} steps cannot run with num_inference_steps={num_inference_steps}"
        )
    return select_estimator_by_replay(schedule, record_runs(pipe, calls, num_inference_steps))


def record_runs(pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], num_inference_steps: int) -> list[Run]:
    """The full run of each of ``calls`` (MeanCache off), recorded step by step for replay: its latents before each
    step, the velocities they stepped with (the elements :func:`~meancache.calibration.replay.replay_sample` keeps,
    float32, on the pipeline's device), and its sigmas."""
    if not calls:
        raise ValueError("calls is empty: nothing to replay the candidates on")
    runs: list[Run] = []

    def observe(step: int, z: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor) -> None:
        if step == 0:
            runs.append(([], [], sigmas.tolist()))
        latents, velocities, _ = runs[-1]
        latents.append(replay_sample(z).to(torch.float32, copy=True))
        velocities.append(replay_sample(v).to(torch.float32, copy=True))

    with observe_steps(pipe, observe):
        for kwargs in calls:
            # the pipeline's own no_grad, not inference_mode: a compiled transformer keeps the graph of plain calls
            pipe(**{**kwargs, "output_type": "latent", "num_inference_steps": num_inference_steps,
                    "return_dict": False})  # fmt: skip
    return runs
