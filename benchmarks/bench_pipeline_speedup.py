"""Wall-clock speedup of FluxPipeline with MeanCache at B = 25, 17, 10 of 50 steps, against the uncached run.

Two sizes of the same random-weight FLUX architecture: ``tiny`` (the test model, where the per-step cost
outside the transformer is a visible share) and ``demo`` (the demo's model, where the transformer
dominates). Results: ``benchmarks/results/pipeline_speedup.json``, with the ratio to the ideal N / B.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.helpers import FLUX_SIZES, flux_pipeline, write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.testing import tiny_inputs

STEPS = 50
BUDGETS = (50, 25, 17, 10)  # 50: every step computed, no cache
_timings: dict[str, dict[int, float]] = {}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", FLUX_SIZES)
def test_flux_pipeline(benchmark, size, budget):
    pipe, inputs = flux_pipeline(size), tiny_inputs("flux", size=FLUX_SIZES[size]["size"])
    if budget < STEPS:
        enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", budget)))

    def generate():
        with torch.inference_mode():
            pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")

    try:
        benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    finally:
        if budget < STEPS:
            disable_mean_cache(pipe)
    _timings.setdefault(size, {})[budget] = benchmark.stats.stats.median


def teardown_module() -> None:
    rows = []
    for size, by_budget in _timings.items():
        full = by_budget.get(STEPS)
        for budget, seconds in sorted(by_budget.items(), reverse=True):
            speedup = full / seconds if full else None
            ideal = STEPS / budget
            rows.append({
                "size": size, "budget": budget, "median_s": seconds, "speedup": speedup, "ideal_speedup": ideal,
                "ratio_to_ideal": speedup / ideal if speedup else None,
            })  # fmt: skip
    if rows:
        write_results(
            "pipeline_speedup", {"benchmark": "FluxPipeline, 50 steps, MeanCache qwen-image tables", "rows": rows}
        )
