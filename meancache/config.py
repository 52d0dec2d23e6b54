"""``MeanCacheConfig``: what a user chooses; everything else is derived per generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meancache.schedule import Schedule


@dataclass(frozen=True)
class MeanCacheConfig:
    """Settings of a MeanCache run: a schedule, or just a budget.

    Args:
        schedule: which steps run the transformer and the look-back span per interval. A schedule made for
            another step count is mapped in sigma space (:meth:`Schedule.for_steps`), with a warning.
        budget: instead of ``schedule``, the number of computed steps; the schedule then picks itself per
            run (:func:`meancache.schedule.defaults.default_schedule`: a published table for the model, or a
            documented uniform fallback).
        estimator: how skipped steps get their velocity, by name; ``"paper"`` is the authors' runtime rule
            (:class:`meancache.method.estimators.PaperRuleEstimator`).
    """

    schedule: Schedule | None = None
    budget: int | None = None
    estimator: str = "paper"

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
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; available: {sorted(ESTIMATORS)}")

    def to_dict(self) -> dict[str, Any]:
        schedule = self.schedule.to_dict() if self.schedule is not None else None
        return {"schedule": schedule, "budget": self.budget, "estimator": self.estimator}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanCacheConfig:
        schedule = Schedule.from_dict(data["schedule"]) if data.get("schedule") is not None else None
        return cls(schedule=schedule, budget=data.get("budget"), estimator=data.get("estimator", "paper"))
