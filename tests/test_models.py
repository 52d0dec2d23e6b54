import shutil

import pytest
import torch

from meancache import MeanCacheConfig, Schedule, enable_mean_cache, summary
from meancache.models import bundled_model_path, class_inputs, load_digits_pipeline
from meancache.models.digits import classify, digit_classifier


@pytest.fixture(scope="module")
def digits():
    pipe, embeddings = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, embeddings


def _generate(pipe, embeddings, classes, seed=0, steps=50):
    with torch.inference_mode():
        images = pipe(**class_inputs(embeddings, classes), num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images  # fmt: skip
    return images


def test_bundled_model_loads_with_from_pretrained(digits):
    pipe, embeddings = digits
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder is None
    assert embeddings["prompt_embeds"].shape[0] == 11 and embeddings["pooled_prompt_embeds"].shape[0] == 11
    size_mb = sum(p.stat().st_size for p in bundled_model_path().rglob("*") if p.is_file()) / 2**20
    assert size_mb < 8


def test_samples_are_recognisable_digits(digits):
    """A classifier fitted on the same data recognises the requested class in most samples."""
    pipe, embeddings = digits
    classifier = digit_classifier()
    classes = list(range(10)) * 3
    correct = 0
    for seed in range(3):
        images = _generate(pipe, embeddings, list(range(10)), seed=seed)
        correct += int((classify(classifier, images) == torch.arange(10)).sum())
    assert correct / len(classes) >= 0.7  # measured: 0.83 over these seeds (0.825 over 4)


def test_meancache_on_the_bundled_model_keeps_the_digits(digits):
    pipe, embeddings = digits
    classifier = digit_classifier()
    full = _generate(pipe, embeddings, list(range(10)))
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    try:
        cached = _generate(pipe, embeddings, list(range(10)))
        assert summary(pipe).transformer_calls == 10
    finally:
        from meancache import disable_mean_cache

        disable_mean_cache(pipe)
    agree = (classify(classifier, cached) == classify(classifier, full)).float().mean()
    assert agree >= 0.8


def test_loads_from_a_path_with_spaces_and_in_half_precision(tmp_path):
    folder = tmp_path / "my models" / "digits flux"
    shutil.copytree(bundled_model_path(), folder)
    pipe, embeddings = load_digits_pipeline(folder, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and embeddings["prompt_embeds"].dtype == torch.bfloat16


def test_missing_or_corrupt_model_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a digits-flux model folder: it lacks"):
        load_digits_pipeline(tmp_path / "nowhere")
    folder = tmp_path / "broken"
    shutil.copytree(bundled_model_path(), folder)
    (folder / "class_embeddings.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="holds a corrupt digits-flux model"):
        load_digits_pipeline(folder)
    with pytest.raises(ValueError, match="unknown bundled model 'sd'"):
        bundled_model_path("sd")


def test_class_inputs_validate_the_classes(digits):
    _, embeddings = digits
    assert class_inputs(embeddings, [3, 10])["prompt_embeds"].shape[0] == 2
    with pytest.raises(ValueError, match=r"classes \[11\] are out of range"):
        class_inputs(embeddings, [1, 11])
