"""Where the latents sit in what a transformer takes and returns, and how a recorded output is reshaped for a call.

Pipelines append reference-image tokens after the latent tokens and conditioning channels after the latent
channels (:func:`latent_block`), batch CFG branches one after another (:func:`latent_branches`), return a tuple,
a diffusers output class, a bare tensor or a list of per-sample tensors (:func:`first_output`), and may switch CFG
on or off between steps, changing a call's batch (:func:`batch_of`, :func:`cycled_output`). A recorded output is
copied tensor by tensor, whatever its layout (:func:`copy_tensors`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree
from diffusers.utils import BaseOutput


def latent_block(tensor: torch.Tensor, latents: torch.Size, trailing: bool = False) -> torch.Tensor:
    """The leading block of ``tensor`` (all of its batch) in the latents' non-batch dimensions: pipelines append
    reference-image tokens after the latent tokens and conditioning channels after the latent channels. With
    ``trailing``, the last block: image-to-video pipelines that keep the first frame from the image step the
    others, ``prediction[:, :, 1:]``."""
    if tensor.dim() != len(latents) or any(t < n for t, n in zip(tensor.shape[1:], latents[1:], strict=True)):
        raise RuntimeError(
            f"a transformer input or output of shape {tuple(tensor.shape)} does not contain the latents "
            f"{tuple(latents)} as its {'last' if trailing else 'leading'} block; this pipeline's layout is not "
            "supported by the estimator"
        )
    if trailing:
        return tensor[(slice(None), *(slice(t - n, t) for t, n in zip(tensor.shape[1:], latents[1:], strict=True)))]
    return tensor[(slice(None), *(slice(0, n) for n in latents[1:]))]


def latent_branches(prediction: torch.Tensor, guided: torch.Tensor, trailing: bool = False) -> list[torch.Tensor]:
    """The latent-shaped branches of one transformer call's ``prediction``: its :func:`latent_block` (the last one
    with ``trailing``), split into batches of ``guided``'s (batched CFG puts its branches one after another in the
    batch)."""
    block = latent_block(prediction, guided.shape, trailing)
    if block.shape[0] % guided.shape[0]:
        raise RuntimeError(
            f"a transformer output of shape {tuple(prediction.shape)} does not split into latents {tuple(guided.shape)}"
        )
    return list(block.reshape(-1, *guided.shape).unbind(0))


def first_output(output: Any) -> Any:
    """What a transformer returned as its prediction: the first entry of a tuple or diffusers output class, or the
    output itself (a tensor: Kandinsky 5 returns it bare with ``return_dict=False``; a list of per-sample tensors:
    Z-Image)."""
    if isinstance(output, (tuple, BaseOutput)) and not isinstance(output, torch.Tensor):
        return output[0]
    return output


def batch_of(hidden: Any) -> int | None:
    """The batch of a transformer input: a tensor's first dimension, or a list of per-sample tensors' length."""
    if isinstance(hidden, torch.Tensor) and hidden.dim():
        return hidden.shape[0]
    if isinstance(hidden, (list, tuple)) and hidden and all(isinstance(h, torch.Tensor) for h in hidden):
        return len(hidden)
    return None


def cycled_output(output: Any, batch: int | None) -> Any:
    """A transformer output with its prediction (a tensor, or a list of per-sample tensors) cycled to ``batch``."""
    if isinstance(output, torch.Tensor):
        return _cycled_to_batch(output, batch)
    if isinstance(output, tuple):
        return (_cycled_to_batch(output[0], batch), *output[1:])
    if isinstance(output, BaseOutput):
        first = next(iter(output))
        return type(output)(**{**output, first: _cycled_to_batch(output[first], batch)})
    raise TypeError(
        f"MeanCache cannot answer a skipped call of a transformer returning {type(output).__name__}; it "
        "supports tensors, tuples and diffusers output classes"
    )


def _cycled_to_batch(output: Any, batch: int | None) -> Any:
    """``output`` (a tensor, or a list of per-sample tensors) with its samples cycled to ``batch`` (unchanged if
    ``batch`` is None or already its batch)."""
    have = batch_of(output)
    if batch is None or have is None or have == batch:
        return output
    order = [i % have for i in range(batch)]
    return output[order] if isinstance(output, torch.Tensor) else [output[i] for i in order]


def copy_tensors(output: Any) -> Any:
    """``output`` with every tensor in it replaced by a detached copy (any nesting of containers, as
    ``torch.utils._pytree.tree_map_only``). A tensor and a tuple of tensors, what transformers return with
    ``return_dict=False``, skip the tree walk: it costs several times the copy of a small latent, on every step."""
    if type(output) is torch.Tensor:
        return output.detach().clone()
    if type(output) is tuple and all(type(t) is torch.Tensor for t in output):
        return tuple(t.detach().clone() for t in output)
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), output)
