import json
import shutil

import numpy as np
import pytest
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.models import BUNDLED_MODELS, IMAGE_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import (
    CLASSES,
    DIGIT_SIZE,
    FRAMES,
    IMAGE_SIZE,
    classify,
    classify_frames,
    digit_classifier,
    displacement,
    frame_classifier,
    moving_digits_dataset,
    recognised,
)
from meancache.testing import generate_latents

MODELS = sorted(BUNDLED_MODELS)


@pytest.fixture(scope="module", params=IMAGE_MODELS)
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
    with pytest.raises(ValueError, match="unknown bundled model 'sd'"):
        bundled_model_path("sd")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("part", ["class_embeddings.safetensors", "vae/diffusion_pytorch_model.safetensors"])
def test_a_corrupt_weights_file_is_named(tmp_path, name, part):
    folder = tmp_path / "broken"
    shutil.copytree(bundled_model_path(name), folder)
    (folder / part).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="holds a corrupt digits model"):
        load_digits_model(folder)


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
    with pytest.raises(TypeError, match=r"model must be a bundled model name \(digits-flux, .*\) .*got None"):
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


@pytest.fixture(scope="module")
def video():
    model = load_digits_model("digits-video")
    model.pipe.set_progress_bar_config(disable=True)
    return model


def test_the_video_model_is_a_hunyuan_video_pipeline(video):
    pipe = video.pipe
    assert type(pipe).__name__ == "HunyuanVideoPipeline" and pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert (
        type(pipe.transformer).__name__ == "HunyuanVideoTransformer3DModel" and pipe.transformer.config.guidance_embeds
    )
    assert type(pipe.vae).__name__ == "AutoencoderKLHunyuanVideo" and pipe.vae.temporal_compression_ratio == 4
    assert pipe.transformer.dtype == torch.float32 and all(e.shape[0] == 11 for e in video.embeddings.values())
    size_mb = sum(p.stat().st_size for p in bundled_model_path("digits-video").rglob("*") if p.is_file()) / 2**20
    assert size_mb < 8


def test_moving_digits_slide_edge_to_edge():
    videos, labels = moving_digits_dataset()
    assert videos.shape == (4 * 1797, 1, FRAMES, IMAGE_SIZE, IMAGE_SIZE) and labels.shape == (4 * 1797,)
    frames = videos[:8, 0] / 2 + 0.5
    assert torch.allclose(displacement(frames), torch.full((8,), float(IMAGE_SIZE - DIGIT_SIZE)))
    agree = (classify_frames(frame_classifier(), frames) == labels[:8, None]).float().mean()
    assert agree >= 0.9


def _video(model, classes, steps, seed=0):
    with torch.inference_mode():
        return model.pipe(**model.inputs(classes), num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), output_type="np").frames  # fmt: skip


def test_the_video_pipeline_generates_frames_that_decode_from_its_latents(video):
    frames = _video(video, [2, 7], steps=4)
    assert frames.shape == (2, FRAMES, IMAGE_SIZE, IMAGE_SIZE, 1) and 0 <= frames.min() <= frames.max() <= 1
    with torch.inference_mode():
        latents = generate_latents(video.pipe, video.inputs([2, 7]), 4)
        assert latents.shape == (2, 4, 3, 16, 16)  # 9 frames -> 3 latent frames; 32x32 -> 16x16
        assert np.allclose(video.decode(latents), frames[..., 0], atol=1e-6)


@pytest.fixture(scope="module")
def video_samples(video):
    return torch.from_numpy(_video(video, CLASSES, steps=20)[..., 0])


def test_video_samples_move(video_samples):
    """The digit travels across the frame (training videos: 16 pixels)."""
    assert displacement(video_samples).mean() >= 6  # measured (50 steps, seeds 0-2): 12.8 px


def test_video_samples_show_the_digit(video_samples):
    """The frame classifier recognises the requested digit in most frames (chance: 10 %)."""
    assert recognised(video_samples, CLASSES).float().mean() >= 0.7  # measured here (20 steps, seed 0): 0.78


def test_meancache_on_the_video_model(video):
    """Every step computed: bit-identical to the uncached pipeline; budget B: B steps of two transformer calls
    (the recipe samples with true CFG)."""
    calls = []
    handle = video.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    inputs = video.inputs([0, 5])
    try:
        with torch.inference_mode():
            baseline = generate_latents(video.pipe, inputs, 20)
            for schedule in (Schedule.uniform(20, 20), Schedule.uniform(20, 6, span=2)):
                enable_mean_cache(video.pipe, MeanCacheConfig(schedule))
                calls.clear()
                cached = generate_latents(video.pipe, inputs, 20)
                disable_mean_cache(video.pipe)
                assert len(calls) == 2 * schedule.budget
                if schedule.budget == 20:
                    assert torch.equal(cached, baseline)
    finally:
        handle.remove()
