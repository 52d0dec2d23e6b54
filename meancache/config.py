"""``MeanCacheConfig``: what a user chooses; everything else is derived per generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meancache.schedule import Schedule

DEFAULT_CALIBRATION_RUNS = 4
"""Full-compute generations observed before a calibrated schedule is used (chosen by measurement:
``benchmarks/bench_first_use_calibration.py``, five calibration draws per setting; figures in
``docs/schedule_study.md#calibrate-on-first-use-bench_first_use_calibrationpy``)."""


@dataclass(frozen=True)
class MeanCacheConfig:
    """Settings of a MeanCache run: a schedule, or just a budget.

    Args:
        schedule: which steps run the transformer and the look-back span per interval. A schedule made for
            another step count is mapped in sigma space (:meth:`Schedule.for_steps`), with a warning.
        budget: instead of ``schedule``, the number of computed steps; the schedule then picks itself per
            run (:func:`meancache.schedule.defaults.default_schedule`: a schedule shipped with the model, a
            stored calibration, a published table, or else calibration on first use).
        calibration_runs: with ``budget``, when no schedule is known for the model and settings: how many of
            the pipeline's own generations run in full (bit-identical to the uncached pipeline) while MeanCache
            measures their stability costs. The first does at once; the generations after it, in this process or
            another (the calibration is stored, :mod:`meancache.calibration.store`), run the budget with the
            schedule selected from the costs so far, and every tenth of them runs in full and adds to the costs
            until ``calibration_runs`` are observed (:mod:`meancache.integrations.diffusers.first_use`). ``0``
            turns calibration off: evenly spaced computed steps with plain reuse.
        estimator: how skipped steps get their velocity, by name; ``"paper"`` is the authors' runtime rule
            (:class:`meancache.method.estimators.PaperRuleEstimator`). ``None`` (the default): the estimator the
            schedule was validated with, named in its metadata (shipped and first-use schedules are validated with
            each of :data:`meancache.method.estimators.SELECTABLE`), else the paper's rule (published tables,
            schedules made by hand).
    """

    schedule: Schedule | None = None
    budget: int | None = None
    estimator: str | None = None
    calibration_runs: int = DEFAULT_CALIBRATION_RUNS

    def __post_init__(self) -> None:
        from meancache.method.estimators import ESTIMATORS

        if (self.schedule is None) == (self.budget is None):
            raise ValueError("give MeanCacheConfig exactly one of schedule= or budget=")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise TypeError(
                f"schedule must be a meancache.Schedule (e.g. Schedule.preset('qwen-image', budget=10) or "
                f"Schedule.load(path)), got {type(self.schedule).__name__}"
            )
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 2
        ):
            raise ValueError(
                f"budget must be an integer >= 2 (computed steps, first and last included), got {self.budget!r}"
            )
        runs = self.calibration_runs
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
            raise ValueError(f"calibration_runs must be an integer >= 0 (0 turns calibration off), got {runs!r}")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; available: {sorted(ESTIMATORS)}")

    def to_dict(self) -> dict[str, Any]:
        schedule = self.schedule.to_dict() if self.schedule is not None else None
        return {"schedule": schedule, "budget": self.budget, "estimator": self.estimator,
                "calibration_runs": self.calibration_runs}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanCacheConfig:
        schedule = Schedule.from_dict(data["schedule"]) if data.get("schedule") is not None else None
        return cls(schedule=schedule, budget=data.get("budget"), estimator=data.get("estimator"),
                   calibration_runs=data.get("calibration_runs", DEFAULT_CALIBRATION_RUNS))  # fmt: skip
