r"""Validated selection without new model evaluations: candidate schedules replayed on a recorded full run.

A full-compute trajectory records, for every step ``i``, the latent ``z_i`` before the step and the velocity
``v_i`` it used. A candidate schedule is replayed on it with the runtime estimator's rule
(:class:`~meancache.method.estimators.PaperRuleEstimator`; all candidates at once, :func:`replay_errors`): starting
from ``z_hat_0 = z_0``,

* on a computed step ``i``: ``z_hat_{i+1} = z_hat_i + (sigma_{i+1} - sigma_i) v_i``, the recorded velocity
  standing in for the model's velocity at ``z_hat_i`` (the one approximation: no transformer runs);
* on a skipped step: the estimator's average-velocity step from its own history, as at run time.

The replay error of the candidate is ``sum_i mean|z_hat_{i+1} - z_{i+1}|`` over the ``N`` steps: the whole
closed-loop drift, across interval boundaries (the per-interval costs restart from the reference at each
computed step, so they miss how one interval's estimated velocities enter the next interval's history).
:func:`select_by_replay` keeps the candidate with the least error. :func:`replay_estimator_error` replays one
schedule under any other estimator (an extrapolation variant, say), driving its ``record`` / ``estimate`` step by
step: the same error, slower (one schedule at a time), for any rule; :func:`select_estimator_by_replay` picks the
estimator the chosen schedule runs with by it.

How its picks compare with running the candidates, and with the calibration's single PSSP solution, is
measured on the bundled models by ``benchmarks/bench_first_use_calibration.py`` (figures in
``docs/schedule_study.md``). What neither the replay nor the costs see, how the transformer answers a
look-back anchored at step 0, the candidates leave out
(:meth:`~meancache.calibration.Calibration.without_step_0_anchor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from meancache.calibration.costs import WORKING_SET
from meancache.method.estimators import ESTIMATOR_KEY, HISTORY_DTYPE, SELECTABLE, Estimator
from meancache.schedule.schedule import Schedule


def replay_error(
    schedule: Schedule, latents: Sequence[torch.Tensor], velocities: Sequence[torch.Tensor], sigmas: Sequence[float]
) -> float:
    """``sum_i mean|z_hat_{i+1} - z_{i+1}|`` of ``schedule`` replayed on the full run ``latents[i]`` (before step
    ``i``), ``velocities[i]``, ``sigmas`` (module docstring); ``z_N = z_{N-1} + (sigma_N - sigma_{N-1}) v_{N-1}``."""
    return replay_errors([schedule], latents, velocities, sigmas)[0]


def replay_errors(
    schedules: Sequence[Schedule],
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> list[float]:
    r""":func:`replay_error` of every schedule, replayed together: one float32 latent per schedule on a leading
    dimension, each with a ring of ``max_span + 1`` past latents and velocities as
    :class:`~meancache.method.estimators.PaperRuleEstimator` keeps. Step ``i`` (``h = sigma_{i+1} - sigma_i``)
    uses, per schedule, the recorded ``v_i`` where it computes the step, else the estimator's rule with
    ``k = min(K, i)``, anchor ``r = i - k`` and ``d = sigma_i - sigma_r``:

    .. math::

        \hat u_i = \hat u_{i-1} + \frac{h}{d^2} (\hat z_i - \hat z_r) - \frac{h}{d} \hat u_r, \qquad
        \hat z_{i+1} = \hat z_i + h\,\hat u_i

    (the fused kernel's form of the module docstring's rule). The errors stay on the device until the end. Groups
    of at most ``WORKING_SET`` latent elements replay at a time."""
    for schedule in schedules:
        _check_run(schedule, latents, velocities, sigmas)
    group = max(1, WORKING_SET // latents[0].numel()) if latents else 1
    errors = []
    for begin in range(0, len(schedules), group):
        errors += _replay_group(schedules[begin : begin + group], latents, velocities, sigmas)
    return errors


def replay_estimator_error(
    estimator: Callable[[Schedule], Estimator],
    schedule: Schedule,
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> float:
    r"""The replay error of ``schedule`` under any estimator: ``estimator(schedule)`` (a class of
    :mod:`meancache.method.estimators`, or any factory of one) is driven step by step on the full run, as the
    samplers drive it. From ``z_hat_0 = z_0``, step ``i`` (``h = sigma_{i+1} - sigma_i``) is

    .. math::

        \hat z_{i+1} = \hat z_i + h\, v_i \quad \text{(computed: } \texttt{record}(i, \hat z_i, \sigma_i, v_i)
        \text{)}, \qquad
        \hat z_{i+1} = \texttt{estimate}(i, \hat z_i, \sigma_i, \sigma_{i+1}) \quad \text{(skipped)},

    the recorded ``v_i`` standing in for the model's velocity at ``z_hat_i``, and the error is
    ``sum_i mean|z_hat_{i+1} - z_{i+1}|`` (``z_N`` as in :func:`replay_error`), in float32 on the latents' device.
    With :class:`~meancache.method.estimators.PaperRuleEstimator` it is :func:`replay_error` up to float32
    rounding. Estimators that need ``dv/dsigma`` on a computed step cannot be replayed (``ValueError``)."""
    _check_run(schedule, latents, velocities, sigmas)
    n = len(sigmas) - 1
    cache = estimator(schedule)
    z = latents[0].to(HISTORY_DTYPE)
    error = 0.0
    for step in range(n):
        v = velocities[step].to(z.device, HISTORY_DTYPE)
        h = sigmas[step + 1] - sigmas[step]
        if schedule.is_computed(step):
            if cache.needs_derivative(step):
                raise ValueError(f"the {cache.name!r} estimator needs dv/dsigma at step {step}: a replay has none")
            cache.record(step, z, sigmas[step], v)
            z = z + h * v
        else:
            z = cache.estimate(step, z, sigmas[step], sigmas[step + 1])[0]
        reference = latents[step + 1] if step + 1 < n else latents[n - 1].to(HISTORY_DTYPE) + h * v
        error += float(torch.mean((z - reference.to(z.device, HISTORY_DTYPE)).abs_()))
    return error


def _check_run(
    schedule: Schedule, latents: Sequence[torch.Tensor], velocities: Sequence[torch.Tensor], sigmas: Sequence[float]
) -> None:
    """Raise ``ValueError`` unless ``schedule`` and the recorded run have the same number of steps."""
    n = len(sigmas) - 1
    if schedule.num_steps != n or len(latents) != n or len(velocities) != n:
        raise ValueError(
            f"a {schedule.num_steps}-step schedule cannot replay {len(latents)} latents and {len(velocities)} "
            f"velocities over {n} steps"
        )


def _replay_group(
    schedules: Sequence[Schedule],
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> list[float]:
    """:func:`replay_errors` of a group of schedules small enough to replay together."""
    n = len(sigmas) - 1
    device, count = latents[0].device, len(schedules)
    slots = max(schedule.max_span for schedule in schedules) + 1
    computed, anchors, on_latent, on_velocity = _replay_tables(schedules, sigmas, slots)
    mask = torch.from_numpy(computed[..., None]).to(device)  # (N, schedules, 1): broadcast over the latent
    rows = torch.from_numpy(anchors * count + np.arange(count)).to(device)  # anchors' rows in the flat history
    on_latent, on_velocity = (
        torch.from_numpy(t[..., None]).to(device, HISTORY_DTYPE) for t in (on_latent, on_velocity)
    )
    z = latents[0].to(device, HISTORY_DTYPE).reshape(1, -1).repeat(count, 1)  # (schedules, latent)
    history_z = torch.zeros((slots, *z.shape), dtype=HISTORY_DTYPE, device=device)
    history_v = torch.zeros_like(history_z)
    flat_z, flat_v = history_z.view(-1, z.shape[1]), history_v.view(-1, z.shape[1])
    errors = torch.empty((n, count), dtype=HISTORY_DTYPE, device=device)
    for step in range(n):
        v = velocities[step].to(device, HISTORY_DTYPE).reshape(-1)
        slot = step % slots
        history_z[slot].copy_(z)
        u_hat = history_v[slot]
        if computed[step].all():
            u_hat.copy_(v)
        else:
            z_anchor, v_anchor = flat_z.index_select(0, rows[step]), flat_v.index_select(0, rows[step])
            torch.addcmul(history_v[(step - 1) % slots], on_latent[step], z - z_anchor, out=u_hat)
            torch.where(mask[step], v, u_hat.addcmul_(on_velocity[step], v_anchor, value=-1.0), out=u_hat)
        z += (sigmas[step + 1] - sigmas[step]) * u_hat
        if step + 1 < n:
            reference = latents[step + 1].to(device, HISTORY_DTYPE).reshape(-1)
        else:
            reference = latents[n - 1].to(device, HISTORY_DTYPE).reshape(-1) + (sigmas[n] - sigmas[n - 1]) * v
        torch.mean((z - reference).abs_(), 1, out=errors[step])
    return errors.double().sum(0).tolist()


def _replay_tables(
    schedules: Sequence[Schedule], sigmas: Sequence[float], slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(N, schedules)`` tables: whether the schedule computes the step, and where it does not, the ring slot of
    its anchor, ``h / d^2`` and ``h / d`` (:func:`replay_errors`; zeros on computed steps)."""
    n = len(sigmas) - 1
    computed = np.zeros((n, len(schedules)), dtype=bool)
    anchors = np.zeros((n, len(schedules)), dtype=np.int64)
    on_latent, on_velocity = np.zeros((n, len(schedules))), np.zeros((n, len(schedules)))
    for index, schedule in enumerate(schedules):
        for step in range(n):
            if schedule.is_computed(step):
                computed[step, index] = True
                continue
            anchor = step - min(schedule.span(step), step)
            h, d = sigmas[step + 1] - sigmas[step], sigmas[step] - sigmas[anchor]
            anchors[step, index], on_latent[step, index], on_velocity[step, index] = anchor % slots, h / (d * d), h / d
    return computed, anchors, on_latent, on_velocity


def select_by_replay(
    candidates: Sequence[Schedule],
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> Schedule:
    """The candidate with the least :func:`replay_error` on the recorded run (all replayed together by
    :func:`replay_errors`); its metadata gains ``replay_error`` and ``replay_candidates``."""
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    errors = replay_errors(candidates, latents, velocities, sigmas)
    best = min(range(len(candidates)), key=errors.__getitem__)
    chosen = candidates[best]
    metadata = {**chosen.metadata, "replay_error": errors[best], "replay_candidates": len(candidates)}
    return Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)


def select_estimator_by_replay(
    schedule: Schedule, runs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]]
) -> Schedule:
    """``schedule`` with the estimator of :data:`~meancache.method.estimators.SELECTABLE` whose
    :func:`replay_estimator_error`, summed over the recorded ``runs`` (each ``(latents, velocities, sigmas)``), is
    least named in its metadata (``ESTIMATOR_KEY``, which :class:`~meancache.MeanCacheConfig` follows by default),
    with every candidate's error (``estimator_replay_errors``). On a tie the earlier candidate (the paper's rule
    first) is kept."""
    errors = {estimator.name: sum(replay_estimator_error(estimator, schedule, *run) for run in runs)
              for estimator in SELECTABLE}  # fmt: skip
    best = min(errors, key=errors.__getitem__)
    metadata = {**schedule.metadata, ESTIMATOR_KEY: best, "estimator_replay_errors": errors}
    return Schedule(schedule.num_steps, schedule.compute_steps, schedule.spans, metadata)
