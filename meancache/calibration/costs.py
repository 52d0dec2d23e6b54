r"""Calibration: trajectory-stability costs measured on full-compute runs, the input of :func:`solve_pssp`.

For every edge ``i -> j`` (``i + 2 <= j <= i + max_gap``) and span ``K = 1 .. max_span``, on a reference
trajectory ``(z_t, v_t)`` where every step was computed:

* ``one-shot`` (the paper's stability deviation): the mean absolute error of the one-shot average-velocity
  estimate ``u_hat = v_i + (sigma_j - sigma_i) JVP_{(i-k) -> i}`` (``k = min(K, i)``) against the true
  average velocity ``u = (z_j - z_i) / (sigma_j - sigma_i)``;
* ``closed-loop``: what the runtime rule really does: compute step ``i``, then skip ``i+1 .. j-1`` with
  :class:`~meancache.method.estimators.PaperRuleEstimator` (span ``K``, the reference history before
  ``i``); the cost is the mean absolute error of the realised average velocity
  ``(z_hat_j - z_i) / (sigma_j - sigma_i)`` against ``u``, i.e. ``mean|z_hat_j - z_j| / |sigma_j - sigma_i|``.

Both are in velocity units. Costs are aggregated over trajectories by their mean (default) or their
maximum. Memory is bounded: a window of ``max_span + max_gap + 1`` steps, never a whole trajectory.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meancache.method.estimators import HISTORY_DTYPE, PaperRuleEstimator
from meancache.ops import average_velocity_step
from meancache.schedule.pssp import solve_pssp
from meancache.schedule.schedule import Schedule
from meancache.validation import check_int, check_metadata, check_sigmas, load_json_object

COST_KINDS = ("one-shot", "closed-loop")
AGGREGATES = ("mean", "max")
CALIBRATION_FORMAT_VERSION = 1
CANDIDATE_GAMMAS = (1.5, 2.0, 3.0)


@dataclass
class Calibration:
    """Stability costs of one model setting; ``costs(kind)[i, j, K - 1]`` is ``inf`` where not measured.

    Checked on construction: finite, strictly decreasing ``sigmas`` (``N + 1`` of them, ``N <= MAX_STEPS``),
    ``max_gap >= 2``, ``1 <= max_span <= N``, ``trajectories >= 1``, a known ``aggregate``, ``metadata`` a dict,
    and both cost arrays of shape ``(N, N, max_span)`` with no negative or NaN entries."""

    sigmas: list[float]
    max_gap: int
    max_span: int
    one_shot: np.ndarray
    closed_loop: np.ndarray
    trajectories: int
    aggregate: str = "mean"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sigmas = check_sigmas(self.sigmas)
        n = len(self.sigmas) - 1
        self.max_gap = check_int(self.max_gap, "max_gap", 2)
        self.max_span = check_int(self.max_span, "max_span", 1, n)
        self.trajectories = check_int(self.trajectories, "trajectories", 1)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {self.aggregate!r}; available: {list(AGGREGATES)}")
        self.metadata = check_metadata(self.metadata)
        for name, costs in (("one_shot", self.one_shot), ("closed_loop", self.closed_loop)):
            if not isinstance(costs, np.ndarray) or costs.shape != (n, n, self.max_span):
                shape = costs.shape if isinstance(costs, np.ndarray) else type(costs).__name__
                expected = (n, n, self.max_span)
                raise ValueError(f"{name} must be an array of shape (N, N, max_span) = {expected}, got {shape}")
            if np.isnan(costs).any() or (costs < 0).any():
                raise ValueError(f"{name} costs must be >= 0 (inf where not measured), got NaN or negative entries")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def costs(self, kind: str = "closed-loop") -> np.ndarray:
        if kind not in COST_KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; available: {list(COST_KINDS)}")
        return self.one_shot if kind == "one-shot" else self.closed_loop

    def schedule(self, budget: int, kind: str = "closed-loop", gamma: float = 2.0) -> Schedule:
        """The PSSP schedule for ``budget`` computed steps, with this calibration's provenance."""
        schedule = solve_pssp(self.costs(kind), budget, gamma=gamma, max_gap=self.max_gap)
        metadata = {**self.metadata, **schedule.metadata, "cost_kind": kind, "budget": budget}
        return Schedule(schedule.num_steps, schedule.compute_steps, schedule.spans, metadata)

    def candidate_schedules(self, budget: int) -> list[Schedule]:
        """Closed-loop PSSP schedules for ``budget`` over a small grid of solver settings, for validation
        (:func:`meancache.integrations.diffusers.select_schedule`, :func:`meancache.calibration.select_by_replay`):
        ``gamma`` in ``CANDIDATE_GAMMAS``, the largest span in ``3 .. max_span`` and the largest gap in
        ``max_gap - 2 .. max_gap`` and, when shorter, the shortest gap the budget can bridge,
        ``ceil((N - 1) / (budget - 1))`` (at large budgets the evenly spread schedule), each with its spans
        capped by :meth:`without_step_0_anchor`. The costs only approximate the error of a whole run, so the best
        of these is picked by running them; the grid is small because settings close to the calibration's own
        give nearly the same schedules."""
        candidates: dict[tuple[tuple[int, ...], tuple[int, ...]], Schedule] = {}
        bridging = math.ceil((self.num_steps - 1) / max(budget - 1, 1))
        gaps = sorted({*range(max(2, self.max_gap - 2), self.max_gap + 1), max(2, min(bridging, self.max_gap))})
        for gap in gaps:
            for span in range(min(3, self.max_span), self.max_span + 1):
                for gamma in CANDIDATE_GAMMAS:
                    try:
                        found = solve_pssp(self.closed_loop[..., :span], budget, gamma=gamma, max_gap=gap)
                    except ValueError:  # this gap cannot bridge the run with this budget
                        continue
                    schedule = self.without_step_0_anchor(found, span)
                    candidates.setdefault((schedule.compute_steps, schedule.spans), schedule)
        if not candidates:
            raise ValueError(f"no schedule with {budget} computed steps bridges gaps of at most {self.max_gap}")
        return list(candidates.values())

    def without_step_0_anchor(self, solved: Schedule, max_span: int) -> Schedule:
        r"""``solved`` (a closed-loop PSSP solution with spans up to ``max_span``) with this calibration's
        provenance and no look-back anchored at step 0: the interval after computed step ``c`` gets span
        ``min(K, max(c, 1))``, so its first skipped step's anchor ``c + 1 - K`` is step 1 or later (after step
        0 only plain reuse). Edge costs in the metadata are those of the capped spans.

        Why: the velocity at step 0 (pure noise) is where the trajectory turns fastest, and a finite-difference
        JVP from it extrapolates that turn into the interval. The per-interval costs and the replay score both
        spans within about 1 %, because they use the recorded velocities, but real runs do not: measured on the
        bundled image models by ``benchmarks/bench_first_use_calibration.py``, figures in
        ``docs/schedule_study.md#no-look-back-anchored-at-step-0-stop-22``."""
        steps = solved.compute_steps
        spans = tuple(min(k, max(c, 1)) for c, k in zip(steps, solved.spans, strict=False))
        intervals = zip(itertools.pairwise(steps), spans, strict=True)
        edges = [float(self.closed_loop[i, j, k - 1]) for (i, j), k in intervals if j > i + 1]
        metadata = {
            **self.metadata,
            **solved.metadata,
            "cost_kind": "closed-loop",
            "max_span": max_span,
            "budget": solved.budget,
            "worst_edge_cost": max(edges, default=0.0),
            "total_edge_cost": sum(edges),
        }
        return Schedule(solved.num_steps, solved.compute_steps, spans, metadata)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON (unmeasured costs as ``null``)."""

        def as_list(costs: np.ndarray) -> list[Any]:
            return np.where(np.isfinite(costs), costs, np.nan).tolist()

        data = {
            "format_version": CALIBRATION_FORMAT_VERSION,
            "sigmas": self.sigmas,
            "max_gap": self.max_gap,
            "max_span": self.max_span,
            "trajectories": self.trajectories,
            "aggregate": self.aggregate,
            "metadata": self.metadata,
            "one_shot": as_list(self.one_shot),
            "closed_loop": as_list(self.closed_loop),
        }
        text = json.dumps(data).replace("NaN", "null")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a file written by :meth:`save`; every check of the constructor applies, costs must be numbers
        or ``null`` (not measured), and an error names the file."""
        data = load_json_object(path, "calibration")
        required = {"format_version", "sigmas", "max_gap", "max_span", "trajectories", "one_shot", "closed_loop"}
        if not required <= set(data):
            raise ValueError(f"{os.fspath(path)!r} is not a calibration file (needs keys {sorted(required)})")
        if data["format_version"] != CALIBRATION_FORMAT_VERSION:
            raise ValueError(f"calibration format_version {data['format_version']!r} is not supported")
        try:
            return cls(
                data["sigmas"], data["max_gap"], data["max_span"], _cost_array(data["one_shot"], "one_shot"),
                _cost_array(data["closed_loop"], "closed_loop"), data["trajectories"],
                data.get("aggregate", "mean"), data.get("metadata", {}),
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise type(e)(f"{os.fspath(path)!r} is not a valid calibration: {e}") from e


def _cost_array(rows: Any, name: str) -> np.ndarray:
    """Nested JSON lists of costs as a float array, ``null`` (not measured) as ``inf``; anything but numbers,
    ``null`` and lists (strings, booleans, objects) is refused rather than converted."""
    if not isinstance(rows, list):
        raise TypeError(f"{name} must be nested lists of costs, got {type(rows).__name__}")
    pending = [rows]
    while pending:
        for item in pending.pop():
            if isinstance(item, list):
                pending.append(item)
            elif item is not None and (isinstance(item, bool) or not isinstance(item, (int, float))):
                raise TypeError(f"{name} costs must be numbers or null, got {item!r} ({type(item).__name__})")
    try:
        array = np.array(rows, dtype=np.float64)  # None -> nan
    except ValueError as e:  # ragged nesting
        raise ValueError(f"{name} must be a regular (N, N, max_span) nesting of lists: {e}") from e
    return np.where(np.isnan(array), np.inf, array)


class StabilityCostAccumulator:
    """Streams full-compute trajectories step by step and accumulates both cost kinds.

    Call :meth:`add_step` with steps ``0 .. N-1`` of a trajectory in order (latent before the step, and its
    velocity); a trajectory ends at step ``N - 1`` and the next call with step 0 starts another.
    """

    def __init__(self, sigmas: Sequence[float], max_gap: int = 8, max_span: int = 5, aggregate: str = "mean") -> None:
        self.sigmas = check_sigmas(sigmas)
        n = len(self.sigmas) - 1
        max_gap = check_int(max_gap, "max_gap (an edge must skip a step)", 2)
        max_span = check_int(max_span, "max_span", 1, n)
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; available: {list(AGGREGATES)}")
        self.num_steps, self.max_gap, self.max_span, self.aggregate = n, max_gap, max_span, aggregate
        shape = (n, n, max_span)
        self._totals = {kind: np.zeros(shape) for kind in COST_KINDS}
        self._measured = np.zeros((n, n), dtype=bool)
        self._current = {kind: np.zeros(shape) for kind in COST_KINDS}
        self._window: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque(maxlen=max_span + max_gap + 1)
        self._next_step = 0
        self.trajectories = 0

    def add_step(self, step: int, z: torch.Tensor, v: torch.Tensor) -> None:
        """Add step ``step`` of the current trajectory: ``z`` before the step, ``v`` the velocity it used."""
        if step != self._next_step:
            raise RuntimeError(f"trajectory steps must arrive in order: expected step {self._next_step}, got {step}")
        self._window.append((step, z.detach().to(HISTORY_DTYPE, copy=True), v.detach().to(HISTORY_DTYPE, copy=True)))
        if step >= self.max_gap:
            self._edges_from(step - self.max_gap, step)
        if step == self.num_steps - 1:
            for start in range(max(0, step - self.max_gap + 1), step - 1):
                self._edges_from(start, step)
            self._close_trajectory()
        else:
            self._next_step = step + 1

    def result(self, metadata: dict[str, Any] | None = None) -> Calibration:
        if not self.trajectories:
            raise RuntimeError("no complete trajectory was added")
        costs = {}
        for kind in COST_KINDS:
            total = self._totals[kind] / (self.trajectories if self.aggregate == "mean" else 1)
            costs[kind] = np.where(self._measured[..., None], total, np.inf)
        return Calibration(
            self.sigmas, self.max_gap, self.max_span, costs["one-shot"], costs["closed-loop"], self.trajectories,
            self.aggregate, dict(metadata or {}),
        )  # fmt: skip

    def _get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._window[0][0]
        _, z, v = self._window[step - first]
        return z, v

    def _edges_from(self, start: int, end: int) -> None:
        """Costs of edges ``start -> j`` for ``j`` in ``start + 2 .. end``, every span."""
        if end < start + 2:
            return
        s = self.sigmas
        z_i, v_i = self._get(start)
        targets = range(start + 2, end + 1)
        for span in range(1, self.max_span + 1):
            k = min(span, start)
            one_shot = self._current["one-shot"][start, :, span - 1]
            for j in targets:
                z_j = self._get(j)[0]
                if k == 0:
                    predicted = z_i + (s[j] - s[start]) * v_i
                else:
                    z_r, v_r = self._get(start - k)
                    predicted, _ = average_velocity_step(z_i, v_i, z_r, v_r, s[start - k], s[start], s[j])
                one_shot[j] = _velocity_error(predicted, z_j, s[j] - s[start])
            self._closed_loop(start, end, span, k)
        self._measured[start, start + 2 : end + 1] = True

    def _closed_loop(self, start: int, end: int, span: int, k: int) -> None:
        """Run the runtime rule from computed step ``start`` over skipped steps up to ``end``."""
        s, first = self.sigmas, start - k
        steps = end - first + 1  # the rule never looks back further than step 0, so the span is capped there
        local = Schedule(steps, (*range(k + 1), end - first), (1,) * k + (min(span, steps),))
        estimator = PaperRuleEstimator(local)
        for step in range(first, start + 1):
            z, v = self._get(step)
            estimator.record(step - first, z, s[step], v)
        z_i, v_i = self._get(start)
        z_hat = z_i + (s[start + 1] - s[start]) * v_i
        closed = self._current["closed-loop"][start, :, span - 1]
        for m in range(start + 1, end + 1):
            if m >= start + 2:
                closed[m] = _velocity_error(z_hat, self._get(m)[0], s[m] - s[start])
            if m < end:
                z_hat, _ = estimator.estimate(m - first, z_hat, s[m], s[m + 1])

    def _close_trajectory(self) -> None:
        for kind in COST_KINDS:
            if self.aggregate == "mean":
                self._totals[kind] += self._current[kind]
            else:
                np.maximum(self._totals[kind], self._current[kind], out=self._totals[kind])
            self._current[kind].fill(0.0)
        self.trajectories += 1
        self._window.clear()
        self._next_step = 0


def _velocity_error(predicted: torch.Tensor, reference: torch.Tensor, dsigma: float) -> float:
    """``mean|predicted - reference| / |dsigma|``: a latent error over an interval, in velocity units."""
    return (predicted - reference).abs().mean().item() / abs(dsigma)


def calibrate(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    latents: Iterable[torch.Tensor],
    sigmas: Sequence[float] | torch.Tensor,
    max_gap: int = 8,
    max_span: int = 5,
    aggregate: str = "mean",
    metadata: dict[str, Any] | None = None,
) -> Calibration:
    """Run the full-compute Euler trajectory from each initial latent and measure its stability costs."""
    values = check_sigmas(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)
    accumulator = StabilityCostAccumulator(values, max_gap, max_span, aggregate)
    start = time.perf_counter()
    for z in latents:
        for step in range(accumulator.num_steps):
            v = velocity_fn(z, values[step])
            accumulator.add_step(step, z, v)
            z = z + (values[step + 1] - values[step]) * v
    return accumulator.result({**(metadata or {}), "calibration_seconds": time.perf_counter() - start})
