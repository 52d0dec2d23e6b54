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

import functools
import math
from collections.abc import Sequence
from typing import ClassVar, Protocol

import numpy as np
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


class TrajectoryExtrapolationEstimator:
    r"""Skipped steps from a polynomial through the last computed steps' velocities or data predictions.

    Base of the opt-in estimators that only read *computed* steps (the model's outputs, never estimates): a
    skipped step ``i`` in ``[sigma_{i+1}, sigma_i]`` extrapolates the last ``order`` computed steps ``c`` (fewer
    while fewer have been computed). Two forms (``target``):

    * ``"velocity"``: the velocity as a polynomial ``p`` in ``sigma`` through ``(sigma_c, v_c)``; the step takes its
      exact mean over the interval, ``u_i = 1/(sigma_{i+1} - sigma_i) int p``, ``z_{i+1} = z_i + (sigma_{i+1} -
      sigma_i) u_i``;
    * ``"data"``: the data prediction ``x0_c = z_c - sigma_c v_c`` as a polynomial ``D`` in ``variable`` (``sigma``,
      or log-SNR ``lambda = log((1 - sigma) / sigma)``), stepped with the exact solution of the flow ODE
      ``dz/dsigma = (z - D) / sigma`` (an exponential integrator, as DPM-Solver++):

      .. math::

          z_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} z_i + \sigma_{i+1} \int_{\rho_i}^{\rho_{i+1}} D\, d\rho,
          \qquad \rho = \frac{1 - \sigma}{\sigma},

      and ``u_i = (z_{i+1} - z_i) / (sigma_{i+1} - sigma_i)`` (what the Euler scheduler is fed). Holding ``x0``
      (order 1) is exactly plain velocity reuse in this parametrisation. To ``sigma_{i+1} = 0`` the polynomial is
      evaluated at ``sigma = 0`` (``lambda``: the last prediction is held).

    Two knobs (class attributes) make the variants measured in ``docs/schedule_study.md``: ``damping`` scales the
    step's departure from holding the last node (``theta``: ``theta * polynomial + (1 - theta) * hold``), and
    ``min_base`` picks the nodes: with ``min_base > 0`` each older node must lie at least ``min_base * (j - c)`` steps
    before the next newer one (``c`` the last computed step, ``j`` the next), so the base a slope is measured on is as
    wide as the stretch it is extrapolated over (none: hold).

    Computed steps step with the model's velocity alone, so a full budget is the plain sampler. The schedule's
    spans are ignored. Holds ``order`` float32 latents (the velocities or predictions; at least four with
    ``min_base``) plus the last velocity.
    """

    name: ClassVar[str] = "trajectory-extrapolation"
    target: ClassVar[str] = "data"
    variable: ClassVar[str] = "sigma"
    order: ClassVar[int] = 2
    damping: ClassVar[float] = 1.0  # scales the step's departure from holding the last computed node
    min_base: ClassVar[float] = 0.0  # older nodes must lie >= min_base x (interval length) steps before the last one

    def __init__(self, schedule: Schedule) -> None:
        if self.target not in ("velocity", "data") or self.variable not in ("sigma", "lambda"):
            raise ValueError(f"unknown target/variable {self.target!r}/{self.variable!r}")
        if self.target == "velocity" and self.variable != "sigma":
            raise ValueError("velocity polynomials are in sigma")
        self.schedule = schedule
        self._nodes: list[tuple[int, float, torch.Tensor]] = []  # (step c, sigma_c, v_c or x0_c), oldest first
        self._keep = self.kept_nodes()
        self._last: torch.Tensor | None = None
        self._logged = 0

    def needs_derivative(self, step: int) -> bool:
        return False

    def last_velocity(self) -> torch.Tensor:
        if self._last is None:
            raise RuntimeError("no step has been logged yet in this generation")
        return self._last

    def history_bytes(self) -> int:
        tensors = [t for _, _, t in self._nodes] + ([self._last] if self._last is not None else [])
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())

    def record(
        self, step: int, z: torch.Tensor, sigma: float, v: torch.Tensor, derivative: torch.Tensor | None = None
    ) -> None:
        if derivative is not None:
            raise ValueError(f"the {self.name!r} estimator takes no derivative (needs_derivative is always False)")
        _check_order(self.schedule, self._logged, step, computed=True)
        v32 = v.detach().to(HISTORY_DTYPE, copy=True)
        node = v32 if self.target == "velocity" else torch.add(z.detach().to(HISTORY_DTYPE), v32, alpha=-sigma)
        if self.variable == "sigma" or 0.0 < sigma < 1.0:  # log-SNR is infinite at sigma = 1: not a node
            self._nodes = [*self._nodes, (step, sigma, node)][-self._keep :]
        self._last = v32
        self._logged += 1

    def estimate(
        self, step: int, z: torch.Tensor, sigma: float, sigma_next: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_order(self.schedule, self._logged, step, computed=False)
        if not self._nodes:  # lambda with only step 0 computed: hold its velocity
            u_hat = self.last_velocity().clone()
            z_next = torch.add(z.detach().to(HISTORY_DTYPE), u_hat, alpha=sigma_next - sigma)
        else:
            chosen = self._chosen_nodes(step)
            weights, z_weight = self.step_weights([s for _, s, _ in chosen], sigma, sigma_next)
            nodes = [t for _, _, t in chosen]
            z32 = z.detach().to(HISTORY_DTYPE)
            if self.target == "velocity":
                u_hat = _combine(nodes, weights)
                z_next = torch.add(z32, u_hat, alpha=sigma_next - sigma)
            else:
                z_next = _combine([z32, *nodes], [z_weight, *weights])
                u_hat = (z_next - z32) / (sigma_next - sigma)
        self._last = u_hat
        self._logged += 1
        return z_next, u_hat

    def _chosen_nodes(self, step: int) -> list[tuple[int, float, torch.Tensor]]:
        """The nodes of the polynomial for skipped ``step`` (:meth:`chosen_nodes`)."""
        later = [c for c in self.schedule.compute_steps if c > step]
        length = (later[0] if later else self.schedule.num_steps) - self._nodes[-1][0]
        return [self._nodes[k] for k in self.chosen_nodes([c for c, _, _ in self._nodes], length)]

    @classmethod
    def kept_nodes(cls) -> int:
        """How many of the last computed steps the estimator keeps as candidate nodes."""
        return cls.order if not cls.min_base else max(cls.order, 4)

    @classmethod
    def chosen_nodes(cls, kept: Sequence[int], length: int) -> list[int]:
        """Indices into ``kept`` (the computed steps kept as nodes, oldest first) of the polynomial's nodes for the
        skipped steps of an interval of ``length`` steps after the last of them: the last ``order``, or with
        ``min_base`` the last computed step ``c`` and, going back, each node at least ``min_base * length`` steps
        before the previous chosen one; fewer (down to holding ``c``) if there are none. A function of the schedule
        alone, so a replay of many schedules plans it ahead (:func:`meancache.calibration.replay.replay_errors`)."""
        if not cls.min_base:
            return list(range(len(kept)))[-cls.order :]
        chosen = [len(kept) - 1]
        for k in range(len(kept) - 2, -1, -1):
            if len(chosen) == cls.order:
                break
            if kept[chosen[-1]] - kept[k] >= cls.min_base * length:
                chosen.append(k)
        return chosen[::-1]

    @classmethod
    def step_weights(cls, node_sigmas: list[float], sigma: float, sigma_next: float) -> tuple[list[float], float]:
        """Scalar weights of one skipped step: ``velocity``: ``u = sum_j w_j v_j``; ``data``:
        ``z_next = z_weight z + sum_j w_j x0_j``. Computed in float64."""
        weights, z_weight = _step_weights(cls.target, cls.variable, tuple(node_sigmas), sigma, sigma_next)
        if cls.damping != 1.0 and len(node_sigmas) > 1:
            hold, z_hold = _step_weights(cls.target, cls.variable, tuple(node_sigmas[-1:]), sigma, sigma_next)
            weights = [cls.damping * w for w in weights]
            weights[-1] += (1 - cls.damping) * hold[0]
            z_weight = cls.damping * z_weight + (1 - cls.damping) * z_hold
        return weights, z_weight


class DataLinearEstimator(TrajectoryExtrapolationEstimator):
    r"""Half-damped linear extrapolation of the data prediction from two computed steps, stepped exactly.

    With ``c`` the last computed step before skipped step ``i``, ``j`` the next computed step and ``p`` the latest
    computed step at least ``j - c`` steps before ``c`` (a base as wide as the extrapolation; none: hold ``x0_c``),
    ``x0 = z - sigma v`` at both and ``m = (x0_c - x0_p) / (sigma_c - sigma_p)``:

    .. math::

        D(\sigma) = x0_c + \tfrac12\, m\, (\sigma - \sigma_c), \qquad
        z_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} z_i + \sigma_{i+1} \int_{\rho_i}^{\rho_{i+1}} D\, d\rho
        \quad (\rho = (1 - \sigma) / \sigma), \qquad \hat u_i = \frac{z_{i+1} - z_i}{\sigma_{i+1} - \sigma_i},

    the exact solution over the step of ``dz/dsigma = (z - D(sigma)) / sigma``, the flow ODE with ``D`` as the data
    prediction. In closed form the integral is ``(1 - sigma_{i+1}/sigma_i) (x0_c - m' sigma_c) + m' sigma_{i+1}
    log(sigma_i / sigma_{i+1})`` with ``m' = m / 2``. The damping 1/2 and the wide base were chosen on the bundled
    models' calibration seeds (``benchmarks/bench_estimators.py``; ``docs/schedule_study.md``, "Estimators between
    computed steps"). Selection picks it per schedule (``SELECTABLE``), or name it:
    ``MeanCacheConfig(estimator="data-linear")``; computed steps are untouched, so a full budget is the plain sampler.
    Holds four float32 predictions and the last velocity.
    """

    name: ClassVar[str] = "data-linear"  # target "data", variable "sigma", order 2: the base's
    damping: ClassVar[float] = 0.5
    min_base: ClassVar[float] = 1.0


class DataLinearLastTwoEstimator(DataLinearEstimator):
    """:class:`DataLinearEstimator` through the last two computed steps, however close (``p`` the computed step before
    ``c``): the slope of the latest stretch, where the trajectory's shape changes along it (late, dense schedules)."""

    name: ClassVar[str] = "data-linear-last-two"
    min_base: ClassVar[float] = 0.0


class VelocityLinearEstimator(TrajectoryExtrapolationEstimator):
    r"""Linear extrapolation of the velocity from two computed steps, with its exact mean over the step.

    With ``c``, ``j`` and ``p`` as for :class:`DataLinearEstimator` (a base as wide as the extrapolation; none: hold
    ``v_c``) and ``m = (v_c - v_p) / (sigma_c - sigma_p)``:

    .. math::

        \hat u_i = v_c + \theta\, m \left(\tfrac{\sigma_i + \sigma_{i+1}}{2} - \sigma_c\right), \qquad
        z_{i+1} = z_i + (\sigma_{i+1} - \sigma_i)\, \hat u_i,

    undamped (``theta = 1``): what wins on a smooth exact flow and at the smallest budgets of the bundled models."""

    name: ClassVar[str] = "velocity-linear"  # variable "sigma", order 2, undamped: the base's
    target: ClassVar[str] = "velocity"
    min_base: ClassVar[float] = 1.0


class VelocityLinearDampedEstimator(VelocityLinearEstimator):
    """:class:`VelocityLinearEstimator` with three quarters of the slope (``theta = 0.75``)."""

    name: ClassVar[str] = "velocity-linear-damped"
    damping: ClassVar[float] = 0.75


class VelocityLinearDampedLastTwoEstimator(VelocityLinearDampedEstimator):
    """:class:`VelocityLinearDampedEstimator` through the last two computed steps, however close."""

    name: ClassVar[str] = "velocity-linear-damped-last-two"
    min_base: ClassVar[float] = 0.0


def _combine(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def _log_snr(sigma: float) -> float:
    return math.log((1.0 - sigma) / sigma)


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(16)


@functools.lru_cache(maxsize=4096)
def _step_weights(
    target: str, variable: str, node_sigmas: tuple[float, ...], sigma: float, sigma_next: float
) -> tuple[list[float], float]:
    to_x = _log_snr if variable == "lambda" else float
    xs = [to_x(s) for s in node_sigmas]

    def lagrange(x: np.ndarray) -> np.ndarray:  # (nodes, points): the basis polynomials at x
        basis = np.ones((len(xs), len(x)))
        for j, xj in enumerate(xs):
            for m, xm in enumerate(xs):
                if m != j:
                    basis[j] *= (x - xm) / (xj - xm)
        return basis

    if target == "velocity":  # mean of the interpolant over [sigma_next, sigma]
        t = 0.5 * (sigma + sigma_next) + 0.5 * (sigma - sigma_next) * _GAUSS_NODES
        return [float(w) for w in lagrange(t) @ _GAUSS_WEIGHTS * 0.5], 0.0
    if sigma_next == 0.0:  # the ODE ends at the prediction itself
        if variable == "lambda":
            return [0.0] * (len(xs) - 1) + [1.0], 0.0
        return [float(w) for w in lagrange(np.array([0.0]))[:, 0]], 0.0
    # sigma_next * int_{rho}^{rho_next} D drho, over lambda (drho = e^lambda dlambda), Gauss-Legendre
    lam0, lam1 = _log_snr(sigma), _log_snr(sigma_next)
    lam = 0.5 * (lam0 + lam1) + 0.5 * (lam1 - lam0) * _GAUSS_NODES
    x = lam if variable == "lambda" else 1.0 / (1.0 + np.exp(lam))
    integrand = lagrange(x) * (sigma_next * np.exp(lam))  # sigma_next e^lambda = sigma_next rho
    return [float(w) for w in integrand @ _GAUSS_WEIGHTS * 0.5 * (lam1 - lam0)], sigma_next / sigma


def _check_order(schedule: Schedule, logged: int, step: int, computed: bool) -> None:
    if step != logged:
        raise RuntimeError(f"steps must be logged in order: expected step {logged}, got {step}")
    if schedule.is_computed(step) != computed:
        kind = "computed" if schedule.is_computed(step) else "skipped"
        raise RuntimeError(f"step {step} is {kind} in the schedule")


SELECTABLE: tuple[type[Estimator], ...] = (
    PaperRuleEstimator,
    VelocityLinearEstimator,
    VelocityLinearDampedEstimator,
    VelocityLinearDampedLastTwoEstimator,
    DataLinearEstimator,
    DataLinearLastTwoEstimator,
)
"""The estimators a schedule is validated with (the paper's rule first): selection replays each candidate schedule
under each on recorded full runs and records the best pair's estimator in the schedule's metadata (``ESTIMATOR_KEY``;
:func:`meancache.calibration.select_by_replay`). Each is the measured best of some budget of some bundled
model on its shipped schedule (``benchmarks/bench_estimators.py``, ``docs/schedule_study.md``)."""

ESTIMATORS: dict[str, type[Estimator]] = {estimator.name: estimator for estimator in (*SELECTABLE, ExactJVPEstimator)}
"""Estimator name -> class; ``MeanCacheConfig(estimator=...)`` picks one by name."""

ESTIMATOR_KEY = "estimator"
"""The schedule metadata entry naming the estimator the schedule was validated with."""


def estimator_name(requested: str | None, schedule: Schedule) -> str:
    """``requested``, or when None the estimator ``schedule`` was validated with (its metadata's ``ESTIMATOR_KEY``),
    else the paper's rule (published tables, schedules made by hand)."""
    name = requested if requested is not None else schedule.metadata.get(ESTIMATOR_KEY, PaperRuleEstimator.name)
    if name not in ESTIMATORS:
        whose = "requested" if requested is not None else f"named by the schedule's metadata ({ESTIMATOR_KEY!r})"
        raise ValueError(f"unknown estimator {name!r} {whose}; available: {sorted(ESTIMATORS)}")
    return name


def make_estimator(name: str | None, schedule: Schedule) -> Estimator:
    """The estimator registered as ``name`` (None: :func:`estimator_name`'s choice), following ``schedule``."""
    return ESTIMATORS[estimator_name(name, schedule)](schedule)
