import json
import shutil

import pytest
import torch

from meancache import MeanCacheConfig, disable_mean_cache, enable_mean_cache, summary
from meancache.models import BUNDLED_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES, classify, digit_classifier

MODELS = sorted(BUNDLED_MODELS)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    model = load_digits_model(request.param)
    model.pipe.set_progress_bar_config(disable=True)
    return model


@pytest.fixture(scope="module")
def classifier():
    return digit_classifier()


def _generate(model, classes, seed=0, steps=50):
    with torch.inference_mode():
        return model.pipe(**model.inputs(classes), num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), output_type="pt").images  # fmt: skip


def test_enabling_mean_cache_on_the_loaded_model_points_to_its_pipeline(model):
    with pytest.raises(TypeError, match=r"cannot drive DigitsModel: .*pass its pipeline, `\.pipe`"):
        enable_mean_cache(model, MeanCacheConfig(budget=10))


def test_bundled_models_load_with_from_pretrained(model):
    pipe, config = model.pipe, model.pipe.transformer.config
    assert type(pipe).__name__ == {"digits-flux": "FluxPipeline", "digits-qwen": "QwenImagePipeline"}[model.recipe.name]
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder is None
    assert config.guidance_embeds == (model.recipe.name == "digits-flux")  # FLUX.1-dev style vs true CFG
    assert all(e.shape[0] == 11 for e in model.embeddings.values())
    size_mb = sum(p.stat().st_size for p in bundled_model_path(model.recipe.name).rglob("*") if p.is_file()) / 2**20
    assert size_mb < 8


def test_flux_embeds_guidance_and_qwen_runs_true_cfg(model):
    """Flux: one transformer call per step; Qwen-Image: two (the class, then the "no class" negative prompt)."""
    calls = []
    handle = model.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        _generate(model, [3], steps=4)
    finally:
        handle.remove()
    assert len(calls) == {"digits-flux": 4, "digits-qwen": 8}[model.recipe.name]


def test_samples_are_recognisable_digits(model, classifier):
    """A classifier fitted on the same data recognises the requested class in most samples."""
    correct = sum(
        int((classify(classifier, _generate(model, CLASSES, seed=seed)) == torch.tensor(CLASSES)).sum())
        for seed in range(3)
    )
    assert correct / (3 * len(CLASSES)) >= 0.7  # measured (seeds 0-2): digits-flux 0.83, digits-qwen 0.97


def test_meancache_on_the_bundled_models_keeps_the_digits(model, classifier):
    full = _generate(model, CLASSES)
    enable_mean_cache(model.pipe, MeanCacheConfig(budget=10))
    try:
        cached = _generate(model, CLASSES)
        assert summary(model.pipe).schedule.budget == 10
    finally:
        disable_mean_cache(model.pipe)
    agree = (classify(classifier, cached) == classify(classifier, full)).float().mean()
    assert agree >= 0.8


@pytest.mark.parametrize("name", MODELS)
def test_loads_from_a_path_with_spaces_and_in_half_precision(tmp_path, name):
    folder = tmp_path / "my models" / name.replace("-", " ")
    shutil.copytree(bundled_model_path(name), folder)
    model = load_digits_model(folder, dtype=torch.bfloat16)
    assert model.recipe.name == name and model.pipe.transformer.dtype == torch.bfloat16
    assert all(e.dtype == torch.bfloat16 for e in model.embeddings.values())


def test_missing_or_corrupt_model_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a digits model folder: it lacks"):
        load_digits_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not a digits model folder"):
        load_digits_model("digits-sd3")  # neither bundled nor a folder
    folder = tmp_path / "broken"
    shutil.copytree(bundled_model_path(), folder)
    (folder / "class_embeddings.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="holds a corrupt digits model"):
        load_digits_model(folder)
    with pytest.raises(ValueError, match="unknown bundled model 'sd'"):
        bundled_model_path("sd")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", r"transformer/config.json' is not a config JSON file"),
        ("[]", r"transformer/config.json' holds a list, not a config object"),
        ('{"_class_name": "FluxTransformer2DModel", "num_layers": "x"}', "holds a corrupt digits model: .*integer"),
    ],
)
def test_a_bad_transformer_config_is_named(tmp_path, config, message):
    """Item 20 of issue #15."""
    folder = tmp_path / "broken"
    shutil.copytree(bundled_model_path(), folder)
    (folder / "transformer" / "config.json").write_text(config)
    with pytest.raises(ValueError, match=message):
        load_digits_model(folder)


def test_bad_model_and_dtype_arguments_are_named():
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype .*got 'float32'"):
        load_digits_model(dtype="float32")
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype .*got torch.int64"):
        load_digits_model(dtype=torch.int64)
    with pytest.raises(TypeError, match=r"model must be a bundled model name \(digits-flux, digits-qwen\) .*got None"):
        load_digits_model(None)


def test_a_folder_of_another_pipeline_is_refused(tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(bundled_model_path(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline; digits models are"):
        load_digits_model(folder)


def test_embeddings_of_the_wrong_model_are_refused(tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(bundled_model_path("digits-flux"), folder)
    shutil.copy(bundled_model_path("digits-qwen") / "class_embeddings.safetensors", folder)
    with pytest.raises(ValueError, match="digits-flux needs"):
        load_digits_model(folder)


def test_inputs_validate_the_classes(model):
    assert model.inputs([3, 10])["prompt_embeds"].shape[0] == 2
    with pytest.raises(ValueError, match=r"classes \[11\] are out of range"):
        model.inputs([1, 11])
