"""Loading the pipeline a command names: a bundled digits model, a folder holding one, or any diffusers
checkpoint (folder or hub id)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from meancache.models import is_digits_model, load_digits_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PromptInputs = Callable[[str], dict[str, Any]]
"""A prompt (for a digits model: the digit) -> the pipeline's keyword arguments for it."""


def load_pipeline(model: str, dtype: str, device: str) -> tuple[DiffusionPipeline, PromptInputs]:
    """The pipeline of ``model`` (weights in ``DTYPES[dtype]``) on ``device``, and its prompt arguments: a
    digits model is conditioned on class embeddings (it has no text encoders), any other on the prompt text."""
    if is_digits_model(model):
        digits = load_digits_model(model, dtype=DTYPES[dtype])
        return digits.pipe.to(device), lambda prompt: digits.inputs([int(prompt)])
    pipe = DiffusionPipeline.from_pretrained(model, dtype=DTYPES[dtype]).to(device)
    return pipe, lambda prompt: {"prompt": prompt}
