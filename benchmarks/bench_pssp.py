"""PSSP solver time: N = 50 steps, Kmax = 6 spans, every budget 2..50, at max gap 8 and unbounded.
Results: ``benchmarks/results/pssp_solver.json``."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.helpers import write_results
from meancache.schedule.pssp import solve_pssp

_rows: list[dict] = []


@pytest.mark.parametrize("max_gap", [8, None])
def test_every_budget(benchmark, max_gap):
    costs = np.random.default_rng(0).uniform(size=(50, 50, 6))
    lowest = 2 if max_gap is None else 8  # smaller budgets cannot span 49 steps with gaps <= 8

    def solve_all():
        return [solve_pssp(costs, b, gamma=2.0, max_gap=max_gap) for b in range(lowest, 51)]

    schedules = benchmark.pedantic(solve_all, rounds=20, warmup_rounds=2)
    assert [s.budget for s in schedules] == list(range(lowest, 51))
    _rows.append({"max_gap": max_gap, "budgets": f"{lowest}..50", "median_s_all_budgets": benchmark.stats.stats.median})


def teardown_module() -> None:
    if _rows:
        write_results("pssp_solver", {"benchmark": "solve_pssp, N=50, Kmax=6, gamma=2", "rows": _rows})
