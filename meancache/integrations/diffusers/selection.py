"""Validated selection: the candidate schedule, and then the estimator, whose runs land closest to the full runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from meancache.calibration import select_estimator_by_replay
from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.calibration import observe_steps
from meancache.integrations.diffusers.pipeline import disable_mean_cache, enable_mean_cache
from meancache.method.estimators import PaperRuleEstimator
from meancache.schedule import Schedule


def select_schedule(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], candidates: Sequence[Schedule], num_inference_steps: int
) -> Schedule:
    """The candidate whose MeanCache runs of ``calls`` land closest to the full runs' final latents, with the
    estimator it runs best with (:func:`select_estimator`, on the same full runs).

    Each call (pipeline keyword arguments, seeds via ``generator``) runs once in full and once per candidate under
    the paper's rule, from the same noise (generators are rewound). The error of a candidate is the mean over calls
    of ``||z_hat - z|| / ||z||`` on the final latents; it is stored in the returned schedule's metadata
    (``validation_error``, with ``validation_candidates``). Use calls disjoint from those you evaluate on.
    """
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    wrong = sorted({c.num_steps for c in candidates} - {num_inference_steps})
    if wrong:
        raise ValueError(f"candidates for {wrong} steps cannot run with num_inference_steps={num_inference_steps}")
    validation = _Validation(pipe, calls, num_inference_steps)
    errors = [validation.error(candidate, PaperRuleEstimator.name) for candidate in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    chosen = candidates[best]
    metadata = {**chosen.metadata, "validation_error": errors[best], "validation_candidates": len(candidates)}
    chosen = Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)
    return select_estimator_by_replay(chosen, validation.trajectories)


def select_estimator(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], schedule: Schedule, num_inference_steps: int
) -> Schedule:
    """``schedule`` with the estimator :func:`~meancache.calibration.select_estimator_by_replay` picks on the full
    runs of ``calls``, recorded step by step (the estimator's name and every candidate's error in its metadata).

    Replay, not MeanCache runs scored on their final latents as :func:`select_schedule` scores schedules: on the
    bundled models the replay's picks are the evaluation seeds' best at 9 of 10 image cells and lose 3.0 dB in
    total on the held-out video model against 12.0 dB for the final-latent score
    (``docs/schedule_study.md``, "Choosing the variant per budget"), and they cost no generation."""
    if schedule.num_steps != num_inference_steps:
        raise ValueError(
            f"a schedule for {schedule.num_steps} steps cannot run with num_inference_steps={num_inference_steps}"
        )
    return select_estimator_by_replay(schedule, _Validation(pipe, calls, num_inference_steps).trajectories)


class _Validation:
    """The full runs of validation ``calls`` (final latents, and each step's latent and velocity for replay) and the
    error of a MeanCache run against them (each call from the same noise: its generators are rewound before every
    run)."""

    def __init__(self, pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], num_inference_steps: int) -> None:
        if not calls:
            raise ValueError("calls is empty: nothing to validate the candidates on")
        self.pipe, self.calls, self.num_inference_steps = pipe, calls, num_inference_steps
        self.seeded = []  # per call: its generators and their states, to rewind before each run
        for index, kwargs in enumerate(calls):
            generator = kwargs.get("generator")
            generators = generator if isinstance(generator, list) else [generator]
            if not all(isinstance(g, torch.Generator) for g in generators):
                raise ValueError(
                    f"calls[{index}] has generator={generator!r}: each call needs a torch.Generator (or a list of "
                    "them) so that every candidate starts from the same noise"
                )
            self.seeded.append([(g, g.get_state()) for g in generators])
        self.trajectories: list[tuple[list[torch.Tensor], list[torch.Tensor], list[float]]] = []
        """Per call: the full run's latents before each step, the velocities they stepped with, its sigmas."""

        def observe(step: int, z: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor) -> None:
            if step == 0:
                self.trajectories.append(([], [], sigmas.tolist()))
            latents, velocities, _ = self.trajectories[-1]
            latents.append(z.detach().float().clone())
            velocities.append(v.detach().float().clone())

        with observe_steps(pipe, observe):
            self.references = self._final_latents()

    def error(self, schedule: Schedule, estimator: str) -> float:
        """Mean over the calls of ``||z_hat - z|| / ||z||`` of ``schedule`` run with ``estimator``."""
        enable_mean_cache(self.pipe, MeanCacheConfig(schedule, estimator=estimator))
        try:
            latents = self._final_latents()
        finally:
            disable_mean_cache(self.pipe)
        total = sum(float((z - r).norm() / r.norm()) for z, r in zip(latents, self.references, strict=True))
        return total / len(self.calls)

    def _final_latents(self) -> list[torch.Tensor]:
        latents = []
        for kwargs, states in zip(self.calls, self.seeded, strict=True):
            for generator, state in states:
                generator.set_state(state)
            # the pipeline's own no_grad, not inference_mode: a compiled transformer keeps the graph of plain calls
            out = self.pipe(**{**kwargs, "output_type": "latent", "num_inference_steps": self.num_inference_steps,
                               "return_dict": False})  # fmt: skip
            latents.append(out[0].float())
        return latents
