"""Calibration cost per generation relative to one plain generation (same pipeline, steps and inputs).

Two sizes of the random-weight FLUX architecture as in bench_pipeline_speedup.py. Calibration measures
both cost kinds (one-shot and closed-loop), max gap 8, spans 1..5, 50 steps. Results:
``benchmarks/results/calibration_overhead.json``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.helpers import FLUX_SIZES, flux_pipeline, write_results
from meancache.integrations.diffusers import calibrate_pipeline
from meancache.testing import tiny_inputs

STEPS = 50
_timings: dict[str, dict[str, float]] = {}


@pytest.mark.parametrize("mode", ["plain", "calibrate"])
@pytest.mark.parametrize("size", FLUX_SIZES)
def test_flux(benchmark, size, mode):
    pipe = flux_pipeline(size)
    call = {**tiny_inputs("flux", size=FLUX_SIZES[size]["size"]), "output_type": "latent"}

    def run():
        with torch.inference_mode():
            if mode == "plain":
                pipe(**call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
            else:
                calibrate_pipeline(pipe, [{**call, "generator": torch.Generator().manual_seed(0)}], STEPS)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _timings.setdefault(size, {})[mode] = benchmark.stats.stats.median


def teardown_module() -> None:
    rows = [
        {"size": size, **{f"{m}_median_s": t for m, t in by_mode.items()},
         "calibration_over_plain": by_mode["calibrate"] / by_mode["plain"] if len(by_mode) == 2 else None}
        for size, by_mode in _timings.items()
    ]  # fmt: skip
    if rows:
        write_results("calibration_overhead", {"benchmark": "calibrate_pipeline vs plain generation", "rows": rows})
