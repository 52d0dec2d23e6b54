"""What the bundled models learned, measured the way ``python -m meancache.models.train --evaluate-only`` does
(:func:`meancache.models.train.evaluate_bundle`: digits 0-9 x seeds 0-2, 50 steps, every step computed, the
recipe's own pipeline arguments): how often the classifier reads the requested digit (a video: in each frame)
and, for the video model, how far the digit moves. Results: ``benchmarks/results/evaluation_<model>.json``.

The video model's true-CFG scale (the recipe samples at 3) is swept too, 1 (no CFG) to 4:
``evaluation_digits-video_cfg.json``."""

from __future__ import annotations

import pytest

from benchmarks.helpers import write_results
from meancache.models import BUNDLED_MODELS, bundled_model_path, load_digits_model
from meancache.models.recipes import RECIPES
from meancache.models.train import EVALUATION_SEEDS, evaluate_bundle


@pytest.mark.parametrize("model_name", sorted(BUNDLED_MODELS))
def test_bundled_model(benchmark, model_name):
    recipe = load_digits_model(model_name).recipe
    result = benchmark.pedantic(lambda: evaluate_bundle(bundled_model_path(model_name)), rounds=1, iterations=1)
    write_results(f"evaluation_{model_name}", {
        "model": model_name, "seeds": list(EVALUATION_SEEDS), "steps": 50,
        "training": {"vae_steps": recipe.vae_steps, "transformer_steps": recipe.transformer_steps},
        "metrics": "agreement: share of images (video: frames) whose digit the classifier reads as the requested "
                   "one (chance 0.10); motion_px: centre-of-mass travel from the first to the last frame (training "
                   "videos: 16 px); moving: share of videos whose digit travels at least 8 px",
        "result": result,
    })  # fmt: skip


def test_video_model_guidance_scale(benchmark, monkeypatch):
    recipe = RECIPES["digits-video"]

    def sweep() -> dict[str, dict[str, float]]:
        results = {}
        for scale in (1.0, 2.0, 3.0, 4.0):
            monkeypatch.setattr(recipe, "true_cfg_scale", scale)
            results[f"{scale:g}"] = evaluate_bundle(bundled_model_path("digits-video"))
        return results

    results = benchmark.pedantic(sweep, rounds=1, iterations=1)
    write_results("evaluation_digits-video_cfg", {
        "model": "digits-video", "seeds": list(EVALUATION_SEEDS), "steps": 50, "shipped_true_cfg_scale": 3.0,
        "metrics": "as evaluation_digits-video.json, per true_cfg_scale (1: no CFG, one transformer call a step)",
        "result_by_true_cfg_scale": results,
    })  # fmt: skip
