"""Velocity estimators for skipped steps.

An estimator follows one generation step by step. On a computed step it is told the velocity the model
gave (:meth:`PaperRuleEstimator.record`); on a skipped step it supplies the velocity to use and the next
latent (:meth:`PaperRuleEstimator.estimate`). The framework-free sampler
(:func:`meancache.method.sampler.sample`) and the diffusers integration drive the same estimators.

Velocities are the *guided* ones the sampler steps with (after classifier-free guidance and any
model-specific post-processing); latents and velocities are logged in float32.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from meancache.ops import average_velocity_step
from meancache.schedule import Schedule

HISTORY_DTYPE = torch.float32


@dataclass(frozen=True)
class _Entry:
    step: int
    sigma: float
    z: torch.Tensor  # the latent before the step
    v: torch.Tensor  # the velocity the step used (computed or estimated)


class PaperRuleEstimator:
    r"""The MeanCache authors' runtime rule: a rolling, per-step average-velocity estimate.

    On skipped step ``i`` of an interval with span ``K``, with ``k = min(K, steps logged)`` and anchor
    ``r = i - k``:

    .. math::

        \bar u = \frac{z_i - z_r}{\sigma_i - \sigma_r}, \quad
        \widehat{JVP} = \frac{\bar u - v_r}{\sigma_i - \sigma_r}, \quad
        \hat u_i = v_{i-1} + (\sigma_{i+1} - \sigma_i)\,\widehat{JVP}, \quad
        z_{i+1} = z_i + (\sigma_{i+1} - \sigma_i)\,\hat u_i

    where ``v_r`` and ``v_{i-1}`` are the velocities those steps *used* (fresh or estimated), and
    ``\hat u_i`` is logged as step ``i``'s velocity. ``K = 1`` is plain reuse of ``v_{i-1}``.

    Only the last ``schedule.max_span`` steps are kept (the rule never reads further back), so memory is
    ``2 * max_span`` float32 latents whatever the step count.
    """

    name = "paper"

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._history: deque[_Entry] = deque(maxlen=schedule.max_span)

    @property
    def history_size(self) -> int:
        """Number of steps currently logged (at most ``schedule.max_span``)."""
        return len(self._history)

    def history_bytes(self) -> int:
        """Bytes held by the logged latents and velocities."""
        return sum(e.z.nbytes + e.v.nbytes for e in self._history)

    def last_velocity(self) -> torch.Tensor:
        """The float32 velocity the previous step used."""
        if not self._history:
            raise RuntimeError("no step has been logged yet in this generation")
        return self._history[-1].v

    def record(self, step: int, z: torch.Tensor, sigma: float, v: torch.Tensor) -> None:
        """Log computed ``step``: latent ``z`` before the step, its noise level and the model's velocity."""
        self._expect(step, computed=True)
        self._history.append(_Entry(step, sigma, _to_history(z), _to_history(v)))

    def estimate(
        self, step: int, z: torch.Tensor, sigma: float, sigma_next: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skipped ``step``: return ``(z_next, u_hat)`` in float32 and log ``u_hat`` as its velocity."""
        self._expect(step, computed=False)
        k = min(self.schedule.span(step), len(self._history))
        anchor = self._history[-k]
        z32 = _to_history(z)
        z_next, u_hat = average_velocity_step(
            z32, self._history[-1].v, anchor.z, anchor.v, anchor.sigma, sigma, sigma_next
        )
        self._history.append(_Entry(step, sigma, z32, u_hat))
        return z_next, u_hat

    def _expect(self, step: int, computed: bool) -> None:
        expected = self._history[-1].step + 1 if self._history else 0
        if step != expected:
            raise RuntimeError(f"steps must be logged in order: expected step {expected}, got {step}")
        if self.schedule.is_computed(step) != computed:
            kind = "computed" if self.schedule.is_computed(step) else "skipped"
            raise RuntimeError(f"step {step} is {kind} in the schedule")


def _to_history(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy that the caller cannot mutate behind the history's back."""
    return t.detach().to(HISTORY_DTYPE, copy=True)


ESTIMATORS: dict[str, type[PaperRuleEstimator]] = {PaperRuleEstimator.name: PaperRuleEstimator}
"""Estimator name -> class; ``MeanCacheConfig(estimator=...)`` picks one by name."""


def make_estimator(name: str, schedule: Schedule) -> PaperRuleEstimator:
    """The estimator registered as ``name``, following ``schedule``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; available: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](schedule)
