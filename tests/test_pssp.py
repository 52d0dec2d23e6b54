import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meancache.schedule.pssp import solve_pssp


def _paths(n, budget, max_gap):
    for middle in itertools.combinations(range(1, n - 1), budget - 2):
        path = (0, *middle, n - 1)
        if all(b - a <= max_gap for a, b in itertools.pairwise(path)):
            yield path


def _edge(costs, i, j):
    return 0.0 if j == i + 1 else float(np.min(costs[i, j]))


def _objective(costs, path, gamma):
    return sum(_edge(costs, i, j) ** gamma for i, j in itertools.pairwise(path))


def _worst(costs, path):
    return max(_edge(costs, i, j) for i, j in itertools.pairwise(path))


@st.composite
def instances(draw):
    n = draw(st.integers(3, 12))
    kmax = draw(st.integers(1, min(4, n)))  # spans K <= N
    budget = draw(st.integers(2, n))
    max_gap = draw(st.integers(max(1, math.ceil((n - 1) / (budget - 1))), n - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    costs = rng.uniform(0.0, 3.0, size=(n, n, kmax))
    forbid = rng.uniform(size=(n, n, kmax)) < draw(st.sampled_from([0.0, 0.2]))
    costs[forbid] = np.inf
    return costs, budget, max_gap


@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_matches_brute_force(instance, gamma):
    costs, budget, max_gap = instance
    n = costs.shape[0]
    feasible = [p for p in _paths(n, budget, max_gap) if math.isfinite(_objective(costs, p, 1.0))]
    if not feasible:
        with pytest.raises(ValueError, match="no schedule with"):
            solve_pssp(costs, budget, gamma=gamma, max_gap=max_gap)
        return
    schedule = solve_pssp(costs, budget, gamma=gamma, max_gap=max_gap)
    path = schedule.compute_steps
    assert schedule.budget == budget and path[0] == 0 and path[-1] == n - 1
    assert all(b - a <= max_gap for a, b in itertools.pairwise(path))
    best = min(_objective(costs, p, gamma) for p in feasible)
    assert _objective(costs, path, gamma) == pytest.approx(best, rel=1e-9, abs=1e-12)
    for (i, j), span in zip(itertools.pairwise(path), schedule.spans, strict=True):  # spans are each edge's argmin K
        assert span == 1 if j == i + 1 else costs[i, j, span - 1] == np.min(costs[i, j])


def test_gamma_one_is_the_budgeted_shortest_path():
    rng = np.random.default_rng(3)
    costs = rng.uniform(0, 1, size=(10, 10, 3))
    schedule = solve_pssp(costs, 5, gamma=1.0)
    best = min(_objective(costs, p, 1.0) for p in _paths(10, 5, 9))
    assert schedule.metadata["total_edge_cost"] == pytest.approx(best)


@pytest.mark.parametrize("seed", range(5))
def test_large_gamma_minimises_the_worst_edge(seed):
    rng = np.random.default_rng(seed)
    costs = rng.uniform(0.2, 1.0, size=(11, 11, 2))
    schedule = solve_pssp(costs, 4, gamma=60.0)
    assert _worst(costs, schedule.compute_steps) == min(_worst(costs, p) for p in _paths(11, 4, 10))
    # and that is not what gamma = 1 picks on every instance: the objectives really differ
    assert schedule.metadata["worst_edge_cost"] <= solve_pssp(costs, 4, gamma=1.0).metadata["worst_edge_cost"]


def test_full_budget_and_the_smallest_budget():
    costs = np.ones((6, 6, 2))
    assert solve_pssp(costs, 6).compute_steps == tuple(range(6))
    assert solve_pssp(costs, 2).compute_steps == (0, 5)


def test_the_schedule_is_usable():
    costs = np.random.default_rng(0).uniform(size=(50, 50, 5))
    schedule = solve_pssp(costs, 10, max_gap=8)
    assert schedule.num_steps == 50 and schedule.budget == 10 and max(schedule.spans) <= 5
    assert schedule.metadata["source"] == "pssp" and schedule.metadata["max_gap"] == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"costs": np.ones((5, 4, 2))}, r"shape \(N, N, Kmax\)"),
        ({"costs": np.ones((5, 5))}, r"shape \(N, N, Kmax\)"),
        ({"costs": np.ones((5, 5, 6))}, r"spans up to Kmax = 6, but a 5-step schedule allows at most 5"),
        ({"gamma": float("nan")}, "gamma must be a finite number >= 1"),
        ({"budget": 1}, r"budget must be an integer in \[2, 5\]"),
        ({"budget": 6}, r"budget must be an integer in \[2, 5\]"),
        ({"gamma": 0.5}, "gamma must be a finite number >= 1"),
        ({"gamma": float("inf")}, "gamma must be a finite number >= 1"),
        ({"max_gap": 0}, "max_gap must be an integer >= 1"),
        ({"budget": 2, "max_gap": 2}, "needs at least 3 computed steps"),
    ],
)
def test_bad_inputs_get_clear_errors(kwargs, message):
    args = {"costs": np.ones((5, 5, 2)), "budget": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        solve_pssp(**args)


def test_nan_and_negative_costs_are_refused_but_ignored_entries_are_not_read():
    costs = np.ones((5, 5, 2))
    costs[0, 1] = np.nan  # a unit edge: ignored
    costs[3, 1] = -1.0  # j < i: ignored
    solve_pssp(costs, 3)
    costs[1, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"costs\[1, 3, 1\] is NaN"):
        solve_pssp(costs, 3)
    costs[1, 3, 1] = -0.5
    with pytest.raises(ValueError, match=r"costs must be >= 0.*costs\[1, 3, 1\] = -0.5"):
        solve_pssp(costs, 3)


def test_forbidden_edges_make_an_instance_infeasible():
    costs = np.full((6, 6, 1), np.inf)
    with pytest.raises(ValueError, match="no schedule with 3 computed steps"):
        solve_pssp(costs, 3)


def test_every_budget_for_50_steps_is_fast():
    costs = np.random.default_rng(1).uniform(size=(50, 50, 6))
    start = time.perf_counter()
    schedules = [solve_pssp(costs, b, gamma=2.0, max_gap=49) for b in range(2, 51)]
    assert [s.budget for s in schedules] == list(range(2, 51))
    assert time.perf_counter() - start < 30  # a sanity bound only; benchmarks/ measures the time


def test_numpy_scalars_are_accepted_as_gamma():
    costs = np.random.default_rng(0).uniform(size=(8, 8, 2))
    schedule = solve_pssp(costs, 4, gamma=np.float32(2.0))
    assert schedule == solve_pssp(costs, 4, gamma=2.0) and type(schedule.metadata["gamma"]) is float
