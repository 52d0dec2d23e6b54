"""Models bundled with meancache: diffusers ``save_pretrained`` folders inside the package.

* ``digits-flux``: a small class-conditional FLUX (real ``FluxPipeline``, guidance embedding);
* ``digits-qwen``: a small class-conditional Qwen-Image (real ``QwenImagePipeline``, true CFG);
* ``digits-video``: a small class-conditional HunyuanVideo (real ``HunyuanVideoPipeline``, guidance embedding,
  causal 3D VAE): 9 frames of a digit sliding across the frame.

All were trained on scikit-learn's digits; :mod:`meancache.models.recipes` describes them and
:mod:`meancache.models.train` reproduces them.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from meancache.models.recipes import EMBEDDING_ROWS, RECIPES, DigitsRecipe
from meancache.validation import load_json_object

BUNDLED_MODELS = {name: Path(__file__).parent / name for name in RECIPES}
_RECIPE_OF_PIPELINE = {recipe.pipeline_class.__name__: recipe for recipe in RECIPES.values()}
IMAGE_MODELS = sorted(name for name, recipe in RECIPES.items() if recipe.frames == 1)
"""The bundled models that generate images (the others generate videos)."""
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


@dataclass(frozen=True)
class DigitsModel:
    """A loaded digits model: its pipeline, the learned class embeddings and the recipe it was built from."""

    pipe: DiffusionPipeline
    embeddings: dict[str, torch.Tensor]
    recipe: DigitsRecipe

    def inputs(self, classes: list[int]) -> dict[str, Any]:
        """Pipeline arguments generating ``classes`` (one 32x32 image or video each, in order; 10 is "no class")."""
        bad = [c for c in classes if not 0 <= c < EMBEDDING_ROWS]
        if bad:
            raise ValueError(f"classes {bad} are out of range: digits 0..9, or 10 for unconditional")
        return self.recipe.inputs(self.embeddings, torch.tensor(classes))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Images ``(N, 32, 32)`` (videos: ``(N, frames, 32, 32)``) in [0, 1] from the packed latents of a run with
        ``output_type="latent"``: what the same run with ``output_type="np"`` returns (one channel), so a run can be
        timed without its decode. Runs without autograd, as the pipeline's own decode does."""
        with torch.inference_mode():
            decoded = self.recipe.decode(self.pipe.vae, latents.to(self.pipe.vae.dtype))
            return self.recipe.postprocess(self.pipe, decoded)


def is_digits_model(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` names a bundled digits model or a folder holding one (its class embeddings file)."""
    return str(model) in BUNDLED_MODELS or (Path(model) / "class_embeddings.safetensors").is_file()


def digits_model_frames(model: str | os.PathLike[str]) -> int:
    """Frames per sample that ``model`` generates if it names a bundled digits model or a folder holding one: 1
    for an image model, more for a video model; 1 for anything else (not a digits model, or unreadable)."""
    if str(model) in BUNDLED_MODELS:
        return RECIPES[str(model)].frames
    if not is_digits_model(model):
        return 1
    try:
        pipeline_class = load_json_object(Path(model) / "model_index.json", "config").get("_class_name")
    except (OSError, ValueError):
        return 1  # load_digits_model names the problem
    return _RECIPE_OF_PIPELINE[pipeline_class].frames if pipeline_class in _RECIPE_OF_PIPELINE else 1


def load_digits_model(model: str | os.PathLike[str] = "digits-flux", dtype: torch.dtype = torch.float32) -> DigitsModel:
    """``from_pretrained`` on a digits model folder: a bundled model's name (``digits-flux``,
    ``digits-qwen``, ``digits-video``) or the path of a folder one was saved to.

    Checks that ``model`` is a name or a path, ``dtype`` a floating ``torch.dtype``, the folder holds every
    part of a digits model with JSON-object configs, of a known pipeline class, and embeddings of its shape;
    a folder that fails to load raises a ``ValueError`` naming it."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a bundled model name ({', '.join(BUNDLED_MODELS)}) or a folder path, got {model!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.bfloat16), got {dtype!r}")
    folder = BUNDLED_MODELS[model] if isinstance(model, str) and model in BUNDLED_MODELS else Path(model)
    missing = [part for part in _REQUIRED if not (folder / part).exists()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not a digits model folder: it lacks {missing} (bundled: {sorted(BUNDLED_MODELS)})"
        )
    try:
        configs = {part: load_json_object(folder / part, "config") for part in _REQUIRED if part.endswith(".json")}
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(folder)!r} holds a corrupt digits model: {e}") from e
    pipeline_class = configs["model_index.json"].get("_class_name")
    if pipeline_class not in _RECIPE_OF_PIPELINE:
        raise ValueError(f"{str(folder)!r} holds a {pipeline_class}; digits models are {sorted(_RECIPE_OF_PIPELINE)}")
    recipe = _RECIPE_OF_PIPELINE[pipeline_class]
    # Conditioning comes from the class embeddings, so the pipeline has no text encoders or tokenizers.
    components = inspect.signature(recipe.pipeline_class.__init__).parameters
    no_text = {k: None for k in components if k.startswith(("text_encoder", "tokenizer"))}
    try:
        pipe = recipe.pipeline_class.from_pretrained(folder, dtype=dtype, **no_text)
        embeddings = load_file(folder / "class_embeddings.safetensors")
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{str(folder)!r} holds a corrupt digits model: {e}") from e
    if set(embeddings) != set(recipe.embedding_shapes):
        raise ValueError(
            f"{str(folder)!r}: class_embeddings.safetensors holds {sorted(embeddings)}, "
            f"{recipe.name} needs {sorted(recipe.embedding_shapes)}"
        )
    return DigitsModel(pipe, {k: v.to(dtype) for k, v in embeddings.items()}, recipe)
