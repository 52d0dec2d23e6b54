"""The framework-free MeanCache sampler: Euler flow matching with cached average velocities.

This is the entry point for engines other than diffusers (ComfyUI nodes, custom loops); the diffusers
integration drives the same estimators step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from meancache.method.estimators import make_estimator
from meancache.schedule import Schedule
from meancache.validation import check_sigmas

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def sample(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    schedule: Schedule,
    estimator: str | None = None,
) -> torch.Tensor:
    r"""Integrate ``dz/dsigma = v(z, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` with MeanCache.

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``: ``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i``,
    where ``v_i = velocity_fn(z_i, sigma_i)`` on the schedule's computed steps and the estimator's average
    velocity on the others (``estimator`` names it, as in :class:`meancache.MeanCacheConfig`). The schedule
    is mapped to ``len(sigmas) - 1`` steps if it was made for another count
    (:meth:`meancache.Schedule.for_steps`). Returns the final latent in ``latents``' dtype; the steps
    are computed in float32.

    Estimators that need ``dv/dsigma`` (``"exact-jvp"``) get it from ``torch.func.jvp`` of ``velocity_fn``
    on the computed steps before a skip: there ``velocity_fn`` receives ``sigma`` as a 0-d float32 tensor
    and must be forward-differentiable (for a diffusers transformer:
    :func:`meancache.integrations.jvp_attention.enable_jvp_attention`).
    """
    sigma_values = check_sigmas(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)
    num_steps = len(sigma_values) - 1
    cache = make_estimator(estimator, schedule.for_steps(num_steps))
    z = latents
    for step in range(num_steps):
        sigma, sigma_next = sigma_values[step], sigma_values[step + 1]
        if cache.schedule.is_computed(step):
            derivative = None
            if cache.needs_derivative(step):
                tangent = cache.last_velocity() if step else None
                v, derivative = velocity_and_derivative(velocity_fn, z, sigma, tangent)
            else:
                v = velocity_fn(z, sigma)
            if v.shape != z.shape:
                raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for latents of shape {tuple(z.shape)}")
            cache.record(step, z, sigma, v, derivative)
            z = (z.float() + (sigma_next - sigma) * v.float()).to(latents.dtype)
        else:
            z_next, _ = cache.estimate(step, z, sigma, sigma_next)
            z = z_next.to(latents.dtype)
    return z


def velocity_and_derivative(
    velocity_fn: VelocityFn, z: torch.Tensor, sigma: float, tangent: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v(z, sigma)`` and its derivative along the trajectory, ``dv/dsigma = dv/dz . tangent + dv/dsigma``, in
    one forward-mode pass; ``tangent`` estimates ``dz/dsigma`` (``None``: the velocity itself, one more call)."""
    if tangent is None:
        tangent = velocity_fn(z, sigma)
    sigma_tensor = torch.tensor(sigma, dtype=torch.float32, device=z.device)
    return torch.func.jvp(
        velocity_fn, (z, sigma_tensor), (tangent.to(z.dtype).reshape(z.shape), torch.ones_like(sigma_tensor))
    )
