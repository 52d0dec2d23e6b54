"""MeanCache with a compiled transformer: every entry point diffusers documents, with fullgraph, and no
recompile across the steps of a generation, across generations, or across step counts."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.integrations.diffusers import calibrate_pipeline, select_schedule
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SCHEDULE = Schedule(20, (0, 1, 2, 5, 9, 14, 19), (1, 1, 2, 3, 4, 5))


def _compile_whole(pipe, backend):
    pipe.transformer.compile(fullgraph=True, backend=backend)


def _wrap_whole(pipe, backend):
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=backend)


def _compile_blocks(pipe, backend):
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


def _compile_static(pipe, backend):
    pipe.transformer.compile(fullgraph=True, dynamic=False, backend=backend)


ENTRY_POINTS = {
    "transformer.compile": _compile_whole,
    "torch.compile(transformer)": _wrap_whole,
    "compile_repeated_blocks": _compile_blocks,
    "dynamic=False": _compile_static,
}


@pytest.fixture(scope="module")
def eager_reference():
    """Eager MeanCache latents per pipeline kind and step count (the schedule mapped to other step counts)."""
    results = {}
    for kind in ("flux", "qwen-image"):
        pipe = tiny_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
        for steps in (20, 12):
            results[kind, steps] = generate_latents(pipe, tiny_inputs(kind), steps)
    return results


def _compiled_pipeline(kind, entry, order):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    counter = CompileCounterWithBackend("inductor")
    if order == "compile first":
        ENTRY_POINTS[entry](pipe, counter)
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    else:
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
        ENTRY_POINTS[entry](pipe, counter)
    return pipe, counter


CASES = [
    *(("flux", entry, "compile first") for entry in ENTRY_POINTS),
    ("flux", "transformer.compile", "MeanCache first"),
    ("flux", "torch.compile(transformer)", "MeanCache first"),
    ("qwen-image", "transformer.compile", "MeanCache first"),
    ("qwen-image", "compile_repeated_blocks", "compile first"),
]


@pytest.mark.parametrize(("kind", "entry", "order"), CASES)
def test_compiled_meancache_matches_eager_and_never_recompiles(eager_reference, kind, entry, order):
    pipe, counter = _compiled_pipeline(kind, entry, order)
    inputs = tiny_inputs(kind)
    first = generate_latents(pipe, inputs, 20)
    graphs = counter.frame_count
    assert graphs >= 1  # the transformer (or its blocks) did run compiled
    torch.testing.assert_close(first, eager_reference[kind, 20], rtol=1e-4, atol=1e-4)
    report = meancache.summary(pipe)
    calls_per_step = 2 if kind == "qwen-image" else 1
    assert (report.transformer_calls, report.skipped_calls) == (7 * calls_per_step, 13 * calls_per_step)
    assert torch.equal(generate_latents(pipe, inputs, 20), first)  # a second generation: no new graph
    other_steps = generate_latents(pipe, inputs, 12)  # another step count: same shapes, no new graph
    torch.testing.assert_close(other_steps, eager_reference[kind, 12], rtol=1e-4, atol=1e-4)
    assert counter.frame_count == graphs
    assert torch._dynamo.utils.counters["graph_break"] == {}


def test_new_resolution_compiles_once_more_and_then_never_again():
    pipe, counter = _compiled_pipeline("flux", "transformer.compile", "MeanCache first")
    generate_latents(pipe, tiny_inputs("flux"), 20)
    graphs = counter.frame_count
    generate_latents(pipe, tiny_inputs("flux", size=48), 20)
    assert counter.frame_count == graphs + 1  # as without MeanCache: the shapes changed
    generate_latents(pipe, tiny_inputs("flux", size=48), 12)
    assert counter.frame_count == graphs + 1


def test_disable_leaves_the_compiled_transformer_as_compiled():
    pipe, counter = _compiled_pipeline("flux", "transformer.compile", "compile first")
    compiled_call = pipe.transformer._compiled_call_impl.inner
    generate_latents(pipe, tiny_inputs("flux"), 20)
    disable_mean_cache(pipe)
    assert pipe.transformer._compiled_call_impl is compiled_call
    graphs = counter.frame_count
    generate_latents(pipe, tiny_inputs("flux"), 20)  # uncached, compiled, same graph
    assert counter.frame_count == graphs


def test_calibration_and_selection_on_a_compiled_pipeline():
    pipe, counter = _compiled_pipeline("flux", "transformer.compile", "compile first")
    disable_mean_cache(pipe)

    def calls():
        return [{**tiny_inputs("flux"), "generator": torch.Generator().manual_seed(s)} for s in (0, 1)]

    calibration = calibrate_pipeline(pipe, calls(), num_inference_steps=20, max_gap=6, max_span=3)
    candidates = calibration.candidate_schedules(6)
    chosen = select_schedule(pipe, calls(), candidates, num_inference_steps=20)
    assert chosen.budget == 6 and chosen.metadata["replay_candidates"] == len(candidates)
    assert counter.frame_count == 1  # the calibration's and the selection's full runs share one graph


def test_exact_jvp_refuses_a_compiled_transformer_with_a_clear_error():
    pipe, _ = _compiled_pipeline("flux", "compile_repeated_blocks", "compile first")
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE, estimator="exact-jvp"))
    with pytest.raises(RuntimeError, match=r"'exact-jvp' estimator runs the transformer in forward mode"):
        generate_latents(pipe, tiny_inputs("flux"), 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_the_computed_steps():
    """``mode="reduce-overhead"``: the gate runs no device work and makes no host sync before a computed step, so
    every computed step replays the same CUDA graph; skipped steps never enter it."""
    pipe = tiny_pipeline("flux").to("cuda")
    pipe.set_progress_bar_config(disable=True)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny_inputs("flux").items()}
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    eager = generate_latents(pipe, inputs, 20)
    counter = CompileCounterWithBackend("inductor")
    pipe.transformer.compile(fullgraph=True, mode="reduce-overhead", backend=counter)
    first = generate_latents(pipe, inputs, 20)
    graphs = counter.frame_count
    torch.testing.assert_close(first, eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(generate_latents(pipe, inputs, 20), first, rtol=0, atol=0)
    assert counter.frame_count == graphs and meancache.summary(pipe).transformer_calls == SCHEDULE.budget


def test_calibrate_on_first_use_on_a_compiled_pipeline():
    """The calibrating generation runs every step through the compiled graph; the calibrated schedule reuses it."""
    pipe, counter = _compiled_pipeline("flux", "transformer.compile", "compile first")
    disable_mean_cache(pipe)
    uncached = generate_latents(pipe, tiny_inputs("flux"), 20)
    enable_mean_cache(pipe, MeanCacheConfig(budget=6, calibration_runs=1))
    assert torch.equal(generate_latents(pipe, tiny_inputs("flux"), 20), uncached)  # calibrating: the full run
    generate_latents(pipe, tiny_inputs("flux", seed=1), 20)
    report = meancache.summary(pipe)
    assert report.transformer_calls == 6 and "calibrat" in report.schedule.metadata["source"]
    assert counter.frame_count == 1
