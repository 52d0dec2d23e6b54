"""Which of a pipeline's components MeanCache gates, and the caches it refuses to stack with on them.

A pipeline may hold several models that run on every step: ``transformer``, further experts (``transformer_2``:
Wan2.2's low-noise expert), a CFG branch's own model (``unconditional_transformer``: Ideogram4) and a
``controlnet``. They are found by name here, once, for :func:`~meancache.integrations.diffusers.pipeline.
enable_mean_cache` and for the gates (:mod:`~meancache.integrations.diffusers.gate`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

GateKind = Literal["transformer", "controlnet"]
"""What a gated module is: one of the pipeline's transformers (experts and a CFG branch's own model share a step's
calls), or its ControlNet."""


def transformer_names(pipe: Any) -> list[str]:
    """The pipeline's transformer components that are modules: ``transformer``, then further experts
    (``transformer_2``, ...: Wan2.2's low-noise expert) and further models of the same step named ``*_transformer``
    (Ideogram4's ``unconditional_transformer``, its CFG branch's own model)."""
    components = getattr(pipe, "components", {})
    names = sorted(
        n for n in components if n == "transformer" or n.startswith("transformer_") or n.endswith("_transformer")
    )
    return [n for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def gated_modules(pipe: Any) -> dict[str, GateKind]:
    """The pipeline's components MeanCache gates, and their kind: the transformers (:func:`transformer_names`),
    then ``controlnet`` (ControlNet pipelines: Flux, SD3, Qwen-Image, Z-Image, Sana) if it is a module."""
    gated: dict[str, GateKind] = dict.fromkeys(transformer_names(pipe), "transformer")
    if isinstance(getattr(pipe, "controlnet", None), torch.nn.Module):
        gated["controlnet"] = "controlnet"
    return gated


def refuse_diffusers_cache(transformer: torch.nn.Module) -> None:
    """MeanCache does not stack with diffusers' own caches: nested inside it, they would count MeanCache's computed
    steps as their steps (warm-ups, intervals and thresholds would mean something else) and skip some of them."""
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(
            "a diffusers cache (transformer.enable_cache: FirstBlockCache, TaylorSeer, MagCache, "
            "PyramidAttentionBroadcast, FasterCache) is on this transformer; it would count MeanCache's computed "
            "steps as its own steps and skip some of them. Use one of the two: pipe.transformer.disable_cache() "
            "or disable_mean_cache(pipe)"
        )
