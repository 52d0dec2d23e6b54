"""Velocity estimators for skipped steps.

An estimator follows one generation step by step. On a computed step it is told the velocity the model
gave (:meth:`Estimator.record`, with ``dv/dsigma`` along the trajectory when :meth:`Estimator.needs_derivative`
asked for it); on a skipped step it supplies the velocity to use and the next latent
(:meth:`Estimator.estimate`). The framework-free sampler (:func:`meancache.method.sampler.sample`) and the
diffusers integration drive the same estimators.

Velocities are the *guided* ones the sampler steps with (after classifier-free guidance and any
model-specific post-processing); latents and velocities are logged in float32.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from meancache.ops import average_velocity_step
from meancache.schedule import Schedule

HISTORY_DTYPE = torch.float32


class Estimator(Protocol):
    """What the samplers need from an estimator (one instance per generation)."""

    name: ClassVar[str]
    schedule: Schedule

    def needs_derivative(self, step: int) -> bool:
        """Whether computed ``step`` must be recorded with ``dv/dsigma`` (a forward-mode pass)."""

    def last_velocity(self) -> torch.Tensor:
        """The float32 velocity the previous step used."""

    def history_bytes(self) -> int:
        """Bytes of latents and velocities held."""

    def record(
        self, step: int, z: torch.Tensor, sigma: float, v: torch.Tensor, derivative: torch.Tensor | None = None
    ) -> None:
        """Log computed ``step``: latent before it, noise level, velocity and, if asked for, ``dv/dsigma``."""

    def estimate(
        self, step: int, z: torch.Tensor, sigma: float, sigma_next: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skipped ``step``: ``(z_next, u_hat)`` in float32, ``u_hat`` logged as the step's velocity."""


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

    The rule never reads further back than ``schedule.max_span`` steps, so the history is a preallocated
    float32 ring of ``max_span + 1`` latents and velocities (slot ``i mod (max_span + 1)`` holds step ``i``),
    whatever the step count, plus one latent for ``z_{i+1}``. Estimates are written straight into their slot,
    with no new memory per step.
    """

    name: ClassVar[str] = "paper"

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._slots = schedule.max_span + 1
        self._z: torch.Tensor | None = None  # (slots, *latent shape), float32
        self._v: torch.Tensor | None = None
        self._z_next: torch.Tensor | None = None  # the latest estimate's z_{i+1}
        self._sigma = [0.0] * self._slots
        self._logged = 0  # steps logged so far; the next step to log

    @property
    def history_size(self) -> int:
        """Number of past steps the history can still be read for (at most ``schedule.max_span``)."""
        return min(self._logged, self._slots - 1)

    def history_bytes(self) -> int:
        """Bytes held by the history ring."""
        if self._z is None or self._v is None or self._z_next is None:
            return 0
        return self._z.nbytes + self._v.nbytes + self._z_next.nbytes

    def last_velocity(self) -> torch.Tensor:
        """The float32 velocity the previous step used (a view of the history: read it before the next step)."""
        if self._v is None or not self._logged:
            raise RuntimeError("no step has been logged yet in this generation")
        return self._v[(self._logged - 1) % self._slots]

    def needs_derivative(self, step: int) -> bool:
        """Never: the rule estimates the derivative from its history."""
        return False

    def record(
        self, step: int, z: torch.Tensor, sigma: float, v: torch.Tensor, derivative: torch.Tensor | None = None
    ) -> None:
        """Log computed ``step``: latent ``z`` before the step, its noise level and the model's velocity."""
        if derivative is not None:
            raise ValueError("the paper's rule takes no derivative (needs_derivative is always False)")
        _check_order(self.schedule, self._logged, step, computed=True)
        slot = self._claim(step, z, sigma)
        self._v[slot].copy_(v.detach())

    def estimate(
        self, step: int, z: torch.Tensor, sigma: float, sigma_next: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skipped ``step``: return ``(z_next, u_hat)`` in float32 and log ``u_hat`` as its velocity.

        ``u_hat`` is a view of the history ring, valid until ``max_span`` more steps have been logged;
        ``z_next`` lives in the estimator too, valid until the next ``estimate`` (which may take it as ``z``)."""
        _check_order(self.schedule, self._logged, step, computed=False)
        k = min(self.schedule.span(step), self._logged)
        anchor, last = (step - k) % self._slots, (step - 1) % self._slots
        slot = self._claim(step, z, sigma)
        average_velocity_step(
            self._z[slot], self._v[last], self._z[anchor], self._v[anchor], self._sigma[anchor], sigma, sigma_next,
            out=(self._z_next, self._v[slot]),
        )  # fmt: skip
        return self._z_next, self._v[slot]

    def _claim(self, step: int, z: torch.Tensor, sigma: float) -> int:
        """Copy ``z`` (float32) and ``sigma`` into ``step``'s ring slot, allocating the ring on first use."""
        if self._z is None:
            shape = (self._slots, *z.shape)
            self._z = torch.empty(shape, dtype=HISTORY_DTYPE, device=z.device)
            self._v = torch.empty(shape, dtype=HISTORY_DTYPE, device=z.device)
            self._z_next = torch.empty(z.shape, dtype=HISTORY_DTYPE, device=z.device)
        elif z.shape != self._z.shape[1:]:
            raise ValueError(
                f"latents changed shape within a generation: {tuple(self._z.shape[1:])} -> {tuple(z.shape)}"
            )
        slot = step % self._slots
        self._z[slot].copy_(z.detach())
        self._sigma[slot] = sigma
        self._logged += 1
        return slot


class ExactJVPEstimator:
    r"""Average velocities from the model's own derivative along the trajectory (one forward-mode pass).

    At each computed step ``c`` followed by a skipped one, the samplers run the model under forward-mode AD
    with tangent ``(dz/dsigma, 1)`` on ``(z, sigma)``, ``dz/dsigma`` estimated by the velocity the previous
    step used (at step 0, by the model's own output), and record ``d_c = dv/dsigma``. A skipped step ``i``
    then uses the average over ``[sigma_{i+1}, sigma_i]`` of the first-order expansion of ``v`` around
    ``sigma_c``:

    .. math::

        \hat u_i = v_c + \Big(\frac{\sigma_i + \sigma_{i+1}}{2} - \sigma_c\Big) d_c, \qquad
        z_{i+1} = z_i + (\sigma_{i+1} - \sigma_i)\,\hat u_i

    Computed steps still step with ``v_c`` alone, so a full budget reproduces the plain sampler. Spans in
    the schedule are ignored. Holds three float32 latents (``v_c``, ``d_c`` and the last velocity used).
    """

    name: ClassVar[str] = "exact-jvp"

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._anchor: tuple[float, torch.Tensor, torch.Tensor | None] | None = None  # sigma_c, v_c, d_c
        self._last: torch.Tensor | None = None
        self._logged = 0

    def needs_derivative(self, step: int) -> bool:
        """Computed steps followed by a skipped step."""
        return (
            self.schedule.is_computed(step)
            and step + 1 < self.schedule.num_steps
            and not self.schedule.is_computed(step + 1)
        )

    def last_velocity(self) -> torch.Tensor:
        if self._last is None:
            raise RuntimeError("no step has been logged yet in this generation")
        return self._last

    def history_bytes(self) -> int:
        tensors = [self._last] if self._last is not None else []
        if self._anchor is not None:
            tensors += [t for t in self._anchor[1:] if t is not None]
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())

    def record(
        self, step: int, z: torch.Tensor, sigma: float, v: torch.Tensor, derivative: torch.Tensor | None = None
    ) -> None:
        _check_order(self.schedule, self._logged, step, computed=True)
        if self.needs_derivative(step) and derivative is None:
            raise ValueError(f"step {step} is followed by a skipped step: record it with its derivative dv/dsigma")
        if derivative is not None and derivative.shape != v.shape:
            raise ValueError(f"derivative has shape {tuple(derivative.shape)} but v has {tuple(v.shape)}")
        v32 = v.detach().to(HISTORY_DTYPE, copy=True)
        d32 = derivative.detach().to(HISTORY_DTYPE, copy=True) if derivative is not None else None
        self._anchor = (sigma, v32, d32)
        self._last = v32
        self._logged += 1

    def estimate(
        self, step: int, z: torch.Tensor, sigma: float, sigma_next: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_order(self.schedule, self._logged, step, computed=False)
        assert self._anchor is not None  # step 0 is always computed
        sigma_c, v_c, d_c = self._anchor
        if d_c is None:
            raise RuntimeError(f"the computed step before step {step} was recorded without its derivative")
        u_hat = torch.add(v_c, d_c, alpha=0.5 * (sigma + sigma_next) - sigma_c)
        z_next = torch.add(z.detach().to(HISTORY_DTYPE), u_hat, alpha=sigma_next - sigma)
        self._last = u_hat
        self._logged += 1
        return z_next, u_hat


def _check_order(schedule: Schedule, logged: int, step: int, computed: bool) -> None:
    if step != logged:
        raise RuntimeError(f"steps must be logged in order: expected step {logged}, got {step}")
    if schedule.is_computed(step) != computed:
        kind = "computed" if schedule.is_computed(step) else "skipped"
        raise RuntimeError(f"step {step} is {kind} in the schedule")


ESTIMATORS: dict[str, type[Estimator]] = {
    PaperRuleEstimator.name: PaperRuleEstimator,
    ExactJVPEstimator.name: ExactJVPEstimator,
}
"""Estimator name -> class; ``MeanCacheConfig(estimator=...)`` picks one by name."""


def make_estimator(name: str, schedule: Schedule) -> Estimator:
    """The estimator registered as ``name``, following ``schedule``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; available: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](schedule)
