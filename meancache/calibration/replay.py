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
:func:`replay_estimator_error` replays one schedule under any other estimator (an extrapolation variant, say),
driving its ``record`` / ``estimate`` step by step: the same error, slower (one schedule at a time), for any rule.
:func:`select_by_replay` keeps the pair of candidate and estimator with the least error summed over the recorded
runs, then refines it; :func:`select_estimator_by_replay` chooses only the estimator of a given schedule.

How its picks compare with running the candidates, and with the calibration's single PSSP solution, is
measured on the bundled models by ``benchmarks/bench_first_use_calibration.py`` (figures in
``docs/schedule_study.md``). What neither the replay nor the costs see, how the transformer answers a
look-back anchored at step 0, the candidates leave out
(:meth:`~meancache.calibration.Calibration.without_step_0_anchor`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meancache.calibration.costs import WORKING_SET
from meancache.method.estimators import (
    ESTIMATOR_KEY,
    HISTORY_DTYPE,
    SELECTABLE,
    Estimator,
    PaperRuleEstimator,
    TrajectoryExtrapolationEstimator,
)
from meancache.schedule.schedule import Schedule

REPLAY_ELEMENTS = 1 << 15
"""The most elements of a latent a recorded run keeps (:func:`replay_sample`)."""
POOLED_ELEMENTS = 1 << 17
"""The most elements a replay pools from recorded runs on the same sigmas (each run gives an equal share)."""


def replay_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of ``tensor`` a recorded run keeps for replay, flattened: all of them when there are at most
    ``REPLAY_ELEMENTS``, else that many at fixed random positions (the same for every tensor of the same size).

    Replaying a schedule on them is replaying it on the whole run restricted to those elements, exactly: every
    estimator of :mod:`meancache.method.estimators` acts elementwise, and the recorded velocity stands in for the
    model's. The replay error is then a mean over a uniform sample of the elements, so a trajectory of a large
    latent (a 1024 x 1024 FLUX.1 image: 262,144 elements; a HunyuanVideo clip: millions) costs at most
    ``2 N REPLAY_ELEMENTS`` values to keep. The replay's cost grows with the elements: on this project's 2-core CPU
    (one thread), selecting and refining from three starts on four runs of a latent that size took 13 s at B = 10
    (3 moves) and about 31 s at B = 25 (8 moves) (``benchmarks/results/first_use_overhead.json``)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= REPLAY_ELEMENTS:
        return flat
    return flat.index_select(0, _sample_positions(flat.numel(), flat.device))


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    """``REPLAY_ELEMENTS`` distinct positions in ``range(numel)``, sorted, from a fixed seed."""
    chosen = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:REPLAY_ELEMENTS]
    return chosen.sort().values.to(device)


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
    estimator: type[Estimator] = PaperRuleEstimator,
) -> list[float]:
    r""":func:`replay_estimator_error` of every schedule under ``estimator`` (the paper's rule, or a
    :class:`~meancache.method.estimators.TrajectoryExtrapolationEstimator` in sigma), replayed together: one float32
    latent per schedule on a leading dimension, with the history the estimator keeps, and per step and schedule
    coefficients planned from the schedule alone. Step ``i`` (``h = sigma_{i+1} - sigma_i``) uses, per schedule,
    the recorded ``v_i`` where it computes the step, else the estimator's rule:

    * the paper's rule, with ``k = min(K, i)``, anchor ``r = i - k`` and ``d = sigma_i - sigma_r`` (a ring of
      ``max_span + 1`` past latents and velocities; the fused kernel's form of the rule):

      .. math::

          \hat u_i = \hat u_{i-1} + \frac{h}{d^2} (\hat z_i - \hat z_r) - \frac{h}{d} \hat u_r, \qquad
          \hat z_{i+1} = \hat z_i + h\,\hat u_i;

    * an extrapolation through the nodes ``c`` it chooses among the computed steps
      (:meth:`~meancache.method.estimators.TrajectoryExtrapolationEstimator.chosen_nodes`) with its weights ``w_c``
      (and ``w_z``, :meth:`~meancache.method.estimators.TrajectoryExtrapolationEstimator.step_weights`):
      ``z_hat_{i+1} = z_hat_i + h sum_c w_c v_c`` (velocity) or ``w_z z_hat_i + sum_c w_c (z_hat_c - sigma_c
      v_c)`` (data; a ring of the kept nodes' latents).

    Equal to :func:`replay_estimator_error` up to float32 rounding. The errors stay on the device until the end.
    Groups of at most ``WORKING_SET`` latent elements replay at a time."""
    for schedule in schedules:
        _check_run(schedule, latents, velocities, sigmas)
    if estimator is PaperRuleEstimator:
        replay_group = _replay_group
    elif issubclass(estimator, TrajectoryExtrapolationEstimator) and estimator.variable == "sigma":
        replay_group = functools.partial(_extrapolation_group, estimator)
    else:
        raise ValueError(f"the {estimator.name!r} estimator cannot be replayed in a batch: use replay_estimator_error")
    group = max(1, WORKING_SET // latents[0].numel()) if len(latents) else 1
    errors = []
    for begin in range(0, len(schedules), group):
        errors += replay_group(schedules[begin : begin + group], latents, velocities, sigmas)
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


def _extrapolation_group(
    estimator: type[TrajectoryExtrapolationEstimator],
    schedules: Sequence[Schedule],
    latents: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    sigmas: Sequence[float],
) -> list[float]:
    """:func:`replay_errors` of a group of schedules under an extrapolation ``estimator``."""
    n = len(sigmas) - 1
    device, count = latents[0].device, len(schedules)
    plan = _extrapolation_tables(estimator, schedules, sigmas)
    computed = torch.from_numpy(plan.computed).to(device)
    indices = (plan.node_steps, plan.ring_slots, plan.computed_slots)
    node_steps, ring_slots, computed_slots = (torch.from_numpy(t).to(device) for t in indices)
    on_z, on_ring, on_velocity = (torch.from_numpy(t).to(device, HISTORY_DTYPE)
                                  for t in (plan.on_z, plan.on_ring, plan.on_velocity))  # fmt: skip
    recorded = torch.stack([v.to(device, HISTORY_DTYPE).reshape(-1) for v in velocities])  # (N, latent)
    z = latents[0].to(device, HISTORY_DTYPE).reshape(1, -1).repeat(count, 1)  # (schedules, latent)
    data = estimator.target == "data"  # a ring of the kept nodes' latents; velocity nodes are recorded velocities
    ring = torch.zeros((estimator.kept_nodes() if data else 0, *z.shape), dtype=HISTORY_DTYPE, device=device)
    columns = torch.arange(count, device=device)
    errors = torch.empty((n, count), dtype=HISTORY_DTYPE, device=device)
    for step in range(n):
        h = sigmas[step + 1] - sigmas[step]
        if data:
            mask = computed[step]
            ring[computed_slots[step][mask], columns[mask]] = z[mask]
        estimate = z * on_z[step][:, None]
        for node in range(node_steps.shape[2]):
            estimate += on_velocity[step, :, node, None] * recorded[node_steps[step, :, node]]  # rounded as Euler
            if data:
                estimate.addcmul_(on_ring[step, :, node, None], ring[ring_slots[step, :, node], columns])
        z = estimate
        if step + 1 < n:
            reference = latents[step + 1].to(device, HISTORY_DTYPE).reshape(-1)
        else:
            reference = latents[n - 1].to(device, HISTORY_DTYPE).reshape(-1) + h * recorded[step]
        torch.mean((z - reference).abs_(), 1, out=errors[step])
    return errors.double().sum(0).tolist()


@dataclass
class _ExtrapolationTables:
    """Per step and schedule (``(N, schedules)``, nodes on a last axis of ``order``): whether the step is computed
    and the ring slot it stores its latent in, and ``z_hat_{i+1} = on_z z_hat_i + sum over nodes of on_velocity
    v[node_steps] + on_ring ring[ring_slots]`` (a computed step ``i``: ``on_z = 1``, one node ``i`` with
    ``on_velocity = h``; unused nodes have zero coefficients)."""

    computed: np.ndarray
    computed_slots: np.ndarray
    node_steps: np.ndarray
    ring_slots: np.ndarray
    on_z: np.ndarray
    on_velocity: np.ndarray
    on_ring: np.ndarray


def _extrapolation_tables(
    estimator: type[TrajectoryExtrapolationEstimator], schedules: Sequence[Schedule], sigmas: Sequence[float]
) -> _ExtrapolationTables:
    """The coefficients of :func:`_extrapolation_group`, from the estimator's own node choice and weights."""
    n, count, order = len(sigmas) - 1, len(schedules), estimator.order
    keep = estimator.kept_nodes()
    tables = _ExtrapolationTables(
        np.zeros((n, count), dtype=bool), np.zeros((n, count), dtype=np.int64),
        np.zeros((n, count, order), dtype=np.int64), np.zeros((n, count, order), dtype=np.int64),
        np.ones((n, count)), np.zeros((n, count, order)), np.zeros((n, count, order)),
    )  # fmt: skip
    for index, schedule in enumerate(schedules):
        kept: list[tuple[int, int]] = []  # (computed step, ring slot), oldest first
        ends = (*schedule.compute_steps[1:], n)
        for computed, end in zip(schedule.compute_steps, ends, strict=True):
            slot = (kept[-1][1] + 1) % keep if kept else 0
            tables.computed[computed, index], tables.computed_slots[computed, index] = True, slot
            tables.node_steps[computed, index, 0] = computed  # z + h v_computed
            tables.on_velocity[computed, index, 0] = sigmas[computed + 1] - sigmas[computed]
            kept = [*kept, (computed, slot)][-keep:]
            chosen = [kept[k] for k in estimator.chosen_nodes([c for c, _ in kept], end - computed)]
            node_sigmas = [sigmas[c] for c, _ in chosen]
            for step in range(computed + 1, end):
                h = sigmas[step + 1] - sigmas[step]
                weights, z_weight = estimator.step_weights(node_sigmas, sigmas[step], sigmas[step + 1])
                for node, ((c, slot), weight) in enumerate(zip(chosen, weights, strict=True)):
                    tables.node_steps[step, index, node], tables.ring_slots[step, index, node] = c, slot
                    if estimator.target == "velocity":  # z + h sum w v_c
                        tables.on_velocity[step, index, node] = h * weight
                    else:  # w_z z + sum w (z_c - sigma_c v_c)
                        tables.on_ring[step, index, node] = weight
                        tables.on_velocity[step, index, node] = -weight * sigmas[c]
                if estimator.target == "data":
                    tables.on_z[step, index] = z_weight
    return tables


Run = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]
"""A recorded full run: the latent before each step, the velocity it stepped with, and the sigmas."""


REFINE_SHIFTS = (-2, -1, 1, 2)
"""How far :func:`select_by_replay` moves one computed step at a time when refining its pick."""
REFINE_MAX_GAP = 12
"""The longest interval a refined schedule may have (the candidates' are at most the calibration's ``max_gap``)."""
REFINE_ROUNDS = 20
"""The most refinement rounds from one start (each moves one computed step); measured picks stop after 1-13 (shifts
of up to 3 steps gave the same picks on the bundled models as up to 2)."""
REFINE_STARTS = 3
"""How many pairs :func:`select_by_replay` refines: the best pair of each of this many best candidate schedules (a
local search from the best pair alone stopped above the error of pairs it could not reach: ``docs/schedule_study.md``,
"Refining from more than one start")."""


def select_by_replay(candidates: Sequence[Schedule], runs: Sequence[Run], refine: bool = True) -> Schedule:
    """The schedule and the estimator of :data:`~meancache.method.estimators.SELECTABLE` it runs with, chosen
    together by the least replay error on the recorded ``runs`` (:func:`replay_errors`, every schedule under every
    estimator; runs on the same sigmas pooled, so the error is the mean of theirs when they have the same size):

    1. the best pair of a candidate (``candidates``, e.g. PSSP solutions) and an estimator;
    2. with ``refine``, refined from ``REFINE_STARTS`` starts, the best pair of each of as many best candidate
       schedules, and the best result kept. From each: while it lowers the error (at most ``REFINE_ROUNDS`` times),
       the best pair whose schedule moves one interior computed step of the current one by ``REFINE_SHIFTS``,
       keeping the order, intervals of at most ``REFINE_MAX_GAP`` steps and the spans (capped so that no look-back
       anchors at step 0), under any estimator. It replays about ``6 x 4 (B - 2)`` schedules per move (a pair
       replayed once is remembered across starts): ``refine=False`` is for a pick needed quickly and soon replaced
       (first use's provisional calibrations).

    The estimator is named in the returned schedule's metadata (``ESTIMATOR_KEY``, which
    :class:`~meancache.MeanCacheConfig` follows by default) beside ``replay_error``, ``replay_candidates``,
    ``replay_moves`` (the refinement's moves) and every estimator's error on the returned schedule
    (``estimator_replay_errors``); the rest is the candidate's it was refined from. On a tie the earlier candidate
    and estimator (the paper's rule first) are kept.

    Measured on the bundled models (``docs/schedule_study.md``, "Choosing schedule and estimator together"): against
    choosing the schedule under the paper's rule and then its estimator, the worst of five first-use calibrations
    gains 2.3-6.9 dB at the three image cells it left under 2 dB above every peer (step 1), and the mean over them up
    to 3.7 dB more from step 2, which loses 1.7 dB at one of ten image cells. Three starts instead of one
    ("Refining from more than one start") lift the first-use mean at five of fifteen cells by 0.3-2.5 dB (flux B = 13,
    video B = 10-25) and lower none, for about three times the replays."""
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    if not runs:
        raise ValueError("runs is empty: nothing to replay the candidates on")
    scores = _ReplayScores(runs)
    best_per_schedule: dict[tuple[int, ...], tuple[float, Schedule, str]] = {}
    for pair in sorted(scores.pairs(candidates), key=lambda pair: pair[0]):  # stable: on a tie the earlier pair
        best_per_schedule.setdefault(pair[1].compute_steps, pair)
    starts = list(best_per_schedule.values())[: REFINE_STARTS if refine else 1]
    results = [(*(_refined(scores, start) if refine else (start, 0)), start[1]) for start in starts]
    (error, chosen, estimator), moves, origin = min(results, key=lambda result: result[0][0])  # a tie: earlier start
    metadata = {**origin.metadata, ESTIMATOR_KEY: estimator, "replay_error": error,
                "replay_candidates": len(candidates), "replay_moves": moves,
                "estimator_replay_errors": scores.table(chosen)}  # fmt: skip
    return Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)


def _refined(scores: _ReplayScores, start: tuple[float, Schedule, str]) -> tuple[tuple[float, Schedule, str], int]:
    """The pair :func:`select_by_replay`'s local search reaches from ``start``, and how many moves it made."""
    best, moves = start, 0
    while moves < REFINE_ROUNDS:
        neighbours = _neighbours(best[1])
        if not neighbours:
            break
        found = min(scores.pairs(neighbours), key=lambda pair: pair[0])
        if found[0] >= best[0]:
            break
        best, moves = found, moves + 1
    return best, moves


def select_estimator_by_replay(schedule: Schedule, runs: Sequence[Run]) -> Schedule:
    """``schedule`` with the estimator of :data:`~meancache.method.estimators.SELECTABLE` whose replay error on
    ``runs`` (pooled as :func:`select_by_replay` pools them) is least named in its metadata (``ESTIMATOR_KEY``),
    with every estimator's error (``estimator_replay_errors``); its steps and spans unchanged
    (:func:`select_by_replay` also chooses those)."""
    if not runs:
        raise ValueError("runs is empty: nothing to replay the schedule on")
    scores = _ReplayScores(runs)
    *_, estimator = min(scores.pairs([schedule]), key=lambda pair: pair[0])
    metadata = {**schedule.metadata, ESTIMATOR_KEY: estimator, "estimator_replay_errors": scores.table(schedule)}
    return Schedule(schedule.num_steps, schedule.compute_steps, schedule.spans, metadata)


class _ReplayScores:
    """Replay errors of (schedule, estimator) pairs on recorded runs, each pair replayed once (the estimators other
    than the paper's rule ignore the spans), summed over groups of runs with different sigmas."""

    def __init__(self, runs: Sequence[Run]) -> None:
        pooled: dict[tuple[float, ...], list[Run]] = {}
        for run in runs:
            pooled.setdefault(tuple(run[2]), []).append(run)
        self.runs = [_pooled(group) for group in pooled.values()]
        """The runs, those on the same sigmas pooled into one: their elements side by side."""
        self.errors: dict[tuple[tuple[int, ...], tuple[int, ...] | None, str], float] = {}

    @staticmethod
    def key(schedule: Schedule, estimator: type[Estimator]) -> tuple[tuple[int, ...], tuple[int, ...] | None, str]:
        spans = schedule.spans if estimator is PaperRuleEstimator else None
        return schedule.compute_steps, spans, estimator.name

    def pairs(self, schedules: Sequence[Schedule]) -> list[tuple[float, Schedule, str]]:
        """``(error, schedule, estimator name)`` of every schedule under every selectable estimator, in order."""
        for estimator in SELECTABLE:
            missing = list({self.key(s, estimator): s for s in schedules
                            if self.key(s, estimator) not in self.errors}.items())  # fmt: skip
            if missing:
                totals = [sum(column) for column in zip(*(
                    replay_errors([s for _, s in missing], *run, estimator=estimator) for run in self.runs
                ), strict=True)]  # fmt: skip
                self.errors.update(zip((k for k, _ in missing), totals, strict=True))
        return [(self.errors[self.key(s, e)], s, e.name) for s in schedules for e in SELECTABLE]

    def table(self, schedule: Schedule) -> dict[str, float]:
        """Every selectable estimator's error on ``schedule`` (already scored)."""
        return {e.name: self.errors[self.key(schedule, e)] for e in SELECTABLE}


def _pooled(runs: Sequence[Run]) -> Run:
    """Runs on the same sigmas as one: each step's latents (and velocities) flattened and concatenated, each run
    thinned to every ``k``-th element when they hold more than ``POOLED_ELEMENTS`` together (evenly over the run's
    elements, themselves a uniform sample of the latent by :func:`replay_sample`). Replaying it replays each of them
    at once (every estimator acts elementwise); its error is their errors' mean weighted by their sizes."""
    share = POOLED_ELEMENTS // len(runs)
    strides = [max(1, -(-run[0][0].numel() // share)) for run in runs]  # ceil(elements / share)
    if len(runs) == 1 and strides[0] == 1:
        return runs[0]

    def joined(part: int, step: int) -> torch.Tensor:
        return torch.cat([run[part][step].reshape(-1)[::stride] for run, stride in zip(runs, strides, strict=True)])

    steps = range(len(runs[0][0]))
    latents, velocities = [joined(0, step) for step in steps], [joined(1, step) for step in steps]
    return latents, velocities, runs[0][2]


def _neighbours(schedule: Schedule) -> list[Schedule]:
    """The schedules :func:`select_by_replay` refines ``schedule`` to: one interior computed step moved (its
    docstring)."""
    steps, found = schedule.compute_steps, []
    for index in range(1, len(steps) - 1):
        for shift in REFINE_SHIFTS:
            moved = (*steps[:index], steps[index] + shift, *steps[index + 1 :])
            if not moved[index - 1] < moved[index] < moved[index + 1]:
                continue
            if max(b - a for a, b in itertools.pairwise(moved)) > REFINE_MAX_GAP:
                continue
            spans = tuple(min(k, max(c, 1)) for c, k in zip(moved, schedule.spans, strict=False))
            found.append(Schedule(schedule.num_steps, moved, spans))
    return found
