r"""Validated selection without new model evaluations: candidate schedules replayed on a recorded full run.

A full-compute trajectory records, for every step ``i``, the latent ``z_i`` before the step and the velocity
``v_i`` it used. A candidate schedule is replayed on it with the runtime estimator
(:class:`~meancache.method.estimators.PaperRuleEstimator`): starting from ``z_hat_0 = z_0``,

* on a computed step ``i``: ``z_hat_{i+1} = z_hat_i + (sigma_{i+1} - sigma_i) v_i``, the recorded velocity
  standing in for the model's velocity at ``z_hat_i`` (the one approximation: no transformer runs);
* on a skipped step: the estimator's average-velocity step from its own history, as at run time.

The replay error of the candidate is ``sum_i mean|z_hat_{i+1} - z_{i+1}|`` over the ``N`` steps: the whole
closed-loop drift, across interval boundaries (the per-interval costs restart from the reference at each
computed step, so they miss how one interval's estimated velocities enter the next interval's history).
:func:`select_by_replay` keeps the candidate with the least error.

How its picks compare with running the candidates, and with the calibration's single PSSP solution, is
measured on the bundled models by ``benchmarks/bench_first_use_calibration.py`` (figures in
``docs/schedule_study.md``). What neither the replay nor the costs see, how the transformer answers a
look-back anchored at step 0, the candidates leave out
(:meth:`~meancache.calibration.Calibration.without_step_0_anchor`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meancache.method.estimators import HISTORY_DTYPE, PaperRuleEstimator
from meancache.schedule.schedule import Schedule


def replay_error(
    schedule: Schedule, latents: Sequence[torch.Tensor], velocities: Sequence[torch.Tensor], sigmas: Sequence[float]
) -> float:
    """``sum_i mean|z_hat_{i+1} - z_{i+1}|`` of ``schedule`` replayed on the full run ``latents[i]`` (before step
    ``i``), ``velocities[i]``, ``sigmas`` (module docstring); ``z_N = z_{N-1} + (sigma_N - sigma_{N-1}) v_{N-1}``."""
    n = len(sigmas) - 1
    if schedule.num_steps != n or len(latents) != n or len(velocities) != n:
        raise ValueError(
            f"a {schedule.num_steps}-step schedule cannot replay {len(latents)} latents and {len(velocities)} "
            f"velocities over {n} steps"
        )
    estimator = PaperRuleEstimator(schedule)
    z = latents[0].to(HISTORY_DTYPE)
    error = torch.zeros((), dtype=torch.float64, device=z.device)
    for step in range(n):
        v = velocities[step].to(HISTORY_DTYPE)
        if schedule.is_computed(step):
            estimator.record(step, z, sigmas[step], v)
            z = z + (sigmas[step + 1] - sigmas[step]) * v
        else:
            z, _ = estimator.estimate(step, z, sigmas[step], sigmas[step + 1])
        if step + 1 < n:
            reference = latents[step + 1].to(HISTORY_DTYPE)
        else:
            reference = latents[n - 1].to(HISTORY_DTYPE) + (sigmas[n] - sigmas[n - 1]) * v
        error += (z - reference).abs().mean()
    return float(error)


def select_by_replay(
    candidates: Sequence[Schedule],
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> Schedule:
    """The candidate with the least :func:`replay_error` on the recorded run; its metadata gains
    ``replay_error`` and ``replay_candidates``."""
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    errors = [replay_error(c, latents, velocities, sigmas) for c in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    chosen = candidates[best]
    metadata = {**chosen.metadata, "replay_error": errors[best], "replay_candidates": len(candidates)}
    return Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)
