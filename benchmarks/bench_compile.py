"""MeanCache on a compiled transformer: the demo-size FluxPipeline, 50 steps, eager and
``pipe.transformer.compile(fullgraph=True)`` (inductor), uncached and with MeanCache at B = 25, 17, 10, in one run.

Reported per row: the median wall time of the denoising loop (``output_type="latent"``), the speedup over
the uncached run of the same mode and its ratio to the ideal N / B, the graphs compiled (first call and
after every timed generation: a recompile would show), the first call's time, and the cost of a skipped
step: the median pipeline step with the transformer skipped, next to the median computed step and the
scheduler's own ``step`` on the same latents. Results: ``benchmarks/results/compile.json``.
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
SIZE = "demo"
_rows: list[dict] = []
_pipes: dict[str, tuple] = {}


def _pipeline(mode: str):
    """One demo-size pipeline per mode (same weights), compiled once for ``mode == "compiled"``."""
    if mode not in _pipes:
        pipe = tiny_pipeline("flux", width=FLUX_SIZES[SIZE]["width"])
        pipe.set_progress_bar_config(disable=True)
        counter = None
        if mode == "compiled":
            counter = CompileCounterWithBackend("inductor")
            pipe.transformer.compile(fullgraph=True, backend=counter)
        _pipes[mode] = (pipe, counter)
    return _pipes[mode]


def _generate(pipe, inputs, step_ends: list[float] | None = None) -> torch.Tensor:
    def record(_pipe, _i, _t, kwargs):
        step_ends.append(time.perf_counter())
        return kwargs

    callback = record if step_ends is not None else None
    if step_ends is not None:
        step_ends.append(time.perf_counter())
    return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent", callback_on_step_end=callback).images  # fmt: skip


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


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_flux_pipeline(benchmark, mode, budget):
    pipe, counter = _pipeline(mode)
    inputs = tiny_inputs("flux", size=FLUX_SIZES[SIZE]["size"])
    if budget < STEPS:
        schedule = Schedule.preset("qwen-image", budget)
        enable_mean_cache(pipe, MeanCacheConfig(schedule))
    first_call = None
    if counter is not None and counter.frame_count == 0:
        start = time.perf_counter()
        _generate(pipe, inputs)
        first_call = time.perf_counter() - start
    graphs_before = counter.frame_count if counter else 0
    step_ends: list[float] = []
    try:
        latents = _generate(pipe, inputs, step_ends)  # also the warm-up
        benchmark.pedantic(_generate, args=(pipe, inputs), rounds=5, warmup_rounds=0)
    finally:
        if budget < STEPS:
            disable_mean_cache(pipe)
    durations = [b - a for a, b in itertools.pairwise(step_ends)]
    computed = set(schedule.compute_steps) if budget < STEPS else set(range(STEPS))
    _rows.append({
        "mode": mode, "budget": budget, "median_s": benchmark.stats.stats.median,
        "graphs": counter.frame_count if counter else None,
        "new_graphs_while_timed": (counter.frame_count - graphs_before) if counter else None,
        "first_call_s": first_call,
        "computed_step_median_ms": 1e3 * statistics.median(d for i, d in enumerate(durations) if i in computed),
        "skipped_step_median_ms": (
            1e3 * statistics.median(d for i, d in enumerate(durations) if i not in computed) if budget < STEPS else None
        ),
        "scheduler_step_median_ms": 1e3 * _scheduler_step_seconds(pipe, latents),
    })  # fmt: skip


def teardown_module() -> None:
    full = {row["mode"]: row["median_s"] for row in _rows if row["budget"] == STEPS}
    for row in _rows:
        row["speedup"] = full[row["mode"]] / row["median_s"] if row["mode"] in full else None
        row["ideal_speedup"] = STEPS / row["budget"]
        row["ratio_to_ideal"] = row["speedup"] / row["ideal_speedup"] if row["speedup"] else None
        if row["skipped_step_median_ms"] is not None:
            row["skipped_step_overhead_ms"] = row["skipped_step_median_ms"] - row["scheduler_step_median_ms"]
    if "eager" in full and "compiled" in full:
        for row in _rows:
            row["speedup_over_eager_uncached"] = full["eager"] / row["median_s"]
    if _rows:
        write_results("compile", {
            "benchmark": f"FluxPipeline ({SIZE} size, 4096 image tokens), {STEPS} steps, denoising loop only; "
                         "MeanCache on the qwen-image tables; compiled = transformer.compile(fullgraph=True), inductor",
            "rows": _rows,
        })  # fmt: skip
