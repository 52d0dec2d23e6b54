"""The guidance part of the calibration key, from what MeanCache observes on a generation's first step.

MeanCache never sees the arguments of the pipeline call. On the first step (computed in every schedule) it sees
what guidance does: :func:`observed_guidance` builds the key's ``guidance`` entry from

* ``transformer_calls``: how many transformer calls the step makes, and ``branches``: how many predictions they
  return per latent sample (1 without CFG, 2 with CFG, batched or in separate calls, 3 with image and text CFG);
* ``weights``: the weights with which the pipeline combined the branch predictions (the latents' block of each:
  leading, or last where an image-to-video pipeline keeps the first frame and steps the others, whichever fits)
  into the guided velocity the scheduler received (:func:`combination_weights`; ``[1 - w, w]`` or ``[w, 1 - w]``
  for a CFG scale ``w``, in the pipeline's call order, rounded to ``WEIGHT_DECIMALS``), and ``rescaled``: whether
  the guided velocity is that combination rescaled row by row (Qwen-Image's norm rescale, ``guidance_rescale``,
  CFG renormalisation);
* ``inputs``: the values of the transformer's guidance inputs (FLUX.1's and HunyuanVideo's guidance embedding);
* ``attributes``: the guidance settings the pipeline records on itself (``_guidance_scale``, ``_guidance_rescale``,
  ``_guidance_scale_2``, ...; exact) and the configuration of its guider components (diffusers' guiders).

When the combination cannot be told from the first step (the guided velocity is not parallel to any combination of
the branches, or the branches are too alike to tell the weights apart) and no guider describes it,
:attr:`GuidanceObservation.unidentified` says why, and the generation is not calibrated: a key without the weights
would let two guidance settings share one calibration.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meancache.integrations.diffusers.layout import first_output, latent_branches

WEIGHT_DECIMALS = 2
"""Decimals the recovered branch weights are keyed to: guidance scales closer than 0.01 share a calibration."""
MAX_RESIDUAL = 1e-2
"""The largest root-mean-square sine between the guided velocity's rows and the fitted combination's that still
counts as parallel (bfloat16 rounding gives about 3e-3)."""
RESCALE_OVER_RESIDUAL = 10.0
MIN_RESCALE = 1e-5
"""The guided velocity counts as ``rescaled`` when its rows' mean ``|scale - 1|`` exceeds both the fit's residual
times ``RESCALE_OVER_RESIDUAL`` (rounding) and ``MIN_RESCALE``."""
MAX_UNCERTAINTY = 2e-3
"""The largest standard error of the recovered weights that is keyed: at three standard errors, guidance settings
0.02 apart never share a key."""


@dataclass(frozen=True)
class GuidanceObservation:
    """The key's ``guidance`` entry (module docstring), or why the guidance cannot be identified."""

    settings: dict[str, Any]
    unidentified: str | None = None


@dataclass(frozen=True)
class CombinationFit:
    """How the guided velocity is made from the branch predictions (:func:`combination_weights`)."""

    weights: tuple[float, ...]
    """Per branch, summing to 1."""
    residual: float
    """Root-mean-square sine of the angle between the guided velocity's rows and the combination's."""
    uncertainty: float
    """Estimated standard error of the weights (0 for one branch, infinite when they cannot be told apart)."""
    rescaled: bool
    """Whether the guided velocity's rows are the combination's scaled by factors other than 1."""


def observed_guidance(
    pipe: Any, calls: Sequence[Mapping[str, Any]], outputs: Sequence[Any], guided: torch.Tensor
) -> GuidanceObservation:
    """The guidance of a generation's first step: ``calls`` are the keyword arguments of its transformer calls,
    ``outputs`` what they returned (in call order), ``guided`` the velocity the scheduler received."""
    guiders = _guider_settings(pipe)
    settings: dict[str, Any] = {"transformer_calls": len(calls), "inputs": _guidance_inputs(calls),
                                "attributes": {**_pipeline_attributes(pipe), **guiders}}  # fmt: skip
    predictions = [_prediction(output, guided.shape[1:]) for output in outputs] if len(outputs) == len(calls) else []
    # the latents' block leads the predictions (appended tokens or channels) or ends them (a kept first frame);
    # the two differ only where a prediction is larger than the latents
    larger = any(p is not None and p.shape[1:] != guided.shape[1:] for p in predictions)
    fits = []
    for trailing in (False, True) if larger else (False,):
        branches = _branch_predictions(predictions, guided, trailing)
        if branches is not None:
            fits.append((combination_weights(branches, guided), branches))
    if not fits:
        return GuidanceObservation(settings, "the first step's transformer outputs do not split into latent batches")
    fit, branches = min(fits, key=lambda pair: pair[0].residual)
    settings["branches"] = len(branches)
    unidentified = None
    if fit.residual > MAX_RESIDUAL:
        unidentified = f"the guided velocity is no (rescaled) combination of the branches (residual {fit.residual:.2g})"
    elif fit.uncertainty > MAX_UNCERTAINTY:
        unidentified = f"the branch predictions are too alike to tell the weights apart (error {fit.uncertainty:.2g})"
    if unidentified is None:
        settings["weights"] = [round(w, WEIGHT_DECIMALS) + 0.0 for w in fit.weights]
        settings["rescaled"] = fit.rescaled
    elif guiders:  # the guiders' configuration describes the combination
        unidentified = None
    return GuidanceObservation(settings, unidentified)


def combination_weights(branches: Sequence[torch.Tensor], guided: torch.Tensor) -> CombinationFit:
    r"""The weights ``a`` (summing to 1) for which every row ``r`` (last dimension) of ``guided`` is parallel to the
    combination ``sum_b a_b v_{b,r}`` of the branch predictions.

    Plain CFG gives ``g = u + w (c - u)`` exactly; Qwen-Image's norm rescale and ``guidance_rescale`` multiply
    rows or samples of it by a factor, which keeps them parallel. With ``P_r`` the projection orthogonal to
    ``g_r``, ``a`` minimises ``sum_r |P_r V_r a|^2 = a^T M a`` subject to ``sum_b a_b = 1`` (solved on the
    directions summing to 0, so an exact fit, where ``M`` is singular, is found too). The residual is
    ``sqrt(a^T M a / sum_r |V_r a|^2)``; the standard error of ``a`` is that residual over the square root of
    ``M``'s smallest eigenvalue on the directions summing to 0, relative to ``sum_r |V_r a|^2``, and of the
    number of elements. Computed in float64 on the CPU."""
    width = guided.shape[-1]
    g = guided.detach().to("cpu", torch.float64).reshape(-1, width)
    v = torch.stack([b.detach().to("cpu", torch.float64).reshape(-1, width) for b in branches], -1)  # (R, D, B)
    norms = (g * g).sum(-1)
    rows = norms > 0
    g, v, norms = g[rows], v[rows], norms[rows]
    if not len(g):
        return CombinationFit((1.0,) * len(branches), math.inf, math.inf, False)
    vg = torch.einsum("rdb,rd->rb", v, g)
    gram = torch.einsum("rdb,rdc->bc", v, v) - torch.einsum("rb,rc->bc", vg / norms[:, None], vg)
    count = len(branches)
    # a = 1/B + Q y over an orthonormal basis Q of the directions summing to 0 (the last columns of QR([1, I]))
    basis = torch.cat([torch.ones(count, 1, dtype=torch.float64), torch.eye(count, dtype=torch.float64)], 1)
    q = torch.linalg.qr(basis)[0][:, 1:count]
    mean = torch.full((count,), 1 / count, dtype=torch.float64)
    a = mean - q @ torch.linalg.pinv(q.T @ gram @ q) @ (q.T @ gram @ mean)
    combination = v @ a  # (R, D)
    total = float((combination * combination).sum())
    if total == 0:
        return CombinationFit(tuple(float(w) for w in a), math.inf, math.inf, False)
    residual = math.sqrt(max(float(a @ gram @ a), 0.0) / total)
    uncertainty = 0.0
    if count > 1:
        smallest = float(torch.linalg.eigvalsh(q.T @ gram @ q).min()) / total
        uncertainty = residual / math.sqrt(smallest * combination.numel()) if smallest > 0 else math.inf
    scale = (combination * g).sum(-1) / (combination * combination).sum(-1).clamp_min(1e-300)
    rescaled = float((scale - 1).abs().mean()) > max(RESCALE_OVER_RESIDUAL * residual, MIN_RESCALE)
    return CombinationFit(tuple(float(w) for w in a), residual, uncertainty, rescaled)


def _prediction(output: Any, sample: torch.Size) -> torch.Tensor | None:
    """The prediction in a transformer output (:func:`first_output`) as a tensor: a list of per-sample tensors is
    stacked (None when they differ in shape), each reshaped to ``sample`` (one latent sample's shape) when it holds
    as many elements: Z-Image returns ``(C, 1, H, W)`` per sample of ``(C, H, W)`` latents and squeezes the frame
    dimension itself."""
    output = first_output(output)
    if isinstance(output, list) and output and all(isinstance(t, torch.Tensor) for t in output):
        if len({t.shape for t in output}) != 1:
            return None
        return torch.stack([t.reshape(sample) if t.numel() == sample.numel() else t for t in output])
    return output if isinstance(output, torch.Tensor) else None


def _branch_predictions(
    predictions: Sequence[torch.Tensor | None], guided: torch.Tensor, trailing: bool
) -> list[torch.Tensor] | None:
    """The latent-shaped branches of the first step's transformer predictions (:func:`_prediction`; batched CFG
    split; each prediction's leading block, or its last with ``trailing``), in call order; None when a prediction's
    layout does not contain a whole number of latent batches."""
    branches: list[torch.Tensor] = []
    for prediction in predictions:
        if prediction is None:
            return None
        try:
            branches += latent_branches(prediction, guided, trailing)
        except RuntimeError:
            return None
    return branches or None


def key_number(value: Any) -> Any:
    """A number or bool as the key holds it (6 decimals), anything else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        return round(float(value), 6)
    return None


def _guidance_inputs(calls: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per transformer input whose name contains ``guidance`` (a tensor or a number), its distinct values over the
    first step's calls, rounded."""
    inputs: dict[str, set[float]] = {}
    for kwargs in calls:
        for name, value in kwargs.items():
            if "guidance" not in name:
                continue
            values = value.detach().flatten().tolist() if isinstance(value, torch.Tensor) else [value]
            inputs.setdefault(name, set()).update(r for r in map(key_number, values) if r is not None)
    return {name: sorted(values) for name, values in sorted(inputs.items()) if values}


def _pipeline_attributes(pipe: Any) -> dict[str, Any]:
    """The pipeline's own guidance settings: its attributes ``_*guidance*`` and ``_*cfg*`` holding numbers or
    bools, which pipelines set from their call arguments before the denoising loop."""
    return {
        name: key_number(value)
        for name, value in sorted(vars(pipe).items())
        if name.startswith("_") and ("guidance" in name or "cfg" in name) and key_number(value) is not None
    }


def _guider_settings(pipe: Any) -> dict[str, Any]:
    """The configuration (numbers, bools, strings) of the pipeline's guider components (diffusers' guiders, which
    combine the branches themselves), by component name."""
    settings = {}
    for name, component in sorted(getattr(pipe, "components", {}).items()):
        config = getattr(component, "config", None)
        if type(component).__module__.startswith("diffusers.guiders") and isinstance(config, Mapping):
            values = sorted((k, v) for k, v in config.items() if not k.startswith("_"))
            settings[name] = {k: v for k, v in values if isinstance(v, (bool, int, float, str))}
    return settings
