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
maximum. Memory is bounded: a window of ``max_span + max_gap + 1`` steps and, while a start step's costs are
computed, ``2 max_span (max_gap - 1)`` latent-sized prediction errors; never a whole trajectory.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meancache.method.estimators import HISTORY_DTYPE
from meancache.schedule.pssp import solve_pssp
from meancache.schedule.schedule import Schedule
from meancache.validation import check_int, check_metadata, check_sigmas, load_json_object

COST_KINDS = ("one-shot", "closed-loop")
AGGREGATES = ("mean", "max")
CALIBRATION_FORMAT_VERSION = 1
CANDIDATE_GAMMAS = (1.5, 2.0, 3.0)
SPACING_POWERS = (1.0, 1.25, 1.5, 2.0)
"""The powers ``p`` of :meth:`Calibration.candidate_schedules`' spaced candidates: steps 0 and 1, then ``B - 2``
steps from 2 to ``N - 1`` at ``2 + round((N - 3) (k / (B - 3))^p)``, denser early for ``p > 1``."""
SPACED_SPAN = 3
"""The span of the spaced candidates' intervals (capped so that no look-back anchors at step 0)."""
WORKING_SET = 1 << 18
"""Float32 elements (1 MiB) of the largest intermediate the batched cost and replay computations make at a time:
it stays in a CPU core's cache, so large latents are done in chunks of columns (or of candidates) that size."""


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
        capped by :meth:`without_step_0_anchor`; then the spaced schedules of :data:`SPACING_POWERS` whose gaps
        are at most ``max_gap`` (:meth:`spaced_candidates`). The costs only approximate the error of a whole run, so
        the best of these is picked by running them; the grid is small because settings close to the calibration's
        own give nearly the same schedules."""
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
        for schedule in self.spaced_candidates(budget):
            candidates.setdefault((schedule.compute_steps, schedule.spans), schedule)
        if not candidates:
            raise ValueError(f"no schedule with {budget} computed steps bridges gaps of at most {self.max_gap}")
        return list(candidates.values())

    def spaced_candidates(self, budget: int) -> list[Schedule]:
        """Candidates spaced by a power law instead of solved from the costs: for each ``p`` of
        :data:`SPACING_POWERS`, steps 0 and 1, then ``budget - 2`` steps from 2 to ``N - 1`` at
        ``2 + round((N - 3) (k / (budget - 3))^p)`` (each at least one past the one before), spans
        :data:`SPACED_SPAN` capped by :meth:`without_step_0_anchor`; those with a gap above ``max_gap`` are left out.

        Why: PSSP on the costs of a few calibrating runs can leave out schedules dense in the first steps, where
        the trajectory turns fastest, and the replay's refinement (:func:`~meancache.calibration.select_by_replay`)
        moves one step at a time, so it does not reach them. Steps 0 and 1 are kept because a schedule that skips
        step 1 replays well and runs worse: measured on first use of the bundled models,
        ``docs/schedule_study.md``, "Spaced candidates"."""
        n = self.num_steps
        if budget < 4:  # (k / (budget - 3)) needs budget - 3 >= 1; a budget above N fails the last-step check
            return []
        found = []
        for power in SPACING_POWERS:
            steps = [0, 1]
            for k in range(budget - 2):
                steps.append(max(2 + round((n - 3) * (k / (budget - 3)) ** power), steps[-1] + 1))
            gap = max(b - a for a, b in itertools.pairwise(steps))
            if steps[-1] != n - 1 or gap > self.max_gap:
                continue
            metadata = {"source": "spaced", "max_gap": gap, "spacing_power": power}
            spaced = Schedule(n, tuple(steps), (SPACED_SPAN,) * (budget - 1), metadata)
            found.append(self.without_step_0_anchor(spaced, SPACED_SPAN))
        return found

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
        """Write as JSON (unmeasured costs as ``null``), the costs last."""
        data = {
            "format_version": CALIBRATION_FORMAT_VERSION,
            "sigmas": self.sigmas,
            "max_gap": self.max_gap,
            "max_span": self.max_span,
            "trajectories": self.trajectories,
            "aggregate": self.aggregate,
            "metadata": self.metadata,
        }
        costs = f'"one_shot": {_json_costs(self.one_shot)}, "closed_loop": {_json_costs(self.closed_loop)}'
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{json.dumps(data)[:-1]}, {costs}}}\n")

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


def _json_costs(costs: np.ndarray) -> str:
    """``costs`` as nested JSON arrays, ``json.dumps``' text for the nested lists (``null`` where not finite), made
    from strings: nested lists of a calibration's size are thousands of objects the garbage collector tracks, and
    making them while a generation runs can set off a full collection of a process holding a model."""
    text = ["null" if not math.isfinite(value) else repr(value) for value in costs.ravel().tolist()]
    for size in reversed(costs.shape):
        text = ["[" + ", ".join(text[i : i + size]) + "]" for i in range(0, len(text), size)]
    return text[0]


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
    r"""Streams full-compute trajectories step by step and accumulates both cost kinds.

    Call :meth:`add_step` with steps ``0 .. N-1`` of a trajectory in order (latent before the step, and its
    velocity); a trajectory ends at step ``N - 1`` and the next call with step 0 starts another.

    Both cost kinds are linear in the recorded latents and velocities, and the rule is translation-equivariant
    in the latents, so every prediction error is a fixed combination, set by the sigmas alone
    (:func:`_cost_coefficients`), of the differences ``D_t = z_t - z_i`` and the velocities ``v_t`` of the
    window around start step ``i``. For span ``K``, target ``j``, ``h = sigma_j - sigma_i`` and anchor
    ``r = i - k`` (``k = min(K, i)``, ``d = sigma_i - sigma_r``), the one-shot prediction
    ``z_i + h u_hat`` misses ``z_j`` by

    .. math::

        \hat z_j - z_j = -D_j + h\,v_i - \frac{h^2}{d^2} D_r - \frac{h^2}{d} v_r
        \qquad (\text{the last two terms only when } k > 0),

    and the closed-loop error runs the runtime recurrence on those coefficients. Each start step then costs one
    pair of ``(rows, window) @ (window, latent)`` products and a sum over the latent, in float32 (the history
    dtype), the errors staying on the device until the trajectory ends: no host synchronisation per step.
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
        self._coefficients = _cost_coefficients(tuple(self.sigmas), max_gap, max_span)
        self._window: torch.Tensor | None = None  # (max_span + max_gap + 1, 2, *latent shape), step t in t mod size
        self._matrices: torch.Tensor | None = None  # _coefficients.matrices on the window's device
        self._errors: torch.Tensor | None = None  # (starts, rows): the trajectory's summed absolute errors
        self._next_step = 0
        self.trajectories = 0

    def add_step(self, step: int, z: torch.Tensor, v: torch.Tensor) -> None:
        """Add step ``step`` of the current trajectory: ``z`` before the step, ``v`` the velocity it used."""
        if step != self._next_step:
            raise RuntimeError(f"trajectory steps must arrive in order: expected step {self._next_step}, got {step}")
        if step == 0:
            self._allocate(z)
        assert self._window is not None
        slot = self._window[step % len(self._window)]
        slot[0].copy_(z.detach())
        slot[1].copy_(v.detach())
        if step >= self.max_gap:
            self._edges_from(step - self.max_gap)
        if step == self.num_steps - 1:
            for start in range(max(0, step - self.max_gap + 1), step - 1):
                self._edges_from(start)
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

    def _allocate(self, z: torch.Tensor) -> None:
        """Buffers for a trajectory of latents like ``z``. The window starts zeroed: slots not written yet in
        this trajectory have zero coefficients, and zeros keep their products exactly zero."""
        size = self.max_span + self.max_gap + 1
        shape = (size, 2, *z.shape)
        if self._window is None or self._window.shape != shape or self._window.device != z.device:
            self._window = torch.zeros(shape, dtype=HISTORY_DTYPE, device=z.device)
            self._matrices = torch.from_numpy(self._coefficients.matrices).to(z.device)
            self._errors = torch.zeros(self._coefficients.valid.shape, dtype=HISTORY_DTYPE, device=z.device)
        else:
            self._window.zero_()

    def _edges_from(self, start: int) -> None:
        """The summed absolute prediction errors of every edge ``start -> j``, span and kind, into ``_errors``:
        ``sum|C_z D + C_v V|`` over the latent (by chunks of ``WORKING_SET`` errors), ``(C_z, C_v)`` from
        :func:`_cost_coefficients`."""
        assert self._window is not None and self._matrices is not None and self._errors is not None
        window = self._window.view(len(self._window), 2, -1)
        latents, velocities = window[:, 0], window[:, 1]
        on_latents, on_velocities = self._matrices[start]
        width = max(1, WORKING_SET // len(on_latents))
        for begin in range(0, window.shape[2], width):
            columns = slice(begin, begin + width)
            differences = latents[:, columns] - latents[start % len(window), columns]
            errors = torch.mm(on_latents, differences).addmm_(on_velocities, velocities[:, columns]).abs_()
            if begin == 0:
                torch.sum(errors, 1, out=self._errors[start])
            else:
                self._errors[start] += errors.sum(1)

    def _close_trajectory(self) -> None:
        """The trajectory's errors to the host (its one synchronisation), as means in velocity units
        (``/ (latent size |sigma_j - sigma_start|)``), folded into the totals."""
        assert self._window is not None and self._errors is not None
        coefficients = self._coefficients
        errors = self._errors.cpu().numpy().astype(np.float64)[coefficients.valid]
        errors /= self._window[0, 0].numel() * coefficients.intervals
        for index, kind in enumerate(COST_KINDS):
            current = np.zeros_like(self._totals[kind])
            of_kind = coefficients.kinds == index
            current[tuple(coefficients.edges[:, of_kind])] = errors[of_kind]
            if self.aggregate == "mean":
                self._totals[kind] += current
            else:
                np.maximum(self._totals[kind], current, out=self._totals[kind])
        self._measured[coefficients.edges[0], coefficients.edges[1]] = True
        self.trajectories += 1
        self._next_step = 0


@dataclass(frozen=True)
class _Coefficients:
    """The linear maps of :func:`_cost_coefficients`, with ``R = 2 * max_span * (max_gap - 1)`` rows per start
    step: row ``(kind, K - 1, j - start - 2)``.

    ``matrices[start]``: ``(C_z, C_v)``, float32 ``(R, max_span + max_gap + 1)`` each, columns by window slot;
    ``valid``: ``(starts, R)``, the rows of edges inside the run (``j <= N - 1``); for those rows, in order:
    ``edges`` (``(3, rows)``: start, ``j``, ``K - 1``), ``kinds`` (indices into ``COST_KINDS``) and ``intervals``
    (``|sigma_j - sigma_start|``)."""

    matrices: np.ndarray
    valid: np.ndarray
    edges: np.ndarray
    kinds: np.ndarray
    intervals: np.ndarray


@functools.lru_cache(maxsize=8)
def _cost_coefficients(sigmas: tuple[float, ...], max_gap: int, max_span: int) -> _Coefficients:
    r"""The prediction errors of both cost kinds as combinations of the window (class docstring), for every
    start step ``i`` in ``0 .. N - 3`` at once, computed in float64 from the sigmas.

    Position ``p = 0 .. max_span + max_gap`` stands for step ``i - max_span + p`` (window slot
    ``(i - max_span + p) mod (max_span + max_gap + 1)``); a latent is a coefficient vector over ``(D_p, v_p)``,
    ``z_i`` the origin. The closed loop for span ``K`` (what
    :class:`~meancache.method.estimators.PaperRuleEstimator` does after computed step ``i``): ``\hat z_{i+1} =
    z_i + (\sigma_{i+1} - \sigma_i) v_i``, then for ``m = i + 1, ...`` with anchor ``r = max(m - K, 0)``,
    ``d = \sigma_m - \sigma_r`` and ``h = \sigma_{m+1} - \sigma_m``:

    .. math::

        \hat u_m = \hat u_{m-1} + \frac{h}{d^2} (\hat z_m - \hat z_r) - \frac{h}{d} \hat u_r, \qquad
        \hat z_{m+1} = \hat z_m + h\,\hat u_m

    where ``\hat z_t = z_t`` and ``\hat u_t = v_t`` for ``t <= i`` (the reference history) and the loop's own
    latents and velocities after ``i``; the error at ``j`` is ``\hat z_j - z_j``."""
    n = len(sigmas) - 1
    sigma = np.array(sigmas)
    size = max_span + max_gap + 1
    origin = max_span  # the start step's position
    starts = np.arange(max(n - 2, 0))
    spans = np.arange(1, max_span + 1)
    offsets = np.arange(2, max_gap + 1)  # j - start
    grid = (len(starts), max_span)
    rows = np.arange(len(starts))[:, None], np.arange(max_span)[None, :]

    def at(steps: np.ndarray) -> np.ndarray:
        """Sigma at ``steps``, clipped at sigma_N past the run (only rows that are not kept reach past it)."""
        return sigma[np.minimum(steps, n)]

    def unit(part: int, position: np.ndarray | int, batch: tuple[int, ...] = grid) -> np.ndarray:
        """Coefficient vectors ``(*batch, 2, size)`` of ``D_position`` (part 0) or ``v_position`` (part 1)."""
        vectors = np.zeros((*batch, 2, size))
        index = np.broadcast_to(position, batch)[..., None]
        np.put_along_axis(vectors[..., part, :], index, 1.0, axis=-1)
        if part == 0:
            vectors[..., 0, origin] = 0.0  # D at the start step is zero
        return vectors

    # one-shot: -D_j + h v_i - (h^2 / d^2) D_r - (h^2 / d) v_r, the look-back terms only when k > 0
    targets = (*grid, len(offsets))
    h = (at(starts[:, None] + offsets) - at(starts[:, None]))[:, None, :, None, None]  # (starts, 1, targets, 1, 1)
    one_shot = unit(1, origin, targets) * h - unit(0, origin + offsets, targets)
    k = np.minimum(spans, starts[:, None])  # (starts, spans)
    d = np.where(k > 0, at(starts[:, None]) - at(starts[:, None] - k), 1.0)[..., None, None]
    look_back = (unit(0, origin - k) / d**2 + unit(1, origin - k) / d) * (k > 0)[..., None, None]
    one_shot = one_shot - look_back[:, :, None] * h**2

    # closed loop: the recurrence on coefficient vectors, per start and span
    # (starts, spans, size, 2, size) by position; those after the start are the loop's own, written before read
    latents = np.stack([unit(0, p) for p in range(size)], axis=2)
    velocities = np.stack([unit(1, p) for p in range(size)], axis=2)
    z_hat = unit(1, origin) * (at(starts + 1) - at(starts))[:, None, None, None]
    closed_loop = np.zeros_like(one_shot)
    with np.errstate(divide="ignore", invalid="ignore"):  # past the run, whose rows are not kept
        for offset in range(1, max_gap + 1):
            if offset >= 2:
                closed_loop[:, :, offset - 2] = z_hat - unit(0, origin + offset)
            if offset == max_gap:
                break
            m = starts[:, None] + offset
            anchor = np.maximum(m - spans, 0)  # (starts, spans)
            at_anchor = anchor - starts[:, None] + origin
            d_m = (at(m) - at(anchor))[..., None, None]
            h_m = (at(m + 1) - at(m))[..., None, None]
            latents[:, :, origin + offset] = z_hat
            u_hat = velocities[(*rows, origin + offset - 1)] + h_m / d_m**2 * (z_hat - latents[(*rows, at_anchor)])
            u_hat = u_hat - h_m / d_m * velocities[(*rows, at_anchor)]
            velocities[:, :, origin + offset] = u_hat
            z_hat = z_hat + h_m * u_hat

    valid = np.broadcast_to((starts[:, None] + offsets <= n - 1)[:, None, None], (len(starts), 2, *targets[1:]))
    matrices = np.where(valid[..., None, None], np.stack([one_shot, closed_loop], axis=1), 0.0)
    slots = (np.arange(size) + starts[:, None] - origin) % size  # (starts, size): each position's slot
    by_slot = np.zeros_like(matrices)
    np.put_along_axis(by_slot, np.broadcast_to(slots[:, None, None, None, None], matrices.shape), matrices, axis=-1)
    matrices = by_slot.reshape(len(starts), -1, 2, size).transpose(0, 2, 1, 3)
    edge_starts, kinds, edge_spans, edge_offsets = np.nonzero(valid)
    edges = np.stack([edge_starts, edge_starts + offsets[edge_offsets], edge_spans])
    intervals = np.abs(sigma[edges[1]] - sigma[edges[0]])
    return _Coefficients(
        np.ascontiguousarray(matrices, dtype=np.float32), valid.reshape(len(starts), -1), edges, kinds, intervals
    )


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
