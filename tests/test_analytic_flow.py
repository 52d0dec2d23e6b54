"""The analytic flow (flow matching on a Gaussian mixture) is right, and its reference solvers have their order."""

import itertools
import math

import pytest
import torch

from meancache.method.analytic_flow import (
    GaussianMixtureFlow,
    dpm_solver_pp_2m,
    euler,
    flow_sigmas,
    rk4,
    rms,
)


@pytest.fixture(scope="module")
def flow():
    return GaussianMixtureFlow.random(dim=3, components=4, seed=0)


@pytest.mark.parametrize("sigma", [0.9, 0.5, 0.1, 0.02])
def test_velocity_is_the_probability_flow_of_the_marginal_score(flow, sigma):
    # z = (1 - s) x0 + s eps  =>  E[eps | z] = -s grad log p_s(z), E[x0 | z] = (z - s E[eps | z]) / (1 - s),
    # so v = E[eps - x0 | z] = -(s grad log p_s(z) + z) / (1 - s): autograd of the marginal, not the formula
    z = flow.sample_data(64, seed=1) * (1 - sigma) + sigma * torch.randn(64, flow.dim, dtype=torch.float64)
    z.requires_grad_(True)
    (score,) = torch.autograd.grad(flow.log_density(z, sigma).sum(), z)
    expected = -(sigma * score + z.detach()) / (1 - sigma)
    torch.testing.assert_close(flow.velocity(z.detach(), sigma), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.8, 0.3, 0.05])
def test_velocity_solves_the_continuity_equation(flow, sigma):
    # d/dsigma p + div(p v) = 0, i.e. d/dsigma log p + div v + v . grad log p = 0: the sigma-derivative of the
    # marginal by central finite differences, the divergence and gradient by autograd
    z = (flow.sample_data(32, seed=2) * (1 - sigma) + sigma * torch.randn(32, flow.dim, dtype=torch.float64)).detach()
    h = 1e-5
    dlogp_dsigma = (flow.log_density(z, sigma + h) - flow.log_density(z, sigma - h)) / (2 * h)
    z.requires_grad_(True)
    v = flow.velocity(z, sigma)
    divergence = sum(torch.autograd.grad(v[:, d].sum(), z, retain_graph=True)[0][:, d] for d in range(flow.dim))
    (grad_log_p,) = torch.autograd.grad(flow.log_density(z, sigma).sum(), z)
    residual = dlogp_dsigma + divergence + (v * grad_log_p).sum(-1)
    assert residual.abs().max() < 1e-5 * (1 + dlogp_dsigma.abs().max())


def test_ode_carries_noise_to_the_data_distribution(flow):
    # the exact ODE pushes N(0, I) to the mixture: its samples' mean and covariance match the mixture's
    z = rk4(flow.velocity, torch.randn(1000, flow.dim, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64), flow_sigmas(60))  # fmt: skip
    data = flow.sample_data(200_000, seed=4)
    torch.testing.assert_close(z.mean(0), data.mean(0), rtol=0, atol=0.15)
    torch.testing.assert_close(torch.cov(z.T), torch.cov(data.T), rtol=0, atol=0.15)


def _grid(n, start=0.95, end=0.05):
    return [start + (end - start) * i / n for i in range(n + 1)]


def test_euler_is_first_order_and_dpm_solver_pp_2m_second_order():
    # Away from the ends (log-SNR is infinite at sigma = 0 and 1, so the uniform-sigma grid's log-SNR steps do not
    # shrink there) and with components wide enough for 20 steps to be in the asymptotic regime
    flow = GaussianMixtureFlow.random(dim=3, components=4, seed=0, stds=(0.2, 0.5))
    z0 = torch.randn(16, flow.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = rk4(flow.velocity, z0, _grid(160))
    assert rms(rk4(flow.velocity, z0, _grid(80)), reference) < 1e-6  # the reference has converged
    for solver, order in ((euler, 1.0), (dpm_solver_pp_2m, 2.0)):
        errors = [rms(solver(flow.velocity, z0, _grid(n)), reference) for n in (20, 40, 80)]
        slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
        assert all(abs(slope - order) < 0.2 for slope in slopes), (solver.__name__, slopes)


def test_dpm_solver_pp_2m_beats_euler_on_the_pipelines_grid(flow):
    # on the bundled pipelines' sigma grid (1 -> 0) at 10 and 25 steps, against a fine RK4 solution
    z0 = torch.randn(32, flow.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    reference = rk4(flow.velocity, z0, flow_sigmas(400))
    for n in (10, 25):
        grid = flow_sigmas(n)
        assert rms(dpm_solver_pp_2m(flow.velocity, z0, grid), reference) < 0.6 * rms(euler(flow.velocity, z0, grid),
                                                                                      reference)  # fmt: skip
