"""Wall time of the demo-size random-weight FluxPipeline (50 steps) on 1 rank and on 2 ranks with Ulysses
context parallelism (cache-dit's ``ParallelismConfig(ulysses_size=2)``, gloo over loopback), uncached and with
MeanCache at B = 10.

Every rank is a spawned process with one torch thread; the 1-rank rows run the plain pipeline in one such process.
Each generation is timed inside the ranks (after a barrier, the slowest rank's time counts): one warm-up, then
the median of ``ROUNDS``. pytest-benchmark's own number for each test is the whole spawn (start-up included); the
per-generation medians are in ``benchmarks/results/context_parallel.json``. On a 2-core CPU machine two ranks
share the cores, so the parallel speedup says little about GPUs; the point is that MeanCache's skip ratio
survives context parallelism.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from benchmarks.helpers import FLUX_SIZES, flux_pipeline, write_results
from meancache import MeanCacheConfig, disable_mean_cache, enable_mean_cache, summary
from meancache.testing import tiny_inputs
from tests.parallel_ranks import count_block_calls, enable_ulysses_cache_dit, init_ranks, run_ranks

STEPS = 50
BUDGET = 10
ROUNDS = 3
TIMEOUT_S = 1200.0
_rows: list[dict[str, Any]] = []


def _timed_generations(rank: int, world_size: int, rendezvous: str) -> list[dict[str, Any]]:
    """One rank: uncached, then MeanCache, each ``1 + ROUNDS`` generations, timed between barriers."""
    init_ranks(rank, world_size, rendezvous, timeout_s=600.0)
    try:
        pipe = flux_pipeline("demo")
        if world_size > 1:
            enable_ulysses_cache_dit(pipe, world_size)
        blocks = count_block_calls(pipe.transformer)
        inputs = tiny_inputs("flux", size=FLUX_SIZES["demo"]["size"])
        rows = []
        for budget in (STEPS, BUDGET):
            if budget < STEPS:
                enable_mean_cache(pipe, MeanCacheConfig(budget=budget))
            seconds = []
            for _ in range(1 + ROUNDS):
                blocks.clear()
                dist.barrier()
                start = time.perf_counter()
                with torch.inference_mode():
                    pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                         output_type="latent")  # fmt: skip
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                seconds.append(elapsed.item())
            calls = summary(pipe).transformer_calls if budget < STEPS else STEPS
            if budget < STEPS:
                disable_mean_cache(pipe)
            rows.append({
                "ranks": world_size, "budget": budget, "median_s": statistics.median(seconds[1:]),
                "rounds_s": seconds[1:], "transformer_calls_per_rank": calls,
                "block_calls_per_rank": sum(blocks.values()),
            })  # fmt: skip
        return rows
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
def test_flux_context_parallel(benchmark, world_size):
    pytest.importorskip("cache_dit")
    ranks = benchmark.pedantic(
        run_ranks, args=(_timed_generations, world_size, TIMEOUT_S), rounds=1, iterations=1, warmup_rounds=0
    )
    assert all(rank == ranks[0] for rank in ranks[1:])  # every rank reports the slowest rank's times
    _rows.extend(ranks[0])


def teardown_module() -> None:
    if not _rows:
        return
    by_key = {(row["ranks"], row["budget"]): row for row in _rows}
    for row in _rows:
        uncached = by_key.get((row["ranks"], STEPS))
        one_rank = by_key.get((1, row["budget"]))
        row["speedup_vs_uncached_same_ranks"] = uncached["median_s"] / row["median_s"] if uncached else None
        row["ideal_speedup"] = STEPS / row["budget"]
        row["speedup_vs_one_rank_same_budget"] = one_rank["median_s"] / row["median_s"] if one_rank else None
    write_results(
        "context_parallel",
        {
            "benchmark": "demo-size FluxPipeline, 50 steps, 1 rank vs 2 ranks (cache-dit Ulysses, gloo on CPU), "
            "uncached vs MeanCache budget=10; one torch thread per rank; per-generation wall time measured in the "
            "ranks (slowest rank), median of 3 after 1 warm-up",
            "torch_threads_per_rank": 1,
            "rows": _rows,
        },
    )
