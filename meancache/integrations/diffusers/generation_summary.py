"""What MeanCache did in one generation (:func:`meancache.summary`): steps, computed and reused, the spans used,
transformer and ControlNet calls run and skipped, and where the schedule came from."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meancache.schedule import Schedule


@dataclass
class MeanCacheSummary:
    """What MeanCache did in one generation."""

    num_steps: int
    steps_run: int
    schedule: Schedule
    transformer_calls: int
    skipped_calls: int
    derivative_calls: int = 0
    """Transformer calls run as forward-mode (JVP) passes; included in ``transformer_calls``."""
    controlnet_calls: int = 0
    """ControlNet forwards that ran (ControlNet pipelines: the ControlNet runs on computed steps only)."""
    skipped_controlnet_calls: int = 0
    estimator: str = "paper"
    """The estimator of the skipped steps (:data:`meancache.method.estimators.ESTIMATORS`)."""

    @property
    def computed_steps(self) -> int:
        return sum(self.schedule.is_computed(i) for i in range(self.steps_run))

    @property
    def reused_steps(self) -> int:
        return self.steps_run - self.computed_steps

    @property
    def spans_used(self) -> dict[int, int]:
        """Span ``K`` -> number of skipped steps that used it."""
        counts = Counter(self.schedule.span(i) for i in range(self.steps_run) if not self.schedule.is_computed(i))
        return dict(sorted(counts.items()))

    @property
    def ideal_speedup(self) -> float:
        """Steps per computed step: the speedup if the transformer were the only cost."""
        return self.steps_run / max(self.computed_steps, 1)

    def __str__(self) -> str:
        spans = ", ".join(f"K={k}: {n}" for k, n in self.spans_used.items()) or "none"
        mapped = self.schedule.metadata.get("mapped_from_steps")
        origin = f" (schedule mapped from {mapped} steps)" if mapped else ""
        unfinished = "" if self.steps_run == self.num_steps else f" of {self.num_steps} (interrupted)"
        jvp = f" ({self.derivative_calls} forward-mode)" if self.derivative_calls else ""
        source = self.schedule.metadata.get("source")
        controlnet = self.controlnet_calls + self.skipped_controlnet_calls
        controlnet_text = (
            f"; controlnet calls: {self.controlnet_calls} run, {self.skipped_controlnet_calls} skipped"
            if controlnet
            else ""
        )
        return (
            f"MeanCache: {self.steps_run} steps{unfinished}{origin}, {self.computed_steps} computed, "
            f"{self.reused_steps} reused (spans {spans}); transformer calls: {self.transformer_calls} run{jvp}, "
            f"{self.skipped_calls} skipped{controlnet_text}; estimator {self.estimator}; ideal speedup "
            f"{self.ideal_speedup:.2f}x" + (f"; schedule: {source}" if source else "")
        )
