import itertools

import pytest
import torch

from meancache import Schedule, sample
from meancache.method.estimators import PaperRuleEstimator, make_estimator
from tests.reference_loop import history_peak_bytes, reference_sample, toy_velocity

SPANS_1_TO_5 = Schedule(30, (0, 1, 2, 5, 9, 14, 20, 23, 29), (1, 1, 2, 3, 4, 5, 1, 5))


def _sigmas(n):
    return torch.linspace(1.0, 0.0, n + 1)


@pytest.mark.parametrize(
    "schedule",
    [SPANS_1_TO_5, Schedule.preset("qwen-image", 10), Schedule.preset("qwen-image-2512", 10),
     Schedule.preset("z-image", 20)],
    ids=["spans1-5", "qwen-image-B10", "qwen-image-2512-B10", "z-image-B20"],
)  # fmt: skip
def test_sampler_matches_independent_reference_loop(schedule):
    z0 = torch.randn(4, 33)
    sigmas = _sigmas(schedule.num_steps)
    ours = sample(toy_velocity, z0, sigmas, schedule)
    ref = reference_sample(toy_velocity, z0, sigmas, schedule.compute_steps, schedule.spans)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    plain_reuse = reference_sample(toy_velocity, z0, sigmas, schedule.compute_steps, (1,) * len(schedule.spans))
    if schedule.max_span > 1:  # the spans matter: the result is not plain reuse
        assert (ours - plain_reuse).abs().max() > 1e-3


def test_span_one_everywhere_is_euler_on_the_coarse_grid():
    schedule = Schedule(40, (0, 3, 4, 11, 20, 31, 39), (1,) * 6)
    sigmas = _sigmas(40)
    z0 = torch.randn(3, 8)
    ours = sample(toy_velocity, z0, sigmas, schedule)
    z = z0
    steps = (*schedule.compute_steps, 40)
    for a, b in itertools.pairwise(steps):
        z = z + (float(sigmas[b]) - float(sigmas[a])) * toy_velocity(z, float(sigmas[a]))
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_full_budget_is_plain_euler():
    sigmas = _sigmas(12)
    z0 = torch.randn(5)
    ours = sample(toy_velocity, z0, sigmas, Schedule.uniform(12, 12))
    z = z0
    for i in range(12):
        z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * toy_velocity(z, float(sigmas[i]))
    torch.testing.assert_close(ours, z, rtol=0, atol=0)


def test_velocity_fn_runs_only_on_computed_steps():
    calls = []
    schedule = Schedule.preset("qwen-image", 17)
    sample(lambda z, s: calls.append(s) or toy_velocity(z, s), torch.randn(2), _sigmas(50), schedule)
    assert len(calls) == 17


@pytest.mark.parametrize("num_steps", [50, 200])
def test_history_memory_is_bounded_by_the_largest_span(num_steps):
    schedule = Schedule.preset("z-image", 20).for_steps(num_steps)
    z = torch.randn(64, 16)
    latent_bytes = z.numel() * 4

    def bounded(estimator):
        assert estimator.history_size <= schedule.max_span

    peak = history_peak_bytes(make_estimator("paper", schedule), z, _sigmas(num_steps).tolist(), bounded)
    assert schedule.max_span == 5
    assert peak == (2 * (5 + 1) + 1) * latent_bytes  # a ring of max_span + 1 latents and velocities, and z_{i+1}


def test_estimator_refuses_out_of_order_steps():
    estimator = PaperRuleEstimator(Schedule(5, (0, 2, 4), (2, 2)))
    with pytest.raises(RuntimeError, match="expected step 0, got 1"):
        estimator.record(1, torch.zeros(2), 0.8, torch.zeros(2))
    estimator.record(0, torch.zeros(2), 1.0, torch.zeros(2))
    with pytest.raises(RuntimeError, match="step 1 is skipped in the schedule"):
        estimator.record(1, torch.zeros(2), 0.8, torch.zeros(2))


def test_bad_sampler_inputs_get_clear_errors():
    schedule = Schedule.uniform(4, 2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(toy_velocity, torch.zeros(2), [1.0, 0.5, 0.5, 0.2, 0.0], schedule)
    with pytest.raises(ValueError, match=r"sigmas needs 2 to 10001 values \(N \+ 1 for N steps\), got 1"):
        sample(toy_velocity, torch.zeros(2), [1.0], schedule)
    with pytest.raises(ValueError, match=r"sigmas\[2\] must be finite, got nan"):
        sample(toy_velocity, torch.zeros(2), [1.0, 0.5, float("nan"), 0.2, 0.0], schedule)
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for latents of shape \(2,\)"):
        sample(lambda z, s: torch.zeros(3), torch.zeros(2), _sigmas(4), schedule)
    with pytest.raises(ValueError, match="unknown estimator 'exact'"):
        sample(toy_velocity, torch.zeros(2), _sigmas(4), schedule, estimator="exact")
