"""The guidance part of the calibration key comes from what MeanCache observes on the first step, not from the
pipeline call's frame: it follows guider components, holds through wrappers, keys only the guidance that acts
(the frame-reading key split on an unused ``true_cfg_scale`` and on differences below its rounding), and a
guidance it cannot identify is not calibrated."""

import re

import pytest
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import calibration_store
from meancache.integrations.diffusers.guidance import MAX_RESIDUAL, MAX_UNCERTAINTY, combination_weights
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline

STEPS, BUDGET = 10, 4


def _key_of(pipe, inputs, **kwargs) -> str:
    """The digest of the key a generation calibrates under (calibration never completes here)."""
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=99))
    try:
        generate_latents(pipe, inputs, STEPS, **kwargs)
        return re.search(r"key (\w+)", summary(pipe).schedule.metadata["source"]).group(1)
    finally:
        disable_mean_cache(pipe)


def _wrapped(pipe):
    """``pipe`` as an instance of a subclass whose ``__call__`` takes only ``**kwargs`` and forwards them to the
    pipeline's own: the key must not depend on how the call reaches the pipeline."""

    def __call__(self, **kwargs):
        return super(type(self), self).__call__(**kwargs)

    pipe.__class__ = type(f"Wrapped{type(pipe).__name__}", (type(pipe),), {"__call__": __call__})
    return pipe


@pytest.fixture(scope="module")
def qwen():
    pipe = _wrapped(tiny_pipeline("qwen-image"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_key_follows_guidance_passed_through_a_wrapper_and_kwargs(qwen):
    inputs = tiny_inputs("qwen-image")
    base = _key_of(qwen, inputs)
    assert _key_of(qwen, inputs, seed=3) == base
    assert _key_of(qwen, {**inputs, "true_cfg_scale": 2.0}) != base
    assert _key_of(qwen, {**inputs, "true_cfg_scale": 4.0 + 1e-6}) == base
    no_cfg = {k: v for k, v in inputs.items() if not k.startswith("negative_")}  # Qwen-Image then runs no CFG
    assert _key_of(qwen, no_cfg) != base
    assert _key_of(qwen, {**no_cfg, "true_cfg_scale": 2.0}) == _key_of(qwen, no_cfg)  # the scale is then unused


def test_flux_embedded_guidance_and_true_cfg_through_a_wrapper():
    pipe = _wrapped(tiny_pipeline("flux"))
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("flux")
    negative = {"negative_prompt_embeds": torch.randn(1, 8, 32), "negative_pooled_prompt_embeds": torch.randn(1, 32)}
    keys = {
        _key_of(pipe, inputs),
        _key_of(pipe, {**inputs, "guidance_scale": 5.0}),  # the transformer's guidance input
        _key_of(pipe, {**inputs, **negative, "true_cfg_scale": 2.0}),  # true CFG: two calls per step
        _key_of(pipe, {**inputs, **negative, "true_cfg_scale": 3.0}),
    }
    assert len(keys) == 4


def test_key_follows_a_guider_components_scale():
    """HunyuanVideo 1.5 takes its CFG scale from its guider component, not from a call argument: the frame-reading
    key gave every guider setting one calibration."""
    from diffusers.guiders import ClassifierFreeGuidance

    from tests.matrix import CASES

    (case,) = [c for c in CASES if c.pipeline == "HunyuanVideo15Pipeline"]
    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    base = _key_of(pipe, inputs)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0)
    assert _key_of(pipe, inputs) != base


def test_unidentifiable_guidance_is_not_calibrated(qwen, caplog):
    inputs = tiny_inputs("qwen-image")
    # the negative prompt is the prompt: both branches are equal, so the CFG scale cannot be seen on any step
    same = {**inputs, "negative_prompt_embeds": inputs["prompt_embeds"]}
    enable_mean_cache(qwen, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    try:
        with caplog.at_level("WARNING", logger="meancache"):
            for _ in range(2):
                generate_latents(qwen, same, STEPS)
        assert summary(qwen).schedule.metadata["source"] == "fallback: uniform, K=1"
        assert caplog.text.count("not calibrating") == 1 and "too alike" in caplog.text
        assert calibration_store().files() == []
    finally:
        disable_mean_cache(qwen)


def _rows(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("combine", ["plain", "per-row norm", "per-sample rescale", "three branches", "other"])
def test_combination_weights(combine):
    c, u, i = (_rows(2, 64, 16, seed=s) for s in range(3))
    weights = (-3.0, 4.0)
    g = u * weights[0] + c * weights[1]
    branches = [u, c]
    if combine == "per-row norm":  # Qwen-Image
        g = g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True))
    elif combine == "per-sample rescale":  # guidance_rescale
        g = g * torch.tensor([0.7, 1.3])[:, None, None]
    elif combine == "three branches":  # image and text CFG
        weights = (-1.5, 1.0, 1.5)
        g, branches = u * weights[0] + i * weights[1] + c * weights[2], [u, i, c]
    elif combine == "other":  # not parallel to any combination: e.g. a per-element clamp
        g = g.clamp(-1, 1)
    fit = combination_weights(branches, g)
    if combine == "other":
        assert fit.residual > MAX_RESIDUAL
        return
    assert fit.residual < 1e-6 and fit.uncertainty < MAX_UNCERTAINTY
    assert fit.weights == pytest.approx(weights, abs=1e-6)
    assert fit.rescaled == (combine in ("per-row norm", "per-sample rescale"))
    assert combination_weights([u, u], u * 1.0).uncertainty > MAX_UNCERTAINTY  # equal branches: any weights fit


def test_exact_jvp_gets_step_zeros_derivative_when_the_schedule_is_resolved_at_the_first_step():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("flux")
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    generate_latents(pipe, inputs, STEPS)  # calibrates
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1, estimator="exact-jvp"))
    resolved = generate_latents(pipe, inputs, STEPS, seed=1)
    report = summary(pipe)
    disable_mean_cache(pipe)
    schedule = report.schedule
    assert report.schedule.metadata["source"].startswith("calibrated on first use") and not schedule.is_computed(1)
    assert report.derivative_calls > 0
    enable_mean_cache(pipe, MeanCacheConfig(Schedule(STEPS, schedule.compute_steps, schedule.spans),
                                            estimator="exact-jvp"))  # fmt: skip
    given = generate_latents(pipe, inputs, STEPS, seed=1)
    disable_mean_cache(pipe)
    torch.testing.assert_close(resolved, given, rtol=1e-4, atol=1e-5)


def test_a_schedule_shipped_with_the_model_needs_no_guidance_observation(monkeypatch):
    """The key, and the observation of the first step it needs (a float64 copy of the branch outputs on the CPU),
    are made only when no schedule shipped in the model folder applies."""
    from meancache.integrations.diffusers import first_use
    from meancache.models import load_digits_model

    observed, observe = [], first_use.observed_guidance
    monkeypatch.setattr(first_use, "observed_guidance", lambda *a: observed.append(1) or observe(*a))
    model = load_digits_model("digits-flux")
    model.pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(model.pipe, MeanCacheConfig(budget=10))
    generate_latents(model.pipe, model.inputs([3]), 50)
    assert summary(model.pipe).computed_steps == 10 and observed == []
