"""The calibration key of a generation: everything that changes a pipeline's trajectories, and nothing else.

:func:`calibration_key` is a JSON dict (the store names the file by its digest) with:

* ``pipeline``: the pipeline class; ``checkpoint``: ``name_or_path`` (a hub id, or the resolved folder);
* ``weights``: :func:`weights_fingerprint` of every model MeanCache gates (the transformer, a second expert, a
  CFG branch's own model, a ControlNet; a fused LoRA, other fine-tuned weights, adapter layers and their active
  adapters and scales change it), cached per pipeline by :class:`WeightsFingerprint`;
* ``sigmas``: the scheduler's sigmas for this run, rounded to 6 decimals: the step count and any shift,
  including the resolution-dependent one of FLUX.1 and Qwen-Image;
* ``latent_shape`` and ``dtype``: the first transformer call's ``hidden_states`` without the batch dimension
  (so the resolution and frame count, and batched CFG, which doubles only the batch) and its dtype;
* ``inputs``: :func:`call_structure` of each of the first step's transformer calls: which inputs it is given and
  their kinds, not their values or sizes (Z-Image Omni with a condition image passes SigLIP features where its
  text-to-image call passes None), and the numbers in its dict arguments (a LoRA's scale for the call);
* ``guidance``: what the generation's first step showed of its guidance
  (:func:`~meancache.integrations.diffusers.guidance.observed_guidance`: transformer calls and branches per step,
  the weights combining the branches, guidance inputs of the transformer, the pipeline's recorded guidance
  settings and guiders), never read from the pipeline call's arguments.

Prompts, seeds, batch size and ``num_images_per_prompt`` are not in it: the costs are means over latent
elements, which do not depend on them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from meancache.integrations.diffusers.guidance import key_number

FINGERPRINT_SAMPLES = 16
"""Elements read from each parameter and buffer for :func:`weights_fingerprint`."""


def weights_fingerprint(module: torch.nn.Module, samples: int = FINGERPRINT_SAMPLES) -> str:
    """SHA-256 (16 hex digits) over every parameter and buffer of ``module`` in ``named_parameters`` order:
    its name, shape and dtype, and ``samples`` elements at fixed, evenly spaced positions of the flattened
    tensor (first and last included), as float64; then over :func:`adapter_settings`.

    Cost: one small gather per tensor and one device-to-host copy in all, whatever the model's size. A LoRA
    fused into the weights changes every sampled element of the layers it touches (its update is dense); an
    unfused adapter adds parameters, and its scale and whether it is active are in :func:`adapter_settings`.
    Tensors on the ``meta`` device (sequential offloading) contribute their name, shape and dtype only."""
    digest = hashlib.sha256()
    values = []
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).round().long()
        values.append(flat[positions].to(torch.float64))
    if values:
        digest.update(torch.cat([v.cpu() for v in values]).numpy().tobytes())
    digest.update(repr(adapter_settings(module)).encode())
    return digest.hexdigest()[:16]


AdapterSettings = tuple[str, tuple[str, ...], tuple[float, ...], tuple[str, ...], bool]


def adapter_settings(module: torch.nn.Module) -> tuple[AdapterSettings, ...]:
    """Per adapter layer of ``module`` (a PEFT tuner layer, as diffusers' ``load_lora_weights`` inserts: a
    submodule holding a ``scaling`` dict, with ``active_adapters``): its name, its active adapters, their scales
    (what ``set_adapters(names, weights)`` sets), the adapters merged into its weights (``fuse_lora``) and
    whether adapters are disabled (``disable_lora``). Attribute reads only, no tensor is touched."""
    settings = []
    for name, layer in module.named_modules():
        scaling = layer.__dict__.get("scaling")
        if not isinstance(scaling, dict):
            continue
        active = getattr(layer, "active_adapters", ())
        names = (active,) if isinstance(active, str) else tuple(active)
        scales = tuple(round(float(scaling.get(a, 0.0)), 6) for a in names)
        merged = tuple(getattr(layer, "merged_adapters", ()))
        settings.append((name, names, scales, merged, bool(getattr(layer, "disable_adapters", False))))
    return tuple(settings)


class WeightsFingerprint:
    """:func:`weights_fingerprint` of a module, recomputed only when its tensors or adapter settings changed.

    The check is a walk over Python attributes, no device work: every parameter's and buffer's name, storage
    address (``data_ptr``: weights replaced or moved) and in-place version counter (``_version``: ``copy_``,
    ``add_``, ``load_state_dict``), and :func:`adapter_settings` (adapters loaded, fused, rescaled or switched).
    An in-place write through ``tensor.data``, which bumps no version counter, is seen only through the adapter
    settings it comes with (PEFT's merge, ``fuse_lora``, records the merged adapters)."""

    def __init__(self) -> None:
        self._signature: tuple[Any, ...] | None = None
        self._value = ""

    def __call__(self, module: torch.nn.Module) -> str:
        signature = (
            tuple((name, tensor.data_ptr(), tensor._version)
                  for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())),
            adapter_settings(module),
        )  # fmt: skip
        if signature != self._signature:
            self._value, self._signature = weights_fingerprint(module), signature
        return self._value


def checkpoint_identity(name_or_path: str) -> str:
    """A local folder resolved to its absolute path; a hub id (or empty name) as it is."""
    return str(Path(name_or_path).resolve()) if name_or_path and Path(name_or_path).exists() else name_or_path


def call_structure(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a transformer call is given, independent of values, sizes, prompt lengths and batch size: per keyword
    argument, its :func:`input_structure`."""
    return {name: input_structure(value) for name, value in sorted(kwargs.items())}


def input_structure(value: Any, in_dict: bool = False) -> Any:
    """What kind of transformer input ``value`` is: a tensor by its number of dimensions and dtype, a list or tuple by
    the distinct structures of its elements (a per-sample list of any length gives one), a dict by its entries, None
    as None and anything else by its type, except a number or bool in a dict argument (``in_dict``), which is kept
    (:func:`~meancache.integrations.diffusers.guidance.key_number`): ``joint_attention_kwargs={"scale": 0.5}``
    scales a LoRA for this call."""
    if isinstance(value, torch.Tensor):
        return f"tensor{value.dim()}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        distinct = {json.dumps(input_structure(v, in_dict), sort_keys=True) for v in value}
        return [json.loads(text) for text in sorted(distinct)]
    if isinstance(value, dict):
        return {str(k): input_structure(v, True) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if in_dict and (number := key_number(value)) is not None:
        return number
    return None if value is None else type(value).__name__


def calibration_key(
    pipe: Any,
    weights: str,
    checkpoint: str,
    sigmas: list[float],
    latents: torch.Tensor | None,
    calls: list[dict[str, Any]],
    guidance: dict[str, Any],
) -> dict[str, Any]:
    """The key of a generation of ``pipe`` whose transformer has :func:`weights_fingerprint` ``weights``, whose first
    step's transformer calls had the keyword arguments ``calls`` and showed ``guidance`` (module docstring)."""
    return {
        "pipeline": type(pipe).__name__,
        "checkpoint": checkpoint_identity(checkpoint),
        "weights": weights,
        "sigmas": [round(s, 6) for s in sigmas],
        "latent_shape": list(latents.shape[1:]) if isinstance(latents, torch.Tensor) else None,
        "dtype": str(latents.dtype).removeprefix("torch.") if isinstance(latents, torch.Tensor) else None,
        "inputs": [call_structure(kwargs) for kwargs in calls],
        "guidance": guidance,
    }
