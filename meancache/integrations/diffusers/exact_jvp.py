r"""The derivative path of the ``"exact-jvp"`` estimator: ``dv/dsigma`` from a forward-mode pass of the transformer.

Only the gate calls into this module, and only on the computed steps an estimator asks a derivative for
(:meth:`~meancache.method.estimators.Estimator.needs_derivative`; the default ``"paper"`` estimator never does):

* :func:`derivative_pass` runs one transformer call under ``torch.func.jvp``, with the tangent
  ``(dz/dsigma, dtimestep/dsigma)`` on ``(hidden_states, timestep)`` (:func:`latents_tangent`,
  :func:`timestep_rate`) and attention switched to the JVP attention op;
* at the step's scheduler call, :func:`step_derivative` checks that the tangent sat on the latents the scheduler
  steps (:func:`check_latents_lead`) and combines the calls' derivatives the way the pipeline combined their
  velocities (:func:`guided_derivative`);
* :func:`refuse_derivative_composition` refuses, before a generation's first call, the setups a forward-mode pass
  cannot run under or would differentiate wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from meancache.integrations.diffusers.layout import first_output, latent_block, latent_branches
from meancache.integrations.jvp_attention import sdpa_as_jvp_attention
from meancache.method.estimators import Estimator


@dataclass(frozen=True)
class DerivativePass:
    """One transformer call run in forward mode (:func:`derivative_pass`)."""

    output: Any
    """What the call returns to the pipeline (the velocity, in the layout it asked for)."""
    velocity: torch.Tensor
    derivative: torch.Tensor
    """``dv/dsigma`` along the trajectory, in the velocity's layout."""
    hidden: torch.Tensor
    """The call's ``hidden_states``: checked against the latents the scheduler steps (:func:`check_latents_lead`)."""
    tangent_calls: int
    """Further plain calls made for the tangent: 1 at step 0 (the call's own output), else 0."""


def refuse_derivative_composition(
    estimator: Estimator, num_steps: int, compiled: Callable[[], bool], controlnet: bool
) -> None:
    """Refuse a generation whose ``estimator`` asks for derivatives on a transformer that is ``compiled()``
    (``torch.func.jvp`` does not run through ``torch.compile``; asked only then: it walks the transformer's
    modules) or in a pipeline with a ``controlnet`` (its residuals move with sigma too, and would be held fixed)."""
    if not any(estimator.needs_derivative(i) for i in range(num_steps)):
        return
    if compiled():
        raise RuntimeError(
            f"the {estimator.name!r} estimator runs the transformer in forward mode (torch.func.jvp), "
            "which torch.compile'd modules do not support; use the default estimator='paper' with a compiled "
            "transformer, or an uncompiled transformer"
        )
    if controlnet:
        raise RuntimeError(
            f"the {estimator.name!r} estimator differentiates the transformer alone, but this pipeline's "
            "ControlNet residuals move with sigma too and would be held fixed (a wrong derivative); use the "
            "default estimator='paper' with ControlNet pipelines"
        )


def derivative_pass(
    call: Callable[..., Any], transformer: torch.nn.Module, estimator: Estimator, step: int, sigma: float,
    scheduler: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
) -> DerivativePass:  # fmt: skip
    """One forward-mode pass of ``call`` (the transformer's call, ``transformer`` the module inside it) at ``step``
    of the generation, at ``sigma``: the velocity and its derivative along the trajectory.

    Tangents: on ``hidden_states``, the velocity the previous step used on the latents' block (tiled over
    batched CFG branches) and 0 on whatever the pipeline appended (reference-image tokens, conditioning
    channels), which does not move with sigma; at step 0, the call's own output (one more call). On
    ``timestep``, ``d timestep / d sigma``."""
    hidden, timestep = kwargs.get("hidden_states"), kwargs.get("timestep")
    if not (isinstance(hidden, torch.Tensor) and isinstance(timestep, torch.Tensor)):
        raise TypeError(
            f"the {estimator.name!r} estimator needs the transformer called with hidden_states= and "
            "timestep= tensors; this pipeline passes them differently"
        )

    def velocity(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return first_output(call(*args, **{**kwargs, "hidden_states": h, "timestep": t, "return_dict": False}))

    if step == 0:
        tangent, tangent_calls = velocity(hidden, timestep), 1
    else:
        tangent, tangent_calls = latents_tangent(estimator.last_velocity(), hidden), 0
    timestep = timestep.contiguous()  # pipelines may pass an expanded (stride-0) batch of timesteps
    with sdpa_as_jvp_attention(transformer):
        v, derivative = torch.func.jvp(
            velocity, (hidden, timestep), (tangent, timestep_rate(timestep, sigma, scheduler))
        )
    output = Transformer2DModelOutput(sample=v) if kwargs.get("return_dict", True) else (v,)
    return DerivativePass(output, v, derivative, hidden, tangent_calls)


def timestep_rate(timestep: torch.Tensor, sigma: float, scheduler: Any) -> torch.Tensor:
    """``d timestep / d sigma`` for a transformer called with ``timestep`` at ``sigma``: pipelines pass sigma (Flux,
    Qwen-Image) or the scheduler's timestep, sigma times ``num_train_timesteps`` (HunyuanVideo, Wan, SD3), so the rate
    is ``timestep / sigma``. Anything else is refused rather than differentiated wrongly: Ideogram4 and Z-Image pass
    model time ``1 - sigma`` (whose rate is -1, not ``timestep / sigma``), and Ideogram4 also puts its text padding
    before the latent tokens, which the latents' tangent (:func:`latents_tangent`) does not follow."""
    scales = (1.0, float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000)))
    if not any(torch.allclose(timestep.float(), torch.full_like(timestep, sigma * c, dtype=torch.float32),
                              rtol=1e-2, atol=1e-3 * c) for c in scales):  # fmt: skip
        raise TypeError(
            f"the 'exact-jvp' estimator needs the transformer's timestep proportional to sigma (sigma or sigma * "
            f"{scales[1]:g}); this pipeline passes {timestep.flatten()[0].item():.4g} at sigma {sigma:.4g} (e.g. "
            "model time 1 - sigma). Use the default estimator='paper' with it"
        )
    return timestep / sigma


def latents_tangent(velocity: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A tangent for ``hidden``: ``velocity`` (latent-shaped, tiled over batched CFG branches) on the latents'
    block, 0 elsewhere."""
    if hidden.shape[0] % velocity.shape[0]:
        raise RuntimeError(
            f"the 'exact-jvp' estimator puts its tangent on the latents in the transformer's hidden_states, but "
            f"hidden_states of shape {tuple(hidden.shape)} are not whole batches of the latents "
            f"{tuple(velocity.shape)} the scheduler steps; use the default estimator='paper' with this pipeline"
        )
    tangent = torch.zeros_like(hidden)
    tiles = hidden.shape[0] // velocity.shape[0]
    block = latent_block(tangent, velocity.shape).unflatten(0, (tiles, velocity.shape[0]))
    block.copy_(velocity.unsqueeze(0).expand_as(block))
    return tangent


def step_derivative(passes: list[DerivativePass], sample: torch.Tensor, guided: torch.Tensor) -> torch.Tensor | None:
    """``d guided / d sigma`` of a computed step from its forward-mode ``passes`` (None without any), after
    checking that each put its tangent on the latents ``sample`` the scheduler steps."""
    if not passes:
        return None
    check_latents_lead([p.hidden for p in passes], sample)
    return guided_derivative([(p.velocity, p.derivative) for p in passes], guided)


def check_latents_lead(inputs: list[torch.Tensor], sample: torch.Tensor) -> None:
    """Refuse, before any skipped step uses the derivative, a forward-mode pass whose ``hidden_states`` do not hold the
    latents the scheduler steps (``sample``) as their leading block in every batched branch: the tangent was put on
    that block (:func:`latents_tangent`), so it was on the wrong values. Pipelines that keep the first frame from an
    image and step the others (HunyuanVideo's ``token_replace``, Kandinsky 5 and Sana image-to-video) do this."""
    batch = sample.shape[0]
    for hidden in inputs:
        lead = latent_block(hidden, torch.Size((hidden.shape[0], *sample.shape[1:])))
        if hidden.shape[0] % batch or not all(torch.equal(t, sample.to(hidden.dtype)) for t in lead.split(batch)):
            raise RuntimeError(
                f"the 'exact-jvp' estimator puts its tangent on the leading block of the transformer's hidden_states "
                f"{tuple(hidden.shape)}, but that block is not the latents {tuple(sample.shape)} the scheduler steps "
                "(e.g. a first frame kept from an image); use the default estimator='paper' with this pipeline"
            )


def guided_derivative(branches: list[tuple[torch.Tensor, torch.Tensor]], guided: torch.Tensor) -> torch.Tensor:
    r"""``d guided / d sigma`` from each transformer call's velocity and derivative.

    Per sample, the guided velocity is written as the least-squares combination of the branch velocities,
    ``g = sum_b w_b v_b``, and the same weights combine the derivatives, ``dg = sum_b w_b dv_b``. This is
    exact for linear guidance (one branch, CFG, true CFG); for Qwen-Image's norm rescale, ``g`` is still in
    the branches' span, but the derivative of the rescale factor itself is left out. Batched CFG calls
    are split into their latent-sized parts; appended reference-image tokens are dropped, as the pipeline does."""
    batch = guided.shape[0]
    velocities, derivatives = [], []
    for v, d in branches:  # the latents' block, what the pipeline keeps
        velocities += latent_branches(v, guided)
        derivatives += latent_branches(d, guided)
    v = torch.stack(velocities, 1).reshape(batch, len(velocities), -1).double()  # (B, branches, features)
    d = torch.stack(derivatives, 1).reshape(batch, len(derivatives), -1).float()
    g = guided.reshape(batch, -1, 1).double()
    weights = torch.linalg.pinv(v @ v.transpose(1, 2)) @ (v @ g)  # (B, branches, 1)
    return (weights.float().transpose(1, 2) @ d).reshape(guided.shape)
