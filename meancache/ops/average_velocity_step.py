r"""The average-velocity step: the one place MeanCache's update math lives.

Given the current latent ``z`` at noise level ``sigma``, the velocity the previous step used ``v_last``,
and an anchor step ``r`` (its latent ``z_anchor``, velocity ``v_anchor`` and level ``sigma_anchor``):

.. math::

    \bar u = \frac{z - z_r}{\sigma - \sigma_r}, \qquad
    \widehat{JVP} = \frac{\bar u - v_r}{\sigma - \sigma_r}, \qquad
    \hat u = v_{last} + (\sigma_{next} - \sigma)\,\widehat{JVP}, \qquad
    z_{next} = z + (\sigma_{next} - \sigma)\,\hat u

Implementations, same semantics, chosen by device: the compiled C++ kernel (``csrc/``, registered as
``torch.ops.meancache.average_velocity_step``) for CPU tensors, and :func:`average_velocity_step_reference`
(PyTorch) otherwise and whenever an input requires grad. All inputs share one shape, device and
floating dtype; the math runs in float32 (float64 for float64 inputs) and both outputs have the inputs'
dtype.
"""

from __future__ import annotations

import math

import torch

from meancache.ops._extension import cpp_ops


def average_velocity_step(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: float,
    sigma: float,
    sigma_next: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(z_next, u_hat)``; see the module docstring for the equations."""
    check_average_velocity_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next)
    tensors = (z, v_last, z_anchor, v_anchor)
    ops = cpp_ops()
    if ops is not None and z.device.type == "cpu" and not any(t.requires_grad for t in tensors):
        return ops.average_velocity_step(*tensors, float(sigma_anchor), float(sigma), float(sigma_next))
    return average_velocity_step_reference(*tensors, sigma_anchor, sigma, sigma_next)


def average_velocity_step_reference(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: float,
    sigma: float,
    sigma_next: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The equations of the module docstring, term by term, in PyTorch (differentiable)."""
    dtype = z.dtype
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z, v_last, z_anchor, v_anchor = (t.to(math_dtype) for t in (z, v_last, z_anchor, v_anchor))
    ubar = (z - z_anchor) / (sigma - sigma_anchor)
    jvp = (ubar - v_anchor) / (sigma - sigma_anchor)
    u_hat = v_last + (sigma_next - sigma) * jvp
    z_next = z + (sigma_next - sigma) * u_hat
    return z_next.to(dtype), u_hat.to(dtype)


def check_average_velocity_inputs(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: float,
    sigma: float,
    sigma_next: float,
) -> None:
    """Raise a ``ValueError`` / ``TypeError`` naming the first bad argument."""
    named = {"z": z, "v_last": v_last, "z_anchor": z_anchor, "v_anchor": v_anchor}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {t.dtype}")
        if t.shape != z.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but z has shape {tuple(z.shape)}; all must match")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}; all must be on one device")
        if t.dtype != z.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but z has {z.dtype}; all must share one dtype")
    for name, s in {"sigma_anchor": sigma_anchor, "sigma": sigma, "sigma_next": sigma_next}.items():
        if isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a Python float, got a tensor")
        if not math.isfinite(s):
            raise ValueError(f"{name} must be finite, got {s!r}")
    if sigma == sigma_anchor:
        raise ValueError(
            f"sigma ({sigma!r}) must differ from sigma_anchor: the average velocity divides by their difference"
        )
