"""``MeanCacheConfig``: what a user chooses; everything else is derived per generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meancache.schedule import Schedule


@dataclass(frozen=True)
class MeanCacheConfig:
    """Settings of a MeanCache run.

    Args:
        schedule: which steps run the transformer and the look-back span per interval. A schedule made for
            another step count is mapped in sigma space (:meth:`Schedule.for_steps`).
        estimator: how skipped steps get their velocity, by name; ``"paper"`` is the authors' runtime rule
            (:class:`meancache.method.estimators.PaperRuleEstimator`).
    """

    schedule: Schedule
    estimator: str = "paper"

    def __post_init__(self) -> None:
        from meancache.method.estimators import ESTIMATORS

        if not isinstance(self.schedule, Schedule):
            raise TypeError(
                f"schedule must be a meancache.Schedule (e.g. Schedule.preset('qwen-image', budget=10) or "
                f"Schedule.load(path)), got {type(self.schedule).__name__}"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; available: {sorted(ESTIMATORS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "estimator": self.estimator}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanCacheConfig:
        return cls(schedule=Schedule.from_dict(data["schedule"]), estimator=data.get("estimator", "paper"))
