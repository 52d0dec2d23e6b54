r"""Peak-Suppressed Shortest Path (PSSP): the budgeted schedule search of MeanCache.

Nodes are the sampler steps ``0 .. N-1``; a path ``0 = c_0 < c_1 < ... < c_{B-1} = N-1`` computes those
``B`` steps and skips the rest. An edge ``i -> j`` with ``j >= i + 2`` skips ``i+1 .. j-1`` using span ``K``
at cost ``costs[i, j, K-1]``; unit edges ``i -> i+1`` skip nothing and cost 0. With peak exponent
``gamma >= 1`` the solver finds, exactly,

.. math::

    \min_{\text{paths, } B \text{ nodes}} \sum_{(i \to j) \in \text{path}}
        \Big(\min_K \text{costs}[i, j, K-1]\Big)^{\gamma}

(parallel edges collapse to their cheapest span because ``x -> x^gamma`` is monotone). ``gamma = 1`` is a
budgeted shortest path; a large ``gamma`` approaches minimising the worst edge. Costs are divided by the
largest finite cost before the power (which changes no argmin), so large ``gamma`` does not overflow.
Dynamic programming over (node, nodes used): ``O(B N^2)`` with vectorised rows.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any

import numpy as np

from meancache.schedule.schedule import Schedule


def solve_pssp(costs: Any, budget: int, gamma: float = 2.0, max_gap: int | None = None) -> Schedule:
    """The optimal ``budget``-node schedule for ``costs`` of shape ``(N, N, Kmax)`` (see the module docstring).

    Entries with ``j <= i + 1`` are ignored; ``inf`` forbids an edge; ``max_gap`` (default: none) bounds
    ``j - i``; ``Kmax <= N`` (as :class:`Schedule` requires of spans). Spans are the argmin ``K`` of each edge
    (1 on unit edges).
    """
    table = np.asarray(costs, dtype=np.float64)
    if table.ndim != 3 or table.shape[0] != table.shape[1] or table.shape[2] < 1:
        raise ValueError(f"costs must have shape (N, N, Kmax) with Kmax >= 1, got {table.shape}")
    n = table.shape[0]
    if n < 1:
        raise ValueError("costs describe no steps (N = 0)")
    if table.shape[2] > n:
        raise ValueError(f"costs have spans up to Kmax = {table.shape[2]}, but a {n}-step schedule allows at most {n}")
    lowest = min(2, n)
    if isinstance(budget, bool) or not isinstance(budget, int) or not lowest <= budget <= n:
        raise ValueError(f"budget must be an integer in [{lowest}, {n}] for {n} steps, got {budget!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (math.isfinite(gamma) and gamma >= 1):
        raise ValueError(f"gamma must be a finite number >= 1 (1: budgeted shortest path), got {gamma!r}")
    gamma = float(gamma)  # numpy scalars too; the metadata stays JSON
    if max_gap is None:
        max_gap = max(n - 1, 1)
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 1:
        raise ValueError(f"max_gap must be an integer >= 1 or None, got {max_gap!r}")

    i_idx, j_idx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    usable = (j_idx >= i_idx + 2) & (j_idx - i_idx <= max_gap)
    considered = table[usable]
    if np.isnan(considered).any():
        i, j, k = np.argwhere(np.isnan(table) & usable[..., None])[0]
        raise ValueError(f"costs[{i}, {j}, {k}] is NaN; use inf to forbid an edge")
    if (considered < 0).any():
        i, j, k = np.argwhere((table < 0) & usable[..., None])[0]
        raise ValueError(f"costs must be >= 0 (they are deviations), costs[{i}, {j}, {k}] = {table[i, j, k]}")

    best_k = np.argmin(table, axis=2)
    edge = np.where(usable, np.min(table, axis=2), np.inf)
    finite = edge[np.isfinite(edge)]
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    weight = np.where(np.isfinite(edge), (edge / scale) ** gamma, np.inf)
    unit = j_idx == i_idx + 1
    weight[unit] = 0.0

    # value[j]: best objective of a path 0 -> j with `count` nodes; parent[count][j]: its previous node.
    value = np.full(n, np.inf)
    value[0] = 0.0
    parents = []
    for _ in range(budget - 1):
        candidates = value[:, None] + weight
        parents.append(np.argmin(candidates, axis=0))
        value = candidates[parents[-1], np.arange(n)]
    if n > 1 and not math.isfinite(value[n - 1]):
        raise ValueError(
            f"no schedule with {budget} computed steps reaches step {n - 1}: with max_gap {max_gap} it needs at "
            f"least {math.ceil((n - 1) / max_gap) + 1} computed steps, and forbidden (inf) edges may remove more"
        )
    steps = [n - 1]
    for parent in reversed(parents):
        steps.append(int(parent[steps[-1]]))
    steps.reverse()
    spans = tuple(1 if j == i + 1 else int(best_k[i, j]) + 1 for i, j in itertools.pairwise(steps))
    skip_costs = [float(edge[i, j]) for i, j in itertools.pairwise(steps) if j > i + 1]
    metadata = {
        "source": "pssp",
        "gamma": gamma,
        "max_gap": max_gap,
        "worst_edge_cost": max(skip_costs, default=0.0),
        "total_edge_cost": sum(skip_costs),
    }
    return Schedule(n, tuple(steps), spans, metadata)
