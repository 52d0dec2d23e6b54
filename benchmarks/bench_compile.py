"""MeanCache on a compiled transformer: the demo-size FluxPipeline, 50 steps, eager and
``pipe.transformer.compile(fullgraph=True)`` (inductor), uncached and with MeanCache at B = 25, 17, 10, in one run.

Per mode, the four budgets are timed interleaved (each round runs every budget once, in turn, so a change in
the machine's speed touches all of them alike; median of 5 rounds; denoising loop only, ``output_type="latent"``).
Reported per row: the median wall time, the speedup over the uncached run of the same mode and its ratio to
the ideal N / B, the graphs compiled (after the first call and after all timed generations: a recompile
would show), the first call's time, and the cost of a skipped step: the median pipeline step with the
transformer skipped, next to the median computed step and the scheduler's own ``step`` on the same latents.
Results: ``benchmarks/results/compile.json``.
"""

from __future__ import annotations

import itertools
import statistics
import time

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.helpers import FLUX_SIZES, write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.testing import tiny_inputs, tiny_pipeline

STEPS = 50
BUDGETS = (50, 25, 17, 10)  # 50: every step computed, no cache
ROUNDS = 5
SIZE = "demo"
_rows: list[dict] = []


def _generate(pipe, inputs, budget: int, step_ends: list[float]) -> torch.Tensor:
    """One generation at ``budget`` (MeanCache on for budget < STEPS), recording when each step ended."""

    def record(_pipe, _i, _t, kwargs):
        step_ends.append(time.perf_counter())
        return kwargs

    if budget < STEPS:
        enable_mean_cache(pipe, MeanCacheConfig(Schedule.preset("qwen-image", budget)))
    try:
        step_ends.append(time.perf_counter())
        return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent", callback_on_step_end=record).images  # fmt: skip
    finally:
        if budget < STEPS:
            disable_mean_cache(pipe)


def _scheduler_step_seconds(pipe, latents: torch.Tensor) -> float:
    """The median time of the scheduler's own ``step`` on latents of this run's shape."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    times = []
    for t in scheduler.timesteps[:-1]:
        start = time.perf_counter()
        scheduler.step(latents, t, latents)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_flux_pipeline(benchmark, mode):
    pipe = tiny_pipeline("flux", width=FLUX_SIZES[SIZE]["width"])
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("flux", size=FLUX_SIZES[SIZE]["size"])
    counter = None
    if mode == "compiled":
        counter = CompileCounterWithBackend("inductor")
        pipe.transformer.compile(fullgraph=True, backend=counter)
    start = time.perf_counter()
    latents = _generate(pipe, inputs, STEPS, [])  # the first call (compiles, if compiled)
    first_call = time.perf_counter() - start
    graphs_after_first_call = counter.frame_count if counter else None
    seconds: dict[int, list[float]] = {b: [] for b in BUDGETS}
    step_ends: dict[int, list[float]] = {}

    def interleaved_rounds() -> None:
        for _ in range(ROUNDS):
            for budget in BUDGETS:
                ends: list[float] = []
                _generate(pipe, inputs, budget, ends)
                seconds[budget].append(ends[-1] - ends[0])
                step_ends[budget] = ends

    benchmark.pedantic(interleaved_rounds, rounds=1, iterations=1)
    scheduler_step = _scheduler_step_seconds(pipe, latents)
    full = statistics.median(seconds[STEPS])
    for budget in BUDGETS:
        durations = [b - a for a, b in itertools.pairwise(step_ends[budget])]
        computed = set(Schedule.preset("qwen-image", budget).compute_steps) if budget < STEPS else set(range(STEPS))
        skipped = [d for i, d in enumerate(durations) if i not in computed]
        median = statistics.median(seconds[budget])
        _rows.append({
            "mode": mode, "budget": budget, "median_s": median, "speedup": full / median,
            "ideal_speedup": STEPS / budget, "ratio_to_ideal": full / median / (STEPS / budget),
            "graphs_after_first_call": graphs_after_first_call,
            "graphs_after_timed_runs": counter.frame_count if counter else None,
            "first_call_s": first_call if budget == STEPS else None,
            "computed_step_median_ms": 1e3 * statistics.median(d for i, d in enumerate(durations) if i in computed),
            "skipped_step_median_ms": 1e3 * statistics.median(skipped) if skipped else None,
            "skipped_step_overhead_ms": 1e3 * (statistics.median(skipped) - scheduler_step) if skipped else None,
            "scheduler_step_median_ms": 1e3 * scheduler_step,
        })  # fmt: skip


def teardown_module() -> None:
    eager_full = next((r["median_s"] for r in _rows if r["mode"] == "eager" and r["budget"] == STEPS), None)
    for row in _rows:
        row["speedup_over_eager_uncached"] = eager_full / row["median_s"] if eager_full else None
    if _rows:
        write_results("compile", {
            "benchmark": f"FluxPipeline ({SIZE} size, 4096 image tokens), {STEPS} steps, denoising loop only; "
                         "MeanCache on the qwen-image tables; compiled = transformer.compile(fullgraph=True), "
                         f"inductor; per mode the budgets interleaved, median of {ROUNDS} rounds",
            "rows": _rows,
        })  # fmt: skip
