"""Models bundled with meancache: diffusers ``save_pretrained`` folders inside the package.

``digits-flux``: a small class-conditional FLUX (real ``FluxPipeline``) trained on scikit-learn's digits;
see :mod:`meancache.models.digits` for how it was trained and how to reproduce it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import FluxPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from meancache.models.digits import IMAGE_SIZE

BUNDLED_MODELS = {"digits-flux": Path(__file__).parent / "digits-flux"}
_REQUIRED = (
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "scheduler",
    "class_embeddings.safetensors",
)


def bundled_model_path(name: str = "digits-flux") -> Path:
    """The folder of bundled model ``name``."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def load_digits_pipeline(
    path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[FluxPipeline, dict[str, torch.Tensor]]:
    """``FluxPipeline.from_pretrained`` on a digits-flux folder (the bundled one by default), and its class
    embeddings ``{"prompt_embeds": (11, T, D), "pooled_prompt_embeds": (11, D)}`` (index 10: no class)."""
    folder = Path(path) if path is not None else bundled_model_path("digits-flux")
    missing = [part for part in _REQUIRED if not (folder / part).exists()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a digits-flux model folder: it lacks {missing}")
    try:
        # Conditioning comes from the class embeddings, so the pipeline has no text encoders or tokenizers.
        no_text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, **no_text)
        embeddings = load_file(folder / "class_embeddings.safetensors")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{str(folder)!r} holds a corrupt digits-flux model: {e}") from e
    if set(embeddings) != {"prompt_embeds", "pooled_prompt_embeds"}:
        raise ValueError(f"{str(folder)!r}: class_embeddings.safetensors holds {sorted(embeddings)}")
    return pipe, {k: v.to(dtype) for k, v in embeddings.items()}


def class_inputs(embeddings: dict[str, torch.Tensor], classes: list[int]) -> dict[str, torch.Tensor | int]:
    """FluxPipeline inputs generating ``classes`` (one 32x32 image each, in order)."""
    bad = [c for c in classes if not 0 <= c < embeddings["prompt_embeds"].shape[0]]
    if bad:
        raise ValueError(f"classes {bad} are out of range: digits 0..9, or 10 for unconditional")
    index = torch.tensor(classes)
    return {
        "prompt_embeds": embeddings["prompt_embeds"][index],
        "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"][index],
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
    }
