"""The opt-in ``data-linear`` estimator: its equation against a plain PyTorch reference, and the sampler contracts."""

import math

import pytest
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, sample
from meancache.method.estimators import ESTIMATORS, DataLinearEstimator, TrajectoryExtrapolationEstimator
from meancache.testing import PIPELINE_KINDS, generate_latents, tiny_inputs, tiny_pipeline
from tests.reference_loop import history_peak_bytes, toy_velocity

SCHEDULE = Schedule(30, (0, 1, 2, 5, 9, 14, 20, 23, 29), (1, 1, 2, 3, 4, 5, 1, 5))


def _sigmas(n):
    return [*torch.linspace(1.0, 1.0 / n, n).tolist(), 0.0]


def reference_step(z, sigma, sigma_next, node_c, node_p):
    """The class docstring's closed form, in float64: ``node_*`` are ``(sigma, x0)`` or ``None`` (hold ``x0_c``)."""
    sigma_c, x0_c = node_c
    z, x0_c = z.double(), x0_c.double()
    slope = 0.5 * (x0_c - node_p[1].double()) / (sigma_c - node_p[0]) if node_p is not None else torch.zeros_like(z)
    if sigma_next == 0.0:
        z_next = x0_c - slope * sigma_c
    else:
        ratio = sigma_next / sigma
        z_next = ratio * z + (1 - ratio) * (x0_c - slope * sigma_c) + slope * sigma_next * math.log(sigma / sigma_next)
    return z_next, (z_next - z) / (sigma_next - sigma)


def reference_sample(velocity_fn, z, sigmas, schedule):
    """An independent loop: full history, nodes chosen by the docstring's rule, float64 steps."""
    computed = {}  # step -> (sigma, x0)
    z = z.double()
    for i in range(schedule.num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        if schedule.is_computed(i):
            v = velocity_fn(z.float(), s).double()
            computed[i] = (s, (z.float() - s * v.float()).double())
            z = z + (s_next - s) * v
            continue
        c = max(computed)
        j = min([k for k in schedule.compute_steps if k > i], default=schedule.num_steps)
        older = [p for p in sorted(computed) if c - p >= j - c and p >= sorted(computed)[-4:][0]]
        p = older[-1] if older else None
        z, _ = reference_step(z, s, s_next, computed[c], computed[p] if p is not None else None)
    return z


def test_registered_by_name():
    assert ESTIMATORS["data-linear"] is DataLinearEstimator
    assert issubclass(DataLinearEstimator, TrajectoryExtrapolationEstimator)
    assert MeanCacheConfig(budget=10, estimator="data-linear").estimator == "data-linear"


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 1, 9, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_steps_match_the_plain_pytorch_formula(shape, dtype):
    schedule = Schedule(12, (0, 1, 3, 5, 11), (1, 1, 1, 1))
    sigmas = _sigmas(12)
    estimator = DataLinearEstimator(schedule)
    g = torch.Generator().manual_seed(1)
    nodes = {}
    z = torch.randn(shape, generator=g).to(dtype)
    for i in range(12):
        if schedule.is_computed(i):
            v = torch.randn(shape, generator=g).to(dtype)
            estimator.record(i, z, sigmas[i], v)
            nodes[i] = (sigmas[i], z.float() - sigmas[i] * v.float())  # what the estimator logs, in float32
            z = (z.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
            continue
        z_next, u_hat = estimator.estimate(i, z, sigmas[i], sigmas[i + 1])
        assert z_next.dtype == u_hat.dtype == torch.float32 and z_next.shape == u_hat.shape == shape
        c = max(nodes)
        j = min(k for k in schedule.compute_steps if k > i)
        wide = [p for p in nodes if c - p >= j - c]
        expected_z, expected_u = reference_step(z.float(), sigmas[i], sigmas[i + 1], nodes[c],
                                                nodes[max(wide)] if wide else None)  # fmt: skip
        torch.testing.assert_close(z_next.double(), expected_z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u_hat.double(), expected_u, rtol=1e-4, atol=1e-4)
        # what the Euler scheduler is fed reproduces the step
        torch.testing.assert_close(z.float() + (sigmas[i + 1] - sigmas[i]) * u_hat, z_next, rtol=1e-5, atol=1e-5)
        z = z_next.to(dtype)


def test_without_a_wide_base_it_holds_the_prediction_which_is_plain_reuse():
    # after computed steps 0 and 1 the interval 1 -> 9 has no node 8 steps back: x0_1 is held, i.e. Euler with v_1
    schedule = Schedule(12, (0, 1, 9, 11), (1, 1, 1))
    sigmas = _sigmas(12)
    estimator = DataLinearEstimator(schedule)
    z0, v0, v1 = torch.randn(4), torch.randn(4), torch.randn(4)
    estimator.record(0, z0, sigmas[0], v0)
    z = z0 + (sigmas[1] - sigmas[0]) * v0
    estimator.record(1, z, sigmas[1], v1)
    z = z + (sigmas[2] - sigmas[1]) * v1
    for i in range(2, 9):
        z_next, u_hat = estimator.estimate(i, z, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(u_hat, v1, rtol=1e-5, atol=1e-5)
        z = z_next


@pytest.mark.parametrize(
    "schedule", [SCHEDULE, Schedule.preset("qwen-image", 10), Schedule.preset("z-image", 20)],
    ids=["spans1-5", "qwen-image-B10", "z-image-B20"],
)  # fmt: skip
def test_sampler_matches_an_independent_reference_loop(schedule):
    z0 = torch.randn(4, 33)
    sigmas = _sigmas(schedule.num_steps)
    ours = sample(toy_velocity, z0, sigmas, schedule, estimator="data-linear")
    torch.testing.assert_close(ours.double(), reference_sample(toy_velocity, z0, sigmas, schedule), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    assert (ours - sample(toy_velocity, z0, sigmas, schedule)).abs().max() > 1e-3  # not the paper's rule


def test_full_budget_is_the_plain_sampler():
    sigmas = _sigmas(12)
    z0 = torch.randn(5)
    ours = sample(toy_velocity, z0, sigmas, Schedule.uniform(12, 12), estimator="data-linear")
    z = z0
    for i in range(12):
        z = z + (sigmas[i + 1] - sigmas[i]) * toy_velocity(z, sigmas[i])
    torch.testing.assert_close(ours, z, rtol=0, atol=0)


def test_history_is_bounded():
    schedule = Schedule.preset("z-image", 20).for_steps(200)
    z = torch.randn(64, 16)
    peak = history_peak_bytes(DataLinearEstimator(schedule), z, _sigmas(200))
    assert peak <= 5 * z.numel() * 4  # four predictions and the last velocity


def test_refuses_a_derivative_and_out_of_order_steps():
    estimator = DataLinearEstimator(Schedule(5, (0, 2, 4), (1, 1)))
    with pytest.raises(ValueError, match="takes no derivative"):
        estimator.record(0, torch.zeros(2), 1.0, torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="expected step 0, got 1"):
        estimator.record(1, torch.zeros(2), 0.8, torch.zeros(2))


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_pipelines_run_it_and_a_full_budget_is_bit_identical(kind):
    pipe, inputs = tiny_pipeline(kind), tiny_inputs(kind)
    full = generate_latents(pipe, inputs, 12)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule(12, (0, 1, 2, 4, 7, 11), (1, 2, 3, 4, 4)),
                                            estimator="data-linear"))  # fmt: skip
    cached = generate_latents(pipe, inputs, 12)
    assert torch.isfinite(cached).all() and (cached - full).abs().max() > 0
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.uniform(12, 12), estimator="data-linear"))
    torch.testing.assert_close(generate_latents(pipe, inputs, 12), full, atol=0, rtol=0)
