"""Validated selection: the candidate schedule whose runs land closest to the full runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.pipeline import disable_mean_cache, enable_mean_cache
from meancache.schedule import Schedule


def select_schedule(
    pipe: DiffusionPipeline, calls: Sequence[dict[str, Any]], candidates: Sequence[Schedule], num_inference_steps: int
) -> Schedule:
    """The candidate whose MeanCache runs of ``calls`` land closest to the full runs' final latents.

    Each call (pipeline keyword arguments, seeds via ``generator``) runs once in full and once per candidate,
    from the same noise (generators are rewound). The error of a candidate is the mean over calls of
    ``||z_hat - z|| / ||z||`` on the final latents; it is stored in the returned schedule's metadata
    (``validation_error``, with ``validation_candidates``). Use calls disjoint from those you evaluate on.
    """
    if not calls:
        raise ValueError("calls is empty: nothing to validate the candidates on")
    if not candidates:
        raise ValueError("candidates is empty: nothing to select from")
    wrong = sorted({c.num_steps for c in candidates} - {num_inference_steps})
    if wrong:
        raise ValueError(f"candidates for {wrong} steps cannot run with num_inference_steps={num_inference_steps}")
    seeded = []  # per call: its generators and their states, to rewind before each run
    for index, kwargs in enumerate(calls):
        generator = kwargs.get("generator")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(
                f"calls[{index}] has generator={generator!r}: each call needs a torch.Generator (or a list of "
                "them) so that every candidate starts from the same noise"
            )
        seeded.append([(g, g.get_state()) for g in generators])

    def final_latents() -> list[torch.Tensor]:
        latents = []
        for kwargs, states in zip(calls, seeded, strict=True):
            for generator, state in states:
                generator.set_state(state)
            # the pipeline's own no_grad, not inference_mode: a compiled transformer keeps the graph of plain calls
            out = pipe(**{**kwargs, "output_type": "latent", "num_inference_steps": num_inference_steps,
                          "return_dict": False})  # fmt: skip
            latents.append(out[0].float())
        return latents

    references = final_latents()
    errors = []
    for candidate in candidates:
        enable_mean_cache(pipe, MeanCacheConfig(candidate))
        try:
            latents = final_latents()
        finally:
            disable_mean_cache(pipe)
        errors.append(sum(float((z - r).norm() / r.norm()) for z, r in zip(latents, references, strict=True)))
    best = min(range(len(candidates)), key=errors.__getitem__)
    chosen = candidates[best]
    metadata = {**chosen.metadata, "validation_error": errors[best] / len(calls),
                "validation_candidates": len(candidates)}  # fmt: skip
    return Schedule(chosen.num_steps, chosen.compute_steps, chosen.spans, metadata)
