import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.integrations.diffusers import is_mean_cache_enabled
from meancache.method.estimators import ESTIMATORS
from meancache.testing import PIPELINE_KINDS, generate_latents, tiny_inputs, tiny_pipeline
from tests.reference_loop import reference_steps

SPANS_1_TO_5 = Schedule(30, (0, 1, 2, 5, 9, 14, 20, 23, 29), (1, 1, 2, 3, 4, 5, 1, 5))
CALLS_PER_STEP = {"flux": 1, "qwen-image": 2, "hunyuan-video": 1, "sd3": 1}  # SD3 batches its CFG branches


@pytest.fixture(scope="module")
def pipes():
    built = {kind: tiny_pipeline(kind) for kind in PIPELINE_KINDS}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


@pytest.fixture
def pipe_factory(pipes):
    """Hands out the shared pipelines and makes sure none leaves a test with MeanCache enabled."""
    used = []

    def get(kind):
        used.append(pipes[kind])
        return pipes[kind]

    yield get
    for pipe in used:
        if is_mean_cache_enabled(pipe):
            disable_mean_cache(pipe)


def _count_block_calls(transformer):
    calls = [0]
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    handles = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    return calls, len(blocks), handles


def _reference_run(pipe, inputs, schedule, steps, **kwargs):
    """The uncached pipeline with a test-local scheduler wrapper applying the reference equations."""
    with reference_steps(pipe.scheduler, schedule.compute_steps, schedule.spans):
        return generate_latents(pipe, inputs, steps, **kwargs)


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_full_budget_is_bit_identical_to_the_uncached_pipeline(pipe_factory, kind):
    pipe, inputs = pipe_factory(kind), tiny_inputs(kind)
    baseline = generate_latents(pipe, inputs, 12)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.uniform(12, 12)))
    cached = generate_latents(pipe, inputs, 12)
    disable_mean_cache(pipe)
    assert torch.equal(cached, baseline)
    assert torch.equal(generate_latents(pipe, inputs, 12), baseline)


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
@pytest.mark.parametrize("budget", [10, 17])
def test_transformer_blocks_run_exactly_budget_times_per_branch(pipe_factory, kind, budget):
    pipe, inputs = pipe_factory(kind), tiny_inputs(kind)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", budget)))
    calls, num_blocks, handles = _count_block_calls(pipe.transformer)
    try:
        generate_latents(pipe, inputs, 50)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == budget * CALLS_PER_STEP[kind] * num_blocks
    report = meancache.summary(pipe)
    assert (report.computed_steps, report.reused_steps) == (budget, 50 - budget)
    assert report.transformer_calls == budget * CALLS_PER_STEP[kind]
    assert report.skipped_calls == (50 - budget) * CALLS_PER_STEP[kind]


@pytest.mark.parametrize(
    ("kind", "schedule"),
    [("flux", SPANS_1_TO_5), ("hunyuan-video", SPANS_1_TO_5), ("qwen-image", Schedule.preset("qwen-image", 10)),
     ("qwen-image", SPANS_1_TO_5), ("sd3", SPANS_1_TO_5)],
)  # fmt: skip
def test_pipeline_matches_independent_reference_loop(pipe_factory, kind, schedule):
    pipe, inputs = pipe_factory(kind), tiny_inputs(kind)
    steps = schedule.num_steps
    expected = _reference_run(pipe, inputs, schedule, steps)
    plain_reuse = _reference_run(
        pipe, inputs, Schedule(steps, schedule.compute_steps, (1,) * len(schedule.spans)), steps
    )
    enable_mean_cache(pipe, MeanCacheConfig(schedule))
    ours = generate_latents(pipe, inputs, steps)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain_reuse).abs().max() > 1e-4  # the spans changed the result


def test_flux_with_true_cfg_skips_both_branches_and_matches_reference(pipe_factory):
    pipe, inputs = pipe_factory("flux"), tiny_inputs("flux")
    negative = tiny_inputs("flux", seed=1)
    inputs = {
        **inputs,
        "negative_prompt_embeds": negative["prompt_embeds"],
        "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        "true_cfg_scale": 3.0,
    }
    expected = _reference_run(pipe, inputs, SPANS_1_TO_5, 30)
    enable_mean_cache(pipe, MeanCacheConfig(SPANS_1_TO_5))
    calls, num_blocks, handles = _count_block_calls(pipe.transformer)
    try:
        ours = generate_latents(pipe, inputs, 30)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == 2 * SPANS_1_TO_5.budget * num_blocks
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_state_resets_between_calls_with_other_step_counts_and_batch_sizes(pipe_factory):
    pipe = pipe_factory("flux")
    config = MeanCacheConfig(Schedule.preset("qwen-image", 10))
    enable_mean_cache(pipe, config)
    runs = [(50, 1), (20, 2), (50, 1), (28, 1)]
    outputs = [generate_latents(pipe, tiny_inputs("flux", batch_size=b), n) for n, b in runs]
    assert meancache.summary(pipe).steps_run == 28 and meancache.summary(pipe).computed_steps == 10
    disable_mean_cache(pipe)
    assert torch.equal(outputs[0], outputs[2])  # nothing leaked from the runs in between
    for (n, b), out in zip(runs, outputs, strict=True):  # each equals a run on a freshly enabled pipeline
        enable_mean_cache(pipe, config)
        assert torch.equal(generate_latents(pipe, tiny_inputs("flux", batch_size=b), n), out)
        disable_mean_cache(pipe)
    assert outputs[1].shape[0] == 2


def test_interrupted_generation_leaves_no_state(pipe_factory):
    pipe, inputs = pipe_factory("flux"), tiny_inputs("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    clean = generate_latents(pipe, inputs, 50)

    def stop(pipe_, i, t, kwargs):
        if i == 20:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        generate_latents(pipe, inputs, 50, callback_on_step_end=stop)
    assert "interrupted" in str(meancache.summary(pipe))
    assert torch.equal(generate_latents(pipe, inputs, 50), clean)


def test_num_images_per_prompt_and_prompt_batches(pipe_factory):
    pipe = pipe_factory("qwen-image")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    out = generate_latents(pipe, tiny_inputs("qwen-image", batch_size=2), 50, num_images_per_prompt=2)
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert meancache.summary(pipe).transformer_calls == 20


def test_schedule_for_other_step_count_is_mapped(pipe_factory):
    pipe = pipe_factory("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    generate_latents(pipe, tiny_inputs("flux"), 28)
    report = meancache.summary(pipe)
    assert report.num_steps == 28 and report.transformer_calls == 10
    assert "mapped from 50 steps" in str(report)


def test_summary_text(pipe_factory):
    pipe = pipe_factory("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    with pytest.raises(RuntimeError, match=r"no generation has run"):
        meancache.summary(pipe)
    generate_latents(pipe, tiny_inputs("flux"), 50)
    assert str(meancache.summary(pipe)) == (
        "MeanCache: 50 steps, 10 computed, 40 reused (spans K=1: 33, K=2: 1, K=4: 6); "
        "transformer calls: 10 run, 40 skipped; estimator paper; ideal speedup 5.00x; "
        "schedule: MeanCache authors' scripts (UnicomAI/MeanCache), transcribed"
    )


def test_enabling_twice_and_disabling_when_off_are_errors(pipe_factory):
    pipe = pipe_factory("flux")
    config = MeanCacheConfig(Schedule.preset("qwen-image", 10))
    with pytest.raises(ValueError, match=r"MeanCache is not enabled on this FluxPipeline"):
        disable_mean_cache(pipe)
    enable_mean_cache(pipe, config)
    with pytest.raises(RuntimeError, match=r"already enabled"):
        enable_mean_cache(pipe, config)


def test_a_step_with_per_token_timesteps_is_refused_by_keyword_or_position(pipe_factory):
    pipe = pipe_factory("flux")
    enable_mean_cache(pipe, MeanCacheConfig(budget=5))
    sample, per_token = torch.zeros(1, 4, 8), torch.ones(1, 4)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        pipe.scheduler.step(sample, 1.0, sample, per_token_timesteps=per_token)
    with pytest.raises(ValueError, match="per_token_timesteps"):  # (s_churn, s_tmin, s_tmax, s_noise, generator, ...)
        pipe.scheduler.step(sample, 1.0, sample, 0.0, 0.0, float("inf"), 1.0, None, per_token)


def test_budget_above_step_count_is_a_clear_error(pipe_factory):
    pipe = pipe_factory("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    with pytest.raises(ValueError, match=r"budget 10 .* cannot run 6 steps"):
        generate_latents(pipe, tiny_inputs("flux"), 6)


def test_unsupported_schedulers_and_configs_are_refused(pipe_factory):
    pipe = pipe_factory("flux")
    schedule = Schedule.preset("qwen-image", 10)
    with pytest.raises(TypeError, match=r"config must be a meancache.MeanCacheConfig"):
        enable_mean_cache(pipe, schedule)
    with pytest.raises(TypeError, match=r"schedule must be a meancache.Schedule"):
        MeanCacheConfig(schedule=[0, 49])
    known = re.escape(str(sorted(ESTIMATORS)))
    with pytest.raises(ValueError, match=rf"unknown estimator 'exact'; available: {known}"):
        MeanCacheConfig(schedule, estimator="exact")
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchHeunDiscreteScheduler()
        with pytest.raises(TypeError, match=r"needs a FlowMatchEulerDiscreteScheduler.*FlowMatchHeunDiscreteScheduler"):
            enable_mean_cache(pipe, MeanCacheConfig(schedule))
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        with pytest.raises(ValueError, match=r"stochastic_sampling=True"):
            enable_mean_cache(pipe, MeanCacheConfig(schedule))
    finally:
        pipe.scheduler = original
    assert not is_mean_cache_enabled(pipe)


def test_budget_alone_uses_the_published_table_for_qwen_image_at_50_steps(pipe_factory):
    pipe = pipe_factory("qwen-image")
    enable_mean_cache(pipe, MeanCacheConfig(budget=17))
    generate_latents(pipe, tiny_inputs("qwen-image"), 50)
    report = meancache.summary(pipe)
    assert report.schedule == Schedule.preset("qwen-image", 17) and report.transformer_calls == 34
    disable_mean_cache(pipe)
    name_or_path = pipe.name_or_path
    pipe.register_to_config(_name_or_path="Qwen/Qwen-Image-2512")
    try:
        enable_mean_cache(pipe, MeanCacheConfig(budget=17))
        generate_latents(pipe, tiny_inputs("qwen-image"), 50)
        assert meancache.summary(pipe).schedule == Schedule.preset("qwen-image-2512", 17)
    finally:
        pipe.register_to_config(_name_or_path=name_or_path)


def test_budget_alone_prefers_schedules_shipped_in_the_model_folder(tmp_path):
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    shipped = Schedule(20, (0, 1, 7, 12, 19), (1, 3, 2, 4), {"source": "calibrated for this model"})
    (tmp_path / "model" / "meancache_schedules").mkdir()
    shipped.save(tmp_path / "model" / "meancache_schedules" / "schedule_B5.json")
    from diffusers import FluxPipeline

    loaded = FluxPipeline.from_pretrained(
        tmp_path / "model", text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None
    )
    loaded.set_progress_bar_config(disable=True)
    enable_mean_cache(loaded, MeanCacheConfig(budget=5, calibration_runs=0))
    generate_latents(loaded, tiny_inputs("flux"), 20)
    assert meancache.summary(loaded).schedule == shipped
    replaced = Schedule(20, (0, 2, 7, 12, 19), (2, 5, 2, 4), {"source": "calibrated again for this model"})
    replaced.save(tmp_path / "model" / "meancache_schedules" / "schedule_B5.json")  # read again once rewritten
    generate_latents(loaded, tiny_inputs("flux"), 20)
    assert meancache.summary(loaded).schedule == replaced
    generate_latents(loaded, tiny_inputs("flux"), 30)  # no shipped schedule for 30 steps: the fallback
    assert meancache.summary(loaded).schedule.metadata["source"] == "fallback: uniform, K=1"


def test_budget_alone_with_a_qwen_image_loaded_from_a_path_object(tmp_path):
    """from_pretrained(Path) leaves a Path in name_or_path; the preset lookup must still work on it."""
    from diffusers import QwenImagePipeline

    tiny_pipeline("qwen-image").save_pretrained(tmp_path / "qwen 2512")
    loaded = QwenImagePipeline.from_pretrained(tmp_path / "qwen 2512", text_encoder=None, tokenizer=None)
    loaded.set_progress_bar_config(disable=True)
    enable_mean_cache(loaded, MeanCacheConfig(budget=5, calibration_runs=0))
    generate_latents(loaded, tiny_inputs("qwen-image"), 20)
    assert meancache.summary(loaded).schedule.metadata["source"] == "fallback: uniform, K=1"


@pytest.mark.parametrize(("kind", "steps"), [("flux", 50), ("qwen-image", 28)])
def test_budget_alone_without_calibration_falls_back_to_uniform_reuse_and_says_so(pipe_factory, caplog, kind, steps):
    pipe = pipe_factory(kind)
    enable_mean_cache(pipe, MeanCacheConfig(budget=10, calibration_runs=0))
    with caplog.at_level("INFO", logger="meancache"):
        generate_latents(pipe, tiny_inputs(kind), steps)
    report = meancache.summary(pipe)
    assert report.schedule.compute_steps == Schedule.uniform(steps, 10).compute_steps
    assert report.schedule.metadata["source"] == "fallback: uniform, K=1"
    assert "no published or shipped schedule" in caplog.text and "calibration_runs" in caplog.text


def test_mapping_a_schedule_to_another_step_count_warns_once(pipe_factory, caplog):
    pipe = pipe_factory("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", 10)))
    with caplog.at_level("WARNING", logger="meancache"):
        for _ in range(2):
            generate_latents(pipe, tiny_inputs("flux"), 28)
    assert caplog.text.count("the schedule was made for 50 steps; this run has 28") == 1


def test_config_needs_exactly_one_of_schedule_and_budget():
    with pytest.raises(ValueError, match="exactly one of schedule= or budget="):
        MeanCacheConfig()
    with pytest.raises(ValueError, match="exactly one of schedule= or budget="):
        MeanCacheConfig(Schedule.uniform(10, 5), budget=5)
    with pytest.raises(ValueError, match="budget must be an integer >= 2"):
        MeanCacheConfig(budget=1)
    config = MeanCacheConfig(budget=12)
    assert MeanCacheConfig.from_dict(config.to_dict()) == config
