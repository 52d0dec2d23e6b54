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

import enum
import functools
import hashlib
import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from meancache.integrations.diffusers.guidance import key_number

FINGERPRINT_SAMPLES = 16
"""Elements read from each stored tensor of every parameter and buffer for :func:`weights_fingerprint`."""

logger = logging.getLogger(__name__)


def weights_fingerprint(module: torch.nn.Module, samples: int = FINGERPRINT_SAMPLES) -> str:
    """SHA-256 (16 hex digits) over every parameter and buffer of ``module`` in ``named_parameters`` order:
    its name, shape and dtype, the identity of a tensor subclass (:func:`tensor_parts`: a quantized weight's class
    and quantization settings), and ``samples`` elements at fixed, evenly spaced positions of each tensor that
    holds its data (:func:`sample_elements`), as float64; then over :func:`adapter_settings` and the quantization
    settings outside the weights (:func:`quantization_settings`: diffusers' quantization config, a quantized
    layer's compute dtype).

    What holds the data: a plain tensor or parameter itself; a quantized weight's inner tensors (torchao's
    ``Int8Tensor``, ``Float8Tensor``, ``IntxUnpackedToInt8Tensor``, older torchao's nested
    ``AffineQuantizedTensor``, quanto's ``QBytesTensor``: int8 or float8 codes, scales, zero points); a parameter
    subclass's own packed storage and its tensor attributes (GGUF's ``GGUFParameter``, bitsandbytes' ``Params4bit``
    and ``Int8Params``). So two copies of a checkpoint quantized differently key apart (other codes, scales or
    settings), and one quantized again with the same settings keys the same. Nothing is dequantized or copied whole:
    one small gather per stored tensor and one device-to-host copy per device the model is on, whatever the model's
    size, under ``no_grad`` (inference tensors, and quantized weights under ``inference_mode``, are read as they
    are). A LoRA fused into the weights changes every sampled element of the layers it touches (its update is
    dense); an unfused adapter adds parameters, and its scale and whether it is active are in
    :func:`adapter_settings`. Tensors on the ``meta`` device (sequential offloading) contribute their name, shape,
    dtype and identity only. A tensor whose data cannot be read (a tensor subclass that neither exposes inner
    tensors nor holds storage) contributes the same, plus its attributes, with one warning per fingerprint naming
    it: a change of its values alone is then not seen."""
    digest = hashlib.sha256()
    values = []
    unreadable: list[str] = []
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            try:
                identity, leaves = tensor_parts(tensor)
                read = [sample_elements(leaf, samples) for leaf in leaves if not leaf.is_meta and leaf.numel() > 0]
            except Exception as error:  # a tensor subclass whose data no operation reaches: its identity only
                unreadable.append(f"{name} ({type(tensor).__qualname__}: {type(error).__name__}: {error})")
                identity, read = f"{class_name(tensor)}{stable_repr(vars(tensor))};", []
            digest.update(identity.encode())
            values.extend(read)
        if values:  # one device-to-host copy per run of tensors on one device
            runs = [torch.cat(list(run)).cpu() for _, run in itertools.groupby(values, key=lambda v: v.device)]
            digest.update(torch.cat(runs).numpy().tobytes())
    digest.update(repr(adapter_settings(module)).encode())
    if settings := quantization_settings(module):
        digest.update(repr(settings).encode())
    if unreadable:
        logger.warning(
            "MeanCache: the weight fingerprint could not read the values of %d tensor(s), first %s; they are keyed "
            "by name, class, shape, dtype and attributes only, so a calibration is reused if only their values "
            "change (clear it with `meancache calibrations clear`).", len(unreadable), unreadable[0],
        )  # fmt: skip
    return digest.hexdigest()[:16]


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def tensor_parts(tensor: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """A parameter's or buffer's identity beyond name, shape and dtype, and the plain tensors holding its data.

    * A plain tensor or parameter: no identity (so the fingerprint of an unquantized model is what it always was),
      itself.
    * A wrapper subclass (``__tensor_flatten__``: torchao's quantized tensors, quanto's ``QTensor``): its class and
      its flatten context (block size, activation quantization, qtype, axis, ...), and the parts of its inner
      tensors, by attribute name.
    * A parameter subclass holding its own storage (``GGUFParameter``, ``Params4bit``, ``Int8Params``): its class
      and its non-tensor attributes (quantization type, block size, ...), itself as a plain tensor, and the parts of
      its tensor attributes (``Int8Params.SCB``).

    Attributes only: no device work. Raises whatever the subclass raises when it cannot be taken apart."""
    if type(tensor) in PLAIN_TENSOR_TYPES:
        return "", [tensor]
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, context = tensor.__tensor_flatten__()
        identity, leaves = f"{class_name(tensor)}{stable_repr(context)}", []
    else:
        attributes = vars(tensor)
        names = sorted(n for n, v in attributes.items() if isinstance(v, torch.Tensor))
        others = {n: v for n, v in sorted(attributes.items()) if not isinstance(v, torch.Tensor)}
        identity, leaves = f"{class_name(tensor)}{stable_repr(others)}", [tensor.as_subclass(torch.Tensor)]
    for name in names:
        inner_identity, inner_leaves = tensor_parts(getattr(tensor, name))
        identity += f"[{name}:{inner_identity}]"
        leaves += inner_leaves
    return identity + ";", leaves


def sample_elements(tensor: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` elements of ``tensor`` at fixed, evenly spaced positions of its row-major order (first and last
    included), as a float64 vector on its device: one gather, whatever its strides (no copy of the tensor)."""
    return tensor[sample_index(tuple(tensor.shape), samples, tensor.device)].reshape(-1).to(torch.float64)


@functools.lru_cache(maxsize=1024)
def sample_index(shape: tuple[int, ...], samples: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The index of :func:`sample_elements` for a tensor of ``shape`` on ``device`` (kept: a transformer's tensors
    come in few shapes, so a fingerprint costs about one gather per tensor)."""
    numel = math.prod(shape)
    positions = torch.linspace(0, numel - 1, min(samples, numel), device=device).round().long()
    return torch.unravel_index(positions, shape)


def tensor_signature(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What :class:`WeightsFingerprint` compares to tell that a parameter or buffer may have changed: per plain
    tensor holding its data (:func:`tensor_parts`), its storage address and in-place version counter; its class and
    object identity when it cannot be taken apart. None when a version cannot be read (an inference tensor: made or
    written under ``inference_mode``, which counts no versions)."""
    try:
        leaves = tensor_parts(tensor)[1]
        addresses = tuple(leaf.data_ptr() for leaf in leaves)
    except Exception:  # weights_fingerprint warns about it
        return (class_name(tensor), id(tensor))
    if any(leaf.is_inference() for leaf in leaves):
        return None
    return (class_name(tensor), addresses, tuple(leaf._version for leaf in leaves))


def class_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def stable_repr(value: Any) -> str:
    """``repr(value)`` without memory addresses (``<... object at 0x7f...>``), which differ between processes."""
    return MEMORY_ADDRESS.sub("", repr(value))


MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def quantization_settings(module: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """Quantization settings that live outside the weights, per submodule of ``module`` (attribute reads only):

    * the config diffusers quantized it with on loading (``from_pretrained`` or ``from_single_file`` with a
      ``quantization_config``: its ``hf_quantizer``), ``to_dict()``;
    * for a layer holding a quantized weight (a parameter of a tensor subclass), its class and its public attributes
      of plain values (numbers, strings, dtypes, enums, None; not ``training``): the compute dtype of bitsandbytes
      and GGUF layers swapped in by hand, the settings of quanto's layers.

    Memory addresses are removed from what is read (:func:`stable_repr`)."""
    settings = []
    for name, submodule in module.named_modules():
        quantizer = submodule.__dict__.get("hf_quantizer")
        if quantizer is not None:
            settings.append((name, stable_repr(sorted(quantizer.quantization_config.to_dict().items()))))
        if any(type(p) not in PLAIN_TENSOR_TYPES for p in submodule.parameters(recurse=False)):
            plain = {k: v for k, v in sorted(vars(submodule).items())
                     if not k.startswith("_") and k != "training" and isinstance(v, PLAIN_VALUE_TYPES)}  # fmt: skip
            settings.append((name, f"{class_name(submodule)}{stable_repr(plain)}"))
    return tuple(settings)


PLAIN_VALUE_TYPES = (bool, int, float, str, torch.dtype, enum.Enum, type(None))


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

    The check is a walk over Python attributes, no device work: every parameter's and buffer's name and
    :func:`tensor_signature` (per tensor holding its data, a quantized weight's inner tensors included: storage
    address, ``data_ptr``: weights replaced, re-quantized or moved; in-place version counter, ``_version``:
    ``copy_``, ``add_``, ``load_state_dict``), and :func:`adapter_settings` (adapters loaded, fused, rescaled or
    switched). An in-place write through ``tensor.data``, which bumps no version counter, is seen only through the
    adapter settings it comes with (PEFT's merge, ``fuse_lora``, records the merged adapters). A module holding an
    inference tensor (weights made under ``inference_mode``, whose writes count no versions) is fingerprinted
    anew on every call."""

    def __init__(self) -> None:
        self._signature: tuple[Any, ...] | None = None
        self._value = ""

    def __call__(self, module: torch.nn.Module) -> str:
        named = itertools.chain(module.named_parameters(), module.named_buffers())
        tensors = tuple((name, tensor_signature(tensor)) for name, tensor in named)
        signature = None if any(s is None for _, s in tensors) else (tensors, adapter_settings(module))
        if signature is None or signature != self._signature:
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
