r"""A flow whose exact velocity is known: flow matching on a Gaussian mixture, and reference solvers for it.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in ``D`` dimensions, noise ``eps ~ N(0, I)``, and the diffusers
convention ``z_sigma = (1 - sigma) x0 + sigma eps``, integrated from ``sigma = 1`` (noise) to ``0`` (data).
Given component ``k``, ``z`` is Gaussian with mean ``(1 - sigma) mu_k`` and variance
``c_k = (1 - sigma)^2 s_k^2 + sigma^2`` per element, so the flow-matching velocity ``v = E[eps - x0 | z]`` is a
posterior-weighted mixture of per-component affine maps:

.. math::

    v(z, \sigma) = \sum_k w_k(z)\, \frac{\sigma - (1 - \sigma) s_k^2}{c_k}\,\big(z - (1 - \sigma)\mu_k\big)
    - \sum_k w_k(z)\, \mu_k, \qquad w_k \propto \pi_k\, \mathcal N\big(z; (1 - \sigma)\mu_k, c_k I\big).

It is the velocity of the probability-flow ODE of that marginal path (``tests/test_analytic_flow.py`` checks it
against the score of the marginal by autograd and against the continuity equation by finite differences), so
an estimator's error on it is a sampler error with no model error in it. This module also has the
solvers the caches are compared with at equal evaluations: Euler, DPM-Solver++ 2M (data prediction, log-SNR)
and RK4 for references.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class GaussianMixtureFlow:
    """Flow matching on ``sum_k weights[k] N(means[k], stds[k]^2 I)``; float64 throughout."""

    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K,)
    weights: torch.Tensor  # (K,), sums to 1

    @classmethod
    def random(
        cls,
        dim: int = 16,
        components: int = 6,
        seed: int = 0,
        spread: float = 1.0,
        stds: tuple[float, float] = (0.05, 0.3),
    ) -> GaussianMixtureFlow:
        """Means ``N(0, spread^2 I)``, stds log-uniform in ``stds``, weights uniform in ``[1, 2]``, normalised."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        low, high = math.log(stds[0]), math.log(stds[1])
        stds = torch.exp(torch.empty(components, dtype=torch.float64).uniform_(low, high, generator=g))
        weights = torch.empty(components, dtype=torch.float64).uniform_(1.0, 2.0, generator=g)
        weights = weights / weights.sum()
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _components(self, z: torch.Tensor, sigma: float | torch.Tensor):
        """Per-component mean ``(1 - sigma) mu_k`` (K, D), variance ``c_k`` (K,) and log-weights (..., K)."""
        z = z.to(torch.float64)
        alpha = 1 - sigma
        var = alpha**2 * self.stds**2 + sigma**2
        centre = alpha * self.means
        diff = z.unsqueeze(-2) - centre  # (..., K, D)
        log_w = torch.log(self.weights) - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return diff, var, log_w

    def log_density(self, z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``log p_sigma(z)`` of the marginal at noise level ``sigma`` (differentiable in ``z`` and ``sigma``)."""
        _, _, log_w = self._components(z, sigma)
        return torch.logsumexp(log_w, dim=-1)

    def velocity(self, z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ``v(z, sigma) = E[eps - x0 | z_sigma = z]``, float64, shape of ``z``."""
        diff, var, log_w = self._components(z, sigma)
        w = torch.softmax(log_w, dim=-1).unsqueeze(-1)  # (..., K, 1)
        alpha = 1 - sigma
        gain = ((sigma - alpha * self.stds**2) / var).unsqueeze(-1)  # d(E[eps - x0 | z, k]) / dz
        return (w * (gain * diff - self.means)).sum(-2)

    def sample_data(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        noise = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise


def flow_sigmas(num_steps: int) -> list[float]:
    """The bundled pipelines' grid (FlowMatchEulerDiscreteScheduler, shift 1): ``linspace(1, 1/N, N)``, then 0."""
    return [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)] + [0.0]


def euler(velocity_fn: VelocityFn, z: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    for s, t in itertools.pairwise(sigmas):
        z = z + (t - s) * velocity_fn(z, s)
    return z


def rk4(velocity_fn: VelocityFn, z: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Classical Runge-Kutta on the grid (four velocity evaluations per step): the fine reference."""
    for s, t in itertools.pairwise(sigmas):
        h = t - s
        k1 = velocity_fn(z, s)
        k2 = velocity_fn(z + 0.5 * h * k1, s + 0.5 * h)
        k3 = velocity_fn(z + 0.5 * h * k2, s + 0.5 * h)
        k4 = velocity_fn(z + h * k3, t)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


def _log_snr(sigma: float) -> float:
    return math.log((1 - sigma) / sigma) if 0 < sigma < 1 else (math.inf if sigma == 0 else -math.inf)


def dpm_solver_pp_2m(velocity_fn: VelocityFn, z: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    r"""DPM-Solver++ 2M in data prediction (``x0 = z - sigma v``) over log-SNR ``lambda = log((1 - sigma) / sigma)``,
    as diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``: first order on
    the first step (no history) and on the last (``sigma = 0``), otherwise

    .. math::

        z_t = \frac{\sigma_t}{\sigma_s} z_s + \Big(1 - \frac{\sigma_t}{\sigma_s}\Big)
              \Big(D_0 + \frac{h}{2 h_{-1}} (D_0 - D_{-1})\Big), \quad h = \lambda_t - \lambda_s.
    """
    previous: tuple[float, torch.Tensor] | None = None  # (lambda, x0) of the step before
    for s, t in itertools.pairwise(sigmas):
        d0 = z - s * velocity_fn(z, s)
        lam_s, lam_t = _log_snr(s), _log_snr(t)
        d = d0
        if previous is not None and t > 0 and math.isfinite(previous[0]):
            h, h_prev = lam_t - lam_s, lam_s - previous[0]
            d = d0 + (h / (2 * h_prev)) * (d0 - previous[1])
        z = (t / s) * z + (1 - t / s) * d
        previous = (lam_s, d0)
    return z


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def psnr_db(error_rms: float, reference: torch.Tensor) -> float:
    """A PSNR-like figure: ``20 log10(peak-to-peak range of the reference / RMS error)``."""
    span = float(reference.max() - reference.min())
    return 20 * math.log10(span / error_rms) if error_rms > 0 else math.inf
