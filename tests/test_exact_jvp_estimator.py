import pytest
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, sample, summary
from meancache.integrations.diffusers.exact_jvp import guided_derivative
from meancache.integrations.jvp_attention import enable_jvp_attention
from meancache.method.estimators import ExactJVPEstimator
from meancache.method.sampler import velocity_and_derivative
from meancache.testing import PIPELINE_KINDS, generate_latents, tiny_inputs, tiny_pipeline

SCHEDULE = Schedule(12, (0, 1, 2, 4, 7, 11), (1, 2, 3, 4, 4))
A = torch.tensor([[-0.5, 0.3], [0.2, -0.4]], dtype=torch.float64)


def _linear_velocity(z, sigma):
    """v(z, sigma) = A z + (sin 3 sigma, cos 2 sigma): dv/dsigma along tangent t is A t + (3 cos 3s, -2 sin 2s)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return z @ A.T + torch.stack([torch.sin(3 * s), torch.cos(2 * s)])


def test_derivative_along_the_trajectory_is_the_analytic_one():
    z, tangent, sigma = torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.tensor([[0.3, 0.7]]), 0.6
    v, derivative = velocity_and_derivative(_linear_velocity, z, sigma, tangent)
    expected = tangent.double() @ A.T + torch.tensor(
        [3 * torch.cos(torch.tensor(1.8)), -2 * torch.sin(torch.tensor(1.2))]
    )
    torch.testing.assert_close(v, _linear_velocity(z, sigma))
    torch.testing.assert_close(derivative, expected.double(), atol=1e-6, rtol=1e-6)


def test_skipped_steps_use_the_midpoint_of_the_first_order_expansion():
    estimator = ExactJVPEstimator(Schedule(4, (0, 3), (3,)))
    assert [estimator.needs_derivative(i) for i in range(4)] == [True, False, False, False]
    v, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    estimator.record(0, torch.zeros(2), 1.0, v, d)
    z = torch.tensor([0.1, 0.2])
    z_next, u = estimator.estimate(1, z, 0.75, 0.5)
    expected_u = v + (0.5 * (0.75 + 0.5) - 1.0) * d
    torch.testing.assert_close(u, expected_u)
    torch.testing.assert_close(z_next, z + (0.5 - 0.75) * expected_u)
    assert estimator.last_velocity() is u


def test_sampler_with_exact_jvp_follows_the_equations_step_by_step():
    z0, sigmas = torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.linspace(1, 0, 13).tolist()
    ours = sample(_linear_velocity, z0, sigmas, SCHEDULE, estimator="exact-jvp")
    z, last, anchor = z0.clone(), None, None
    for i in range(12):
        s, s_next = sigmas[i], sigmas[i + 1]
        if SCHEDULE.is_computed(i):
            v = _linear_velocity(z, s)
            tangent = last if last is not None else v
            d = tangent @ A.T + torch.tensor([3 * torch.cos(torch.tensor(3 * s)), -2 * torch.sin(torch.tensor(2 * s))])
            anchor, last = (s, v, d), v
        else:
            s_c, v, d = anchor
            last = v + (0.5 * (s + s_next) - s_c) * d
        z = z + (s_next - s) * last
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-5)


def test_a_skip_right_after_step_0_costs_one_more_call_for_the_tangent():
    pipe, inputs = tiny_pipeline("flux"), tiny_inputs("flux")
    enable_mean_cache(pipe, MeanCacheConfig(Schedule(6, (0, 3, 5), (3, 2)), estimator="exact-jvp"))
    generate_latents(pipe, inputs, 6)
    assert (summary(pipe).transformer_calls, summary(pipe).derivative_calls) == (3 + 1, 2)


def test_a_missing_derivative_is_an_error():
    estimator = ExactJVPEstimator(Schedule(4, (0, 3), (3,)))
    with pytest.raises(ValueError, match="record it with its derivative"):
        estimator.record(0, torch.zeros(2), 1.0, torch.zeros(2))


def test_guided_derivative_is_exact_for_linear_guidance():
    g = torch.Generator().manual_seed(0)
    u, c, du, dc = (torch.randn(2, 5, 3, generator=g) for _ in range(4))
    scale = 4.0
    guided = u + scale * (c - u)
    torch.testing.assert_close(
        guided_derivative([(c, dc), (u, du)], guided), du + scale * (dc - du), atol=1e-4, rtol=1e-4
    )
    batched = guided_derivative([(torch.cat([u, c]), torch.cat([du, dc]))], guided)  # SD3-style batched CFG
    torch.testing.assert_close(batched, du + scale * (dc - du), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided_derivative([(c, dc)], c), dc)


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_pipelines_run_exact_jvp_and_count_forward_mode_passes(kind):
    pipe, inputs = tiny_pipeline(kind), tiny_inputs(kind)
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE, estimator="exact-jvp"))
    out = generate_latents(pipe, inputs, 12)
    result = summary(pipe)
    branches = 2 if kind == "qwen-image" else 1
    derivative_steps = sum(ExactJVPEstimator(SCHEDULE).needs_derivative(i) for i in range(12))
    assert result.derivative_calls == branches * derivative_steps == branches * 3
    assert result.transformer_calls == branches * SCHEDULE.budget
    assert torch.isfinite(out).all()
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.uniform(12, 12), estimator="exact-jvp"))
    torch.testing.assert_close(generate_latents(pipe, inputs, 12), _full(kind), atol=0, rtol=0)


def _full(kind):
    return generate_latents(tiny_pipeline(kind), tiny_inputs(kind), 12)


def test_flux_pipeline_matches_the_framework_free_sampler():
    """Two independent routes to the same numbers: the hooks inside FluxPipeline, and ``sample`` driving the
    same transformer through its own forward-mode pass."""
    pipe, inputs = tiny_pipeline("flux"), tiny_inputs("flux")
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE, estimator="exact-jvp"))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)) or None, with_kwargs=True)
    ours = generate_latents(pipe, inputs, 12)
    disable_mean_cache(pipe)
    first = calls[0]
    fixed = {k: v for k, v in first.items() if k not in ("hidden_states", "timestep")} | {"return_dict": False}
    enable_jvp_attention(pipe.transformer)

    def velocity(z, sigma):
        timestep = torch.as_tensor(sigma, dtype=z.dtype).reshape(1).expand(z.shape[0])
        return pipe.transformer(hidden_states=z, timestep=timestep, **fixed)[0]

    theirs = sample(velocity, first["hidden_states"], pipe.scheduler.sigmas, SCHEDULE, estimator="exact-jvp")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
