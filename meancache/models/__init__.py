"""Models bundled with meancache: diffusers ``save_pretrained`` folders inside the package.

* ``digits-flux``: a small class-conditional FLUX (real ``FluxPipeline``, guidance embedding);
* ``digits-qwen``: a small class-conditional Qwen-Image (real ``QwenImagePipeline``, true CFG).

Both were trained on scikit-learn's digits; :mod:`meancache.models.recipes` describes them and
:mod:`meancache.models.train` reproduces them.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from meancache.models.recipes import EMBEDDING_ROWS, RECIPES, DigitsRecipe

BUNDLED_MODELS = {name: Path(__file__).parent / name for name in RECIPES}
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
        """Pipeline arguments generating ``classes`` (one 32x32 image each, in order; 10 is "no class")."""
        bad = [c for c in classes if not 0 <= c < EMBEDDING_ROWS]
        if bad:
            raise ValueError(f"classes {bad} are out of range: digits 0..9, or 10 for unconditional")
        return self.recipe.inputs(self.embeddings, torch.tensor(classes))


def load_digits_model(model: str | os.PathLike[str] = "digits-flux", dtype: torch.dtype = torch.float32) -> DigitsModel:
    """``from_pretrained`` on a digits model folder: a bundled model's name (``digits-flux``,
    ``digits-qwen``) or the path of a folder one was saved to."""
    folder = BUNDLED_MODELS[model] if isinstance(model, str) and model in BUNDLED_MODELS else Path(model)
    missing = [part for part in _REQUIRED if not (folder / part).exists()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not a digits model folder: it lacks {missing} (bundled: {sorted(BUNDLED_MODELS)})"
        )
    try:
        pipeline_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{str(folder)!r} holds a corrupt digits model: model_index.json: {e!r}") from e
    recipes = {r.pipeline_class.__name__: r for r in RECIPES.values()}
    if pipeline_class not in recipes:
        raise ValueError(f"{str(folder)!r} holds a {pipeline_class}; digits models are {sorted(recipes)}")
    recipe = recipes[pipeline_class]
    # Conditioning comes from the class embeddings, so the pipeline has no text encoders or tokenizers.
    components = inspect.signature(recipe.pipeline_class.__init__).parameters
    no_text = {k: None for k in components if k.startswith(("text_encoder", "tokenizer"))}
    try:
        pipe = recipe.pipeline_class.from_pretrained(folder, dtype=dtype, **no_text)
        embeddings = load_file(folder / "class_embeddings.safetensors")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{str(folder)!r} holds a corrupt digits model: {e}") from e
    if set(embeddings) != set(recipe.embedding_shapes):
        raise ValueError(
            f"{str(folder)!r}: class_embeddings.safetensors holds {sorted(embeddings)}, "
            f"{recipe.name} needs {sorted(recipe.embedding_shapes)}"
        )
    return DigitsModel(pipe, {k: v.to(dtype) for k, v in embeddings.items()}, recipe)
