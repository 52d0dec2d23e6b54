"""The coverage matrix (``tests/matrix/``): every case, uncached and with MeanCache.

Per case, at N = 10 steps: a full budget is bit-identical to the uncached pipeline; at B = 4 the transformers'
blocks run on the computed steps only, exactly as often as the uncached pipeline runs them on those steps
(so B times per CFG branch, whatever the layout), and the summary counts those forwards; after
``disable_mean_cache`` the pipeline gives the uncached result again.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin, UniPCMultistepScheduler

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.integrations.diffusers import first_use, is_mean_cache_enabled
from meancache.integrations.diffusers.components import transformer_names
from meancache.integrations.diffusers.pipeline import unsupported_loop
from tests.flow_pipelines import flow_pipeline_classes
from tests.matrix import CASES
from tests.matrix.common import Case
from tests.matrix.coverage import NOT_COVERED, PIPELINES_PAGE, REFUSED, Refusal, coverage_text, verified_table
from tests.reference_loop import reference_steps

STEPS, BUDGET = 10, 4
SPANS = Schedule(12, (0, 1, 4, 7, 11), (1, 3, 4, 5))
CASE = {case.name: case for case in CASES}


def denoisers(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """Every denoising model the pipeline holds, found without MeanCache's own naming rules: its diffusers models
    other than the VAEs (the models with an ``encode`` and a ``decode``: every ``AutoencoderMixin``, Kandinsky 6's
    K-VAE and Stable Audio 3's SAME VAE, which are not), the ControlNet, LTX-2's text connectors and the conditioning
    models that run once before the loop (ACE-Step's ``condition_encoder``, Stable Audio 3's ``duration_embedder``):
    ``transformer``, Wan2.2's ``transformer_2``, Ideogram4's ``unconditional_transformer``, ..."""
    return {
        name: module
        for name, module in pipe.components.items()
        if isinstance(module, ModelMixin)
        and not (hasattr(module, "encode") and hasattr(module, "decode"))
        and name not in ("controlnet", "connectors")
        and not name.endswith(("_encoder", "_embedder"))
    }


def run_counting_blocks(
    case: Case, pipe: DiffusionPipeline, inputs: dict[str, Any], begin: int | None = None
) -> tuple[torch.Tensor, dict[str, Counter], int]:
    """The case's output (final latents, or the decoded output); per step of the generation (step 0 is the
    scheduler's first, ``begin``) the number of transformer-block forwards (``"blocks"``) and of transformer forwards
    (``"forwards"``), over every denoising model of the pipeline (:func:`denoisers`), and of ControlNet forwards
    (``"controlnet"``); per kind, those outside every step (``"outside"``: before a loop's timesteps are stepped, or
    after its last step: SanaWM's refiner's K/V captures); and ``begin``, which a run that calls the transformer on
    every step tells when it is not given (the scheduler's ``step_index`` is None on the first step only)."""
    scheduler = pipe.scheduler
    calls: list[tuple[str, torch.Tensor, int | None]] = []  # kind, the scheduler's timesteps, its step index

    def counter(kind: str) -> Any:
        def count(*_: Any) -> None:
            calls.append((kind, scheduler.timesteps, scheduler.step_index))

        return count

    transformers = list(denoisers(pipe).values())
    handles = [t.register_forward_pre_hook(counter("forwards")) for t in transformers]
    handles += [
        module.register_forward_pre_hook(counter("blocks"))
        for transformer in transformers
        for path, module in transformer.named_modules()
        if re.fullmatch(r"\w*(blocks|layers)\.\d+", path)  # the top-level block lists
    ]
    if isinstance(controlnet := getattr(pipe, "controlnet", None), torch.nn.Module):
        handles.append(controlnet.register_forward_pre_hook(counter("controlnet")))
    torch.manual_seed(0)  # some pipelines sample from the global generator (CogView4 Control's VAE encoding)
    try:
        out = case.call(pipe, {**inputs, "num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(0),
                               "output_type": case.output_type})  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    stepped = [timesteps for _, timesteps, step in calls if step is not None]  # loops that ran past their step 0
    counts: dict[str, Counter] = {"blocks": Counter(), "forwards": Counter(), "controlnet": Counter()}
    outside: Counter = Counter()
    for kind, timesteps, step in calls:
        if any(timesteps is t for t in stepped) if step is None else step < len(timesteps):
            counts[kind][-1 if step is None else step] += 1
        else:
            outside[kind] += 1
    if isinstance(out, list):  # one tensor per video section (FramePack) or per prompt: compared whole
        out = torch.cat([section.flatten() for section in out])
    if begin is None:
        begin = min(step for step in counts["forwards"] if step != -1) - 1
    relative = {kind: Counter({0 if s == -1 else s - begin: n for s, n in c.items()}) for kind, c in counts.items()}
    return out, relative | {"outside": outside}, begin


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_pipeline(case: Case):
    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    assert transformer_names(pipe) == sorted(denoisers(pipe))  # MeanCache gates every denoising model
    baseline, counts, begin = run_counting_blocks(case, pipe, inputs)
    blocks, forwards, controlnet = counts["blocks"], counts["forwards"], counts["controlnet"]
    steps = len(forwards)
    assert sorted(forwards) == sorted(blocks) == list(range(steps)) and 0 < steps <= STEPS

    enable_mean_cache(pipe, MeanCacheConfig(budget=steps, calibration_runs=0))
    full, full_counts, _ = run_counting_blocks(case, pipe, inputs, begin)
    disable_mean_cache(pipe)
    assert torch.equal(full, baseline) and full_counts == counts

    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
    cached, cached_counts, _ = run_counting_blocks(case, pipe, inputs, begin)
    report = meancache.summary(pipe)
    disable_mean_cache(pipe)
    computed = report.schedule.compute_steps
    assert report.num_steps == steps and len(computed) == BUDGET
    assert cached_counts["blocks"] == Counter({i: blocks[i] for i in computed})  # B times per CFG branch and expert
    loops = case.loops  # the summary is the last loop's
    assert report.transformer_calls * loops == cached_counts["forwards"].total()  # the summary counts real forwards
    assert cached_counts["outside"] == counts["outside"]  # forwards outside the steps run as they are
    assert (report.transformer_calls + report.skipped_calls) * loops == forwards.total()
    # a ControlNet runs with the transformer, on the computed steps only
    assert cached_counts["controlnet"] == Counter({i: controlnet[i] for i in computed if controlnet[i]})
    assert (report.controlnet_calls * loops, report.skipped_controlnet_calls * loops) == (
        cached_counts["controlnet"].total(),
        controlnet.total() - cached_counts["controlnet"].total(),
    )
    assert cached.shape == baseline.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, baseline)

    assert torch.equal(run_counting_blocks(case, pipe, inputs)[0], baseline)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case.name for case in CASES])
def test_calibrate_on_first_use_with_group_offload(
    index: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A budget with no known schedule, as a user's own checkpoint gets it, on models offloaded block by block
    (diffusers' group offload on every denoising model, enabled before MeanCache in every other case and after it
    in the rest): the first call, under ``torch.inference_mode`` as users wrap generations, runs in full (each of its
    loops a calibrating generation) and equals the uncached pipeline; the next, under the pipeline's own
    ``no_grad`` (what a generation under ``inference_mode`` left must serve one outside it), runs B computed steps
    calibrated on it (the call after, where a call's loops have keys of their own); or, where MeanCache cannot
    calibrate the pipeline on first use (``Case.first_use_declined``), one warning saying why and evenly spaced
    steps. The calibrating path under ``no_grad`` is ``tests/test_first_use_calibration.py``'s; ``inference_mode``
    is the stricter mode (no version counters; its tensors cannot be written outside it). Every loop of the first
    call calibrates (``FULL_RUN_EVERY`` 1 here: progressive first use would run a loop that shares the first one's
    key with the budget, which ``tests/test_first_use_calibration.py`` checks)."""
    monkeypatch.setattr(first_use, "FULL_RUN_EVERY", 1)
    case = CASES[index]
    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    baseline, _, begin = run_counting_blocks(case, pipe, inputs)

    def offload() -> None:
        for model in denoisers(pipe).values():
            model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                       num_blocks_per_group=1)  # fmt: skip

    if index % 2:
        offload()
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=case.loops))
    if not index % 2:
        offload()
    with caplog.at_level("WARNING", logger="meancache"):
        with torch.inference_mode():
            first = run_counting_blocks(case, pipe, inputs, begin)[0]
        first_source = meancache.summary(pipe).schedule.metadata["source"]
        for _ in range(case.loops):  # loops of different keys (VisualCloze's upsampling) calibrate on each call
            run_counting_blocks(case, pipe, inputs, begin)
            report = meancache.summary(pipe)
            if not report.schedule.metadata["source"].startswith("calibrating"):
                break
    disable_mean_cache(pipe)
    assert report.computed_steps == BUDGET
    if case.first_use_declined is None:
        assert torch.equal(first, baseline) and first_source.startswith("calibrating on first use"), first_source
        assert report.schedule.metadata["source"].startswith("calibrated on first use"), report.schedule.metadata
    else:
        assert report.schedule.metadata["source"] == "fallback: uniform, K=1"
        assert caplog.text.count("not calibrating") == 1, caplog.text


def test_calibration_key_follows_the_conditioning_inputs():
    """Z-Image Omni with a condition image and without one: the same model, sigmas and latents, but other transformer
    inputs (SigLIP features, more images per sample), so other trajectories and another calibration. A calibration
    made on one mode was taken by the other before the key held the inputs' structure."""
    for name in ("z-image-omni", "z-image-omni-t2i"):  # the second finds the first's calibration unless keyed apart
        pipe, inputs = CASE[name].build()
        pipe.set_progress_bar_config(disable=True)
        enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
        generate(pipe, inputs, STEPS)
        assert meancache.summary(pipe).schedule.metadata["source"].startswith("calibrating"), name
        disable_mean_cache(pipe)


@pytest.mark.parametrize(
    ("name", "setting", "calls", "calibrated_calls"),
    [
        ("lumina2", {"cfg_trunc_ratio": 0.5}, 1, 2),  # drops the unconditional call
        ("sd3", {"skip_guidance_layers": [0]}, 2, 1),  # adds a skip-layer call, from after step 0
    ],
)
def test_a_guidance_setting_acting_after_the_first_step_is_warned_about(
    caplog: pytest.LogCaptureFixture, name: str, setting: dict[str, Any], calls: int, calibrated_calls: int
):
    """Lumina 2's ``cfg_trunc_ratio`` drops the unconditional call from some step on and SD3's skip-layer guidance
    adds a call within its window (which starts after step 0), which the key, decided at the first step, cannot
    hold: a generation that takes a calibration made without the setting is warned about (once), one like the
    calibrating generation is not."""
    pipe, inputs = CASE[name].build()
    pipe.set_progress_bar_config(disable=True)
    changed = {**inputs, **setting}
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    generate(pipe, inputs, STEPS)
    with caplog.at_level("WARNING", logger="meancache"):
        generate(pipe, inputs, STEPS)
        assert "calls at step" not in caplog.text
        generate(pipe, changed, STEPS)
        generate(pipe, changed, STEPS)
    assert meancache.summary(pipe).schedule.metadata["source"].startswith("calibrated on first use")
    assert caplog.text.count("calls at step") == 1
    made = rf"made \[{calls}, 0\] transformer \(and ControlNet\) calls at step \d+ where"
    assert re.search(rf"{made} .* made \[{calibrated_calls}, 0\]", caplog.text)


def generate(pipe: DiffusionPipeline, inputs: dict[str, Any], steps: int) -> torch.Tensor:
    return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                return_dict=False)[0]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "steps", "config"),
    [
        ("z-image", 50, MeanCacheConfig(budget=13, calibration_runs=0)),  # the authors' Z-Image table; CFG, batch 2
        ("z-image-no-cfg", 50, MeanCacheConfig(budget=15, calibration_runs=0)),
        ("flux-kontext", 12, MeanCacheConfig(SPANS)),  # reference-image tokens
        ("qwen-image-edit", 12, MeanCacheConfig(SPANS)),
        ("flux2-reference", 12, MeanCacheConfig(SPANS)),
        ("flux-img2img-0.6", 20, MeanCacheConfig(SPANS)),  # strength 0.6: 12 of 20 steps
        ("hunyuan-video-1.5", 12, MeanCacheConfig(SPANS)),  # a guider without state (ClassifierFreeGuidance)
        ("sana", 12, MeanCacheConfig(SPANS)),  # the flow DPM-Solver++
        ("stable-audio3", 12, MeanCacheConfig(SPANS)),  # 1-D latents, channels first
        ("stable-audio3-a2a", 12, MeanCacheConfig(SPANS)),  # its first step raises sigma
        ("longcat-audio", 12, MeanCacheConfig(SPANS)),  # inverted sigmas; CFG in two calls
        ("prx-pixel", 12, MeanCacheConfig(SPANS)),  # the velocity is made from the latents after the transformer
    ],
)
def test_matches_the_independent_reference_loop(name: str, steps: int, config: MeanCacheConfig):
    pipe, inputs = CASE[name].build()
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, config)
    ours = generate(pipe, inputs, steps)
    schedule = meancache.summary(pipe).schedule
    disable_mean_cache(pipe)
    if name.startswith("z-image"):
        assert schedule == Schedule.preset("z-image", config.budget)
    with reference_steps(pipe.scheduler, schedule.compute_steps, schedule.spans):
        expected = generate(pipe, inputs, steps)
    plain_reuse = Schedule(schedule.num_steps, schedule.compute_steps, (1,) * len(schedule.spans))
    with reference_steps(pipe.scheduler, plain_reuse.compute_steps, plain_reuse.spans):
        reuse = generate(pipe, inputs, steps)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - reuse).abs().max() > 1e-4  # the spans made a difference


def test_stateful_guider_against_the_reference_loop():
    """HunyuanImage's AdaptiveProjectedMixGuidance keeps a momentum of ``cond - uncond``. The reference loop runs
    the transformer on every step, so its guider sees real branch predictions on skipped steps too; MeanCache
    hands it the last computed step's (its momentum evolves as under plain reuse). Measured here (max abs over
    the final latents): 0.046 off the reference, against 0.050 when the guider is skipped on skipped steps and
    0.105 with cond == uncond placeholders; the reference itself is 0.094 from the full run."""
    pipe, inputs = CASE["hunyuan-image"].build()
    pipe.set_progress_bar_config(disable=True)
    full = generate(pipe, inputs, 12)
    with reference_steps(pipe.scheduler, SPANS.compute_steps, SPANS.spans):
        expected = generate(pipe, inputs, 12)
    enable_mean_cache(pipe, MeanCacheConfig(SPANS))
    ours = generate(pipe, inputs, 12)
    disable_mean_cache(pipe)
    error, caching_error = (ours - expected).abs().max(), (full - expected).abs().max()
    assert error < 0.6 * caching_error, (error, caching_error)


def test_a_call_before_the_loop_is_no_part_of_an_interrupted_generation():
    """GLM-Image's image-conditioned generation writes the condition image's K/V with a transformer call before its
    ``set_timesteps``. After a generation interrupted by diffusers' protocol (``pipe._interrupt``: the loop skips
    its remaining steps, so the generation never finishes), that call was taken as one of the unfinished
    generation's, answered on a skipped step with a placeholder: the K/V were never written and the next
    generation came out different (0.13 off)."""
    pipe, inputs = CASE["glm-image-edit"].build()
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
    expected = generate(pipe, inputs, STEPS)

    def interrupt(pipe_: DiffusionPipeline, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe_._interrupt = i == 1
        return kwargs

    generate(pipe, {**inputs, "callback_on_step_end": interrupt}, STEPS)
    assert meancache.summary(pipe).steps_run == 2  # interrupted after its second step
    assert torch.equal(generate(pipe, inputs, STEPS), expected)
    disable_mean_cache(pipe)


def test_wan22_experts_share_one_schedule_and_the_summary_counts_their_forwards():
    pipe, inputs = CASE["wan2.2"].build()
    pipe.set_progress_bar_config(disable=True)
    steps: dict[str, list[int]] = {"transformer": [], "transformer_2": []}
    for name, record in steps.items():
        getattr(pipe, name).register_forward_pre_hook(lambda *_, r=record: r.append(pipe.scheduler.step_index or 0))
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
    generate(pipe, inputs, STEPS)
    report = meancache.summary(pipe)
    computed = report.schedule.compute_steps
    high, low = sorted(set(steps["transformer"])), sorted(set(steps["transformer_2"]))
    assert high and low and max(high) < min(low)  # each expert ran on some computed steps
    assert high + low == list(computed)
    assert report.transformer_calls == len(steps["transformer"]) + len(steps["transformer_2"]) == 2 * BUDGET
    assert report.skipped_calls == 2 * (STEPS - BUDGET)


def test_published_tables_are_matched_by_model_family():
    """Qwen-Image's img2img pipeline (any pipeline around a QwenImageTransformer2DModel) gets the Qwen-Image table;
    at strength 1 the whole 50-step trajectory runs."""
    pipe, inputs = CASE["qwen-image-img2img"].build()
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(budget=10, calibration_runs=0))
    generate(pipe, {**inputs, "strength": 1.0}, 50)
    assert meancache.summary(pipe).schedule == Schedule.preset("qwen-image", 10)


@pytest.mark.parametrize(
    ("name", "calls_per_step"),
    [
        # reference tokens and conditioning channels: the tangent covers the latents only (they do not move)
        ("flux-kontext", 1), ("flux2-reference", 1), ("flux-fill", 1),
        # additive key-padding masks (0 / -10000) in JVP attention
        ("ltx", 1), ("sd3-pag", 1),
        # a transformer returning a bare tensor with return_dict=False: its first sample had been taken
        ("kandinsky5-t2v", 2),
    ],
)  # fmt: skip
def test_exact_jvp_estimator_on_other_layouts(name: str, calls_per_step: int):
    pipe, inputs = CASE[name].build()
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(SPANS, estimator="exact-jvp"))
    out = generate(pipe, inputs, 12)
    report = meancache.summary(pipe)
    assert report.derivative_calls == 3 * calls_per_step  # steps 1, 4 and 7 precede skips
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        # model time 1 - sigma (and text padding before the latent tokens)
        ("ideogram4", r"'exact-jvp' estimator needs the transformer's timestep proportional to sigma"),
        # the first frame is the image's latents; the scheduler steps the others
        ("hunyuan-video-i2v-token-replace", r"that block is not the latents \(1, 4, 1, 2, 2\) the scheduler steps"),
        # the ControlNet's residuals depend on the latents and sigma: the transformer's derivative alone is not
        # the velocity's
        ("flux-controlnet", r"ControlNet residuals move with sigma too"),
    ],
)
def test_exact_jvp_estimator_refuses_a_layout_its_tangent_does_not_follow(name: str, error: str):
    """The forward-mode derivative would be wrong (silently, before these checks): the generation is refused at its
    start or at the computed step of its first forward-mode pass, before any skipped step uses the derivative."""
    pipe, inputs = CASE[name].build()
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(SPANS, estimator="exact-jvp"))
    with pytest.raises((TypeError, RuntimeError), match=error):
        generate(pipe, inputs, 12)


def test_enable_refuses_what_it_cannot_drive_naming_the_pipeline_and_the_reason():
    pipe, _ = CASE["wan"].build()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    with pytest.raises(TypeError, match=r"cannot drive WanPipeline with its UniPCMultistepScheduler: .* needs a "
                       r"FlowMatchEulerDiscreteScheduler"):  # fmt: skip
        enable_mean_cache(pipe, MeanCacheConfig(budget=4, calibration_runs=0))
    assert not is_mean_cache_enabled(pipe) and "step" not in vars(pipe.scheduler)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match=r"cannot drive WanPipeline: .*stochastic_sampling=True"):
        enable_mean_cache(pipe, MeanCacheConfig(budget=4, calibration_runs=0))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pipe.register_modules(transformer=None)
    with pytest.raises(TypeError, match=r"cannot drive WanPipeline: it has no `transformer` module"):
        enable_mean_cache(pipe, MeanCacheConfig(budget=4, calibration_runs=0))
    assert not is_mean_cache_enabled(pipe)


@pytest.mark.parametrize("refusal", REFUSED, ids=[refusal.pipeline for refusal in REFUSED])
def test_refused_at_enable_time(refusal: Refusal):
    pipe, _ = refusal.build()
    assert type(pipe).__name__ == refusal.pipeline
    with pytest.raises(TypeError, match=rf"cannot drive {refusal.pipeline}\b.*{refusal.error}"):
        enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
    assert not is_mean_cache_enabled(pipe) and "step" not in vars(pipe.scheduler)


def test_every_flow_pipeline_class_is_verified_refused_or_listed_with_a_reason():
    flow = flow_pipeline_classes()
    verified, refused = {case.pipeline for case in CASES}, {refusal.pipeline for refusal in REFUSED}
    assert verified.isdisjoint(refused) and not (verified | refused) & NOT_COVERED.keys()
    assert verified | refused | NOT_COVERED.keys() == flow
    # the loops enable_mean_cache refuses from the pipeline's source are exactly the ones listed as refused for it
    loop_refused = {name for name in flow if unsupported_loop(getattr(diffusers, name)) is not None}
    listed = {name for name, why in NOT_COVERED.items() if "its loop steps" in why}
    listed |= {refusal.pipeline for refusal in REFUSED if "its loop" in refusal.notes}
    assert loop_refused == listed


def test_the_pipelines_page_lists_the_matrix():
    page = PIPELINES_PAGE.read_text()
    fix = "regenerate it with `python -m tests.matrix.coverage`"
    assert verified_table() in page, f"docs/pipelines.md's table of verified pipelines is not the matrix's: {fix}"
    assert coverage_text() in page, f"docs/pipelines.md's coverage statement is not the matrix's: {fix}"
