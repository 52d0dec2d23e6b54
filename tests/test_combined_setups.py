"""The settings users stack, all at once: a compiled transformer, offloading, and a schedule MeanCache
calibrates on first use, on CFG pipelines (Qwen-Image, batched; the bundled HunyuanVideo model, its two branches
in separate calls), in different enable orders.

Each case checks that the calibrating generation is the uncached run, that the calibrated one runs B forwards
per CFG branch and matches eager MeanCache with the same schedule, that a repeat is bit-identical (no state
leaks between generations), and that nothing recompiles after the calibrating generation. ``fullgraph=True``
is left out where offloading is on: diffusers' and accelerate's offload hooks cannot be traced whole
(``torch.compiler.disable``), with or without MeanCache."""

import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import meancache
from meancache import MeanCacheConfig, enable_mean_cache
from meancache.models import bundled_model_path, load_digits_model
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline
from tests.test_pipeline_matrix import BUDGET as MATRIX_BUDGET
from tests.test_pipeline_matrix import CASE, denoisers
from tests.test_pipeline_matrix import STEPS as MATRIX_STEPS

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEPS, BUDGET, CFG_BRANCHES = 20, 6, 2
CPU = torch.device("cpu")
OFFLOAD = {
    "model CPU offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "group offload, block level": lambda pipe: pipe.transformer.enable_group_offload(
        CPU, CPU, offload_type="block_level", num_blocks_per_group=1
    ),
}
COMPILE = {
    "transformer.compile": lambda pipe, backend: pipe.transformer.compile(backend=backend),
    "compile_repeated_blocks(fullgraph=True)": lambda pipe, backend: pipe.transformer.compile_repeated_blocks(
        fullgraph=True, backend=backend
    ),
}
CASES = [  # (compile, offload, enable order): "C" compile, "O" offload, "M" MeanCache
    ("transformer.compile", "model CPU offload", "MCO"),
    ("transformer.compile", "group offload, block level", "COM"),
    ("compile_repeated_blocks(fullgraph=True)", "model CPU offload", "OMC"),
]


@pytest.fixture(scope="module")
def uncached():
    pipe = tiny_pipeline("qwen-image")
    pipe.set_progress_bar_config(disable=True)
    return generate_latents(pipe, tiny_inputs("qwen-image"), STEPS)


def _qwen_image() -> Any:
    pipe = tiny_pipeline("qwen-image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("compile_entry", "offload", "order"), CASES)
def test_compiled_offloaded_and_calibrated_on_first_use(uncached, compile_entry, offload, order):
    _check_combined(_qwen_image, lambda seed: tiny_inputs("qwen-image", seed=seed), uncached, compile_entry, offload,
                    order)  # fmt: skip


def test_the_video_model_compiled_offloaded_and_calibrated_on_first_use(tmp_path):
    """The bundled HunyuanVideo model (true CFG in two calls a step, 3-D latents) with its shipped schedules
    removed, so that ``budget=B`` calibrates."""
    folder = tmp_path / "digits video"
    shutil.copytree(bundled_model_path("digits-video"), folder, ignore=shutil.ignore_patterns("meancache_*"))

    def load() -> Any:
        model = load_digits_model(folder)
        model.pipe.set_progress_bar_config(disable=True)
        return model.pipe

    model = load_digits_model(folder)
    inputs = [model.inputs([3, 8]), model.inputs([1, 7])]  # the calibrating generation's, then the calibrated one's
    uncached = generate_latents(load(), inputs[0], STEPS)
    _check_combined(load, inputs.__getitem__, uncached, "transformer.compile",
                    "group offload, block level", "MOC", rounding=1e-4)  # fmt: skip


def _check_combined(
    load: Callable[[], Any], inputs: Callable[[int], dict[str, Any]], uncached: torch.Tensor, compile_entry: str,
    offload: str, order: str, rounding: float = 1e-5,
) -> None:  # fmt: skip
    """``rounding``: how far compiled and eager may differ over the run (a trained model whose CFG scale of 3
    amplifies rounding: up to 2e-5 measured)."""
    pipe = load()
    counter = CompileCounterWithBackend("inductor")
    enable = {
        "C": lambda: COMPILE[compile_entry](pipe, counter),
        "O": lambda: OFFLOAD[offload](pipe),
        "M": lambda: enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1)),
    }
    for step in order:
        enable[step]()

    calibrating = generate_latents(pipe, inputs(0), STEPS)
    torch.testing.assert_close(calibrating, uncached, rtol=rounding, atol=rounding)  # compiled vs eager rounding
    assert meancache.summary(pipe).transformer_calls == STEPS * CFG_BRANCHES
    graphs = counter.frame_count

    cached = generate_latents(pipe, inputs(1), STEPS)
    report = meancache.summary(pipe)
    assert report.transformer_calls == BUDGET * CFG_BRANCHES
    assert report.schedule.metadata["source"].startswith("calibrated on first use")
    assert torch.equal(generate_latents(pipe, inputs(1), STEPS), cached)
    assert counter.frame_count == graphs

    eager = load()
    enable_mean_cache(eager, MeanCacheConfig(report.schedule))
    torch.testing.assert_close(cached, generate_latents(eager, inputs(1), STEPS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["flux-kontext", "z-image", "wan2.2"])
def test_other_layouts_compiled_offloaded_and_calibrated_on_first_use(name: str):
    """The same stack on pipelines whose layouts differ from Qwen-Image's (``tests/matrix/``): reference
    tokens appended to the latent tokens (Flux Kontext), per-sample lists in and out (Z-Image, CFG doubling the
    list), two experts sharing the trajectory (Wan2.2): every denoising model compiled and group-offloaded before
    MeanCache is enabled."""
    case = CASE[name]

    def generate(pipe: Any) -> torch.Tensor:
        call = {**inputs, "num_inference_steps": MATRIX_STEPS, "generator": torch.Generator().manual_seed(0),
                "output_type": "latent"}  # fmt: skip
        return case.call(pipe, call)[0]

    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    uncached = generate(pipe)
    counter = CompileCounterWithBackend("inductor")
    for model in denoisers(pipe).values():
        model.compile(backend=counter)
        model.enable_group_offload(CPU, CPU, offload_type="block_level", num_blocks_per_group=1)
    enable_mean_cache(pipe, MeanCacheConfig(budget=MATRIX_BUDGET, calibration_runs=1))
    torch.testing.assert_close(generate(pipe), uncached, rtol=1e-5, atol=1e-5)  # compiled vs eager rounding
    graphs = counter.frame_count
    cached = generate(pipe)
    report = meancache.summary(pipe)
    assert report.computed_steps == MATRIX_BUDGET
    assert report.schedule.metadata["source"].startswith("calibrated on first use")
    assert torch.equal(generate(pipe), cached)
    assert counter.frame_count == graphs
