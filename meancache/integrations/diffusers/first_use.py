"""Calibrate on first use: ``MeanCacheConfig(budget=B)`` on a model and settings with no known schedule.

Rules (one pipeline's :class:`FirstUseCalibration`, one generation's :class:`GenerationCalibration`):

* A generation whose key (:func:`~meancache.integrations.diffusers.key.calibration_key`) has fewer than
  ``calibration_runs`` observed generations in the store runs every step (an all-computed schedule: the
  uncached pipeline's output, bit for bit) while a :class:`~meancache.calibration.StabilityCostAccumulator`
  observes each step's latents and guided velocity (a batch is averaged in: the costs are element means).
* When it completes, its costs are folded into the key's stored calibration (weighted by generations) and
  saved; an interrupted generation adds nothing.
* Once the stored calibration has ``calibration_runs`` generations, the run's schedule is its PSSP solution
  for the budget (:func:`first_use_schedule`); any other budget is solved from the same costs.
* Costs are measured for gaps up to ``MAX_GAP`` (8) and spans up to ``MAX_SPAN`` (5). The solver uses closed-loop
  costs, gamma ``GAMMA`` (2), spans up to ``SOLVER_MAX_SPAN`` (3) and gaps up to ``SOLVER_GAP`` (6), or the
  shortest gap the budget can bridge (``ceil((N - 1) / (B - 1))``) when that is longer. A few calibrating
  generations rank long intervals and long spans poorly, so they are limited (measured:
  ``benchmarks/bench_first_use_calibration.py``, ``docs/schedule_study.md``). A budget below
  ``ceil((N - 1) / MAX_GAP) + 1`` cannot bridge the run; it is not calibrated (the uniform fallback runs, with a
  log message).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from meancache.calibration import Calibration, CalibrationStore, StabilityCostAccumulator, combine_calibrations
from meancache.calibration.store import key_digest
from meancache.schedule import Schedule
from meancache.schedule.pssp import solve_pssp

MAX_GAP = 8
MAX_SPAN = 5
GAMMA = 2.0
SOLVER_MAX_SPAN = 3
SOLVER_GAP = 6

logger = logging.getLogger(__name__)


@dataclass
class FirstUseCalibration:
    """Calibrate-on-first-use settings and the keys already announced, for one pipeline."""

    runs: int
    store: CalibrationStore
    announced: set[str] = field(default_factory=set)

    def for_generation(self, make_key: Callable[[], dict[str, Any]]) -> GenerationCalibration:
        return GenerationCalibration(self, make_key)


@dataclass
class GenerationCalibration:
    """One generation's view of the store: the stored schedule, or this generation's calibration
    (:class:`meancache.schedule.defaults.CalibratedSchedules`). The key is computed when first needed (not
    when a schedule shipped with the model applies)."""

    owner: FirstUseCalibration
    make_key: Callable[[], dict[str, Any]] = field(repr=False)
    accumulator: StabilityCostAccumulator | None = None
    """Set when this generation calibrates."""
    started: float = 0.0

    @functools.cached_property
    def key(self) -> dict[str, Any]:
        return self.make_key()

    @property
    def digest(self) -> str:
        return key_digest(self.key)

    def stored(self, num_steps: int, budget: int) -> Schedule | None:
        calibration = self.owner.store.load(self.key)
        if calibration is None or calibration.trajectories < self.owner.runs or not _bridgeable(num_steps, budget):
            return None
        schedule = first_use_schedule(calibration, budget)
        path = self.owner.store.path(self.key)
        where = f"stored in {path}" if path is not None and path.exists() else "kept in memory"
        source = f"calibrated on first use ({calibration.trajectories} generations, key {self.digest}, {where})"
        metadata = {**schedule.metadata, "source": source}
        return Schedule(schedule.num_steps, schedule.compute_steps, schedule.spans, metadata)

    def calibrating(self, num_steps: int, budget: int) -> Schedule | None:
        if self.owner.runs == 0 or not _bridgeable(num_steps, budget) or budget == num_steps:
            return None
        stored = self.owner.store.load(self.key)
        done = stored.trajectories if stored is not None else 0
        if self.digest not in self.owner.announced:
            self.owner.announced.add(self.digest)
            logger.warning(
                "MeanCache: no schedule known for %s (%s) at %d steps and these settings (key %s): the next %d "
                "generation(s) run in full, bit-identical to the uncached pipeline, while MeanCache calibrates; "
                "then budget %d is used.",
                self.key["pipeline"], self.key["checkpoint"] or "unnamed checkpoint", num_steps, self.digest,
                self.owner.runs - done, budget,
            )  # fmt: skip
        self.accumulator = StabilityCostAccumulator(self.key["sigmas"], MAX_GAP, MAX_SPAN)
        self.started = time.perf_counter()
        runs = self.owner.runs
        source = f"calibrating on first use: generation {done + 1} of {runs} runs in full (key {self.digest})"
        return Schedule(num_steps, tuple(range(num_steps)), (1,) * (num_steps - 1), {"source": source})

    def add_step(self, step: int, z: torch.Tensor, v: torch.Tensor) -> None:
        """Observe step ``step`` (latents before it, guided velocity) of the calibrating generation."""
        assert self.accumulator is not None
        self.accumulator.add_step(step, z, v)

    def finish(self) -> None:
        """Fold the completed generation into the key's stored calibration."""
        assert self.accumulator is not None
        metadata = {
            "cost_kinds": ["one-shot", "closed-loop"], "calibration_seconds": time.perf_counter() - self.started,
            "source": "calibrated on first use", "pipeline": self.key["pipeline"], "model": self.key["checkpoint"],
        }  # fmt: skip
        calibration = self.accumulator.result(metadata)
        stored = self.owner.store.load(self.key)
        if stored is not None:
            calibration = combine_calibrations(stored, calibration)
        self.owner.store.save(self.key, calibration)
        self.accumulator = None


def first_use_schedule(calibration: Calibration, budget: int) -> Schedule:
    """The PSSP schedule of a first-use calibration for ``budget`` (solver settings: module docstring)."""
    n = calibration.num_steps
    gap = min(MAX_GAP, max(SOLVER_GAP, math.ceil((n - 1) / max(budget - 1, 1))))
    found = solve_pssp(calibration.closed_loop[..., :SOLVER_MAX_SPAN], budget, gamma=GAMMA, max_gap=gap)
    settings = {"cost_kind": "closed-loop", "max_span": SOLVER_MAX_SPAN, "budget": budget}
    return Schedule(n, found.compute_steps, found.spans, {**calibration.metadata, **found.metadata, **settings})


def _bridgeable(num_steps: int, budget: int) -> bool:
    """Whether ``budget`` computed steps can cover ``num_steps`` with gaps of at most ``MAX_GAP``."""
    return budget >= min(num_steps, math.ceil((num_steps - 1) / MAX_GAP) + 1)
