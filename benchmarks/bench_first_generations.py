"""The first ten generations on an uncalibrated checkpoint: what a user who just enabled ``budget=10`` waits.

Per model (the bundled digits models with their shipped schedules hidden, as in
``bench_first_use_calibration.py``, the tiny FLUX and Qwen-Image pipelines of :mod:`meancache.testing`, and the
demo-size random-weight FLUX of ``bench_pipeline_speedup.py``, where the transformer dominates a step), from
an empty calibration store: ten generations of ten different calls (digit ``i``, seed ``i``; the tiny pipelines:
prompt seed ``i``), 50 Euler steps, each made three ways, interleaved call by call so they share the machine's
load (each pipeline warmed up by one uncached call first; the order within each pair alternates):

* the uncached pipeline (a deep copy of it: no MeanCache hook on its modules);
* ``MeanCacheConfig(budget=10)`` with its defaults: calibration on first use, progressive (the first generation
  runs in full and calibrates, the next use its schedule);
* on the bundled image models, the peers a user would otherwise enable, which skip from the first image: diffusers'
  FirstBlockCache and MagCache and cache-dit's DBCache, each at the setting of
  ``benchmarks/results/quality_<model>.json`` whose PSNR is closest to MeanCache's mean over these ten (MagCache's
  magnitude ratios come from its own calibration mode on the calibration seeds before timing, not counted).

and, for the bound on what any method can reach here, the uncached copy run with ``num_inference_steps=B`` (Euler on
B steps: B transformer evaluations and nothing else per generation) interleaved with the two above.

``speedup_first_ten`` is the uncached pipeline's total wall time over the method's, denoising and decoding included;
``speedup_first_ten_cpu`` the same in this process's CPU time, which other work on a loaded machine disturbs less
(both are written with the load average; on a quiet machine they agree).
``bound_first_ten`` is the uncached total over the uncached first generation plus the B-step Euler runs of
generations 2-10: no method whose first generation is bit-identical to the uncached run, or calibrated from a full
trajectory at these settings, and whose others evaluate the transformer B times can be faster over the ten (a
generation calibrated before it runs costs a full trajectory plus its own B evaluations, more than the full
generation it replaces). ``share_of_bound`` is MeanCache's speedup over it.
Each MeanCache generation is also compared with the uncached one of the same call: a full generation must be
bit-identical to the uncached run of the same pipeline object; the others get their PSNR against the uncached copy's
output (what the first ten look like). Each peer runs on its own copy of the pipeline, switched on around each of
its runs. Results:
``benchmarks/results/first_generations_<model>.json``.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.helpers import FLUX_SIZES, RESULTS_DIR, write_results
from benchmarks.quality_peers import BlockCache, block_caches, magcache_ratios
from meancache import MeanCacheConfig, disable_mean_cache, enable_mean_cache, summary
from meancache.models import DigitsModel, load_digits_model
from meancache.models.quality import image_metrics
from meancache.models.train import calibration_calls
from meancache.schedule import defaults
from meancache.testing import tiny_inputs, tiny_pipeline

STEPS, BUDGET, GENERATIONS = 50, 10, 10
PEER_FAMILIES = ("diffusers FirstBlockCache", "diffusers MagCache", "cache-dit DBCache")
BOUND = f"bound: generation 1 uncached, then Euler on {BUDGET} steps"
CEILING = f"ceiling: Euler on {BUDGET} steps from generation 1"
MODELS = ("digits-flux", "digits-qwen", "digits-video", "tiny-flux", "tiny-qwen-image", "demo-flux")


def _setup(name: str) -> tuple[Any, DigitsModel | None, list[dict[str, Any]]]:
    """The pipeline (shipped schedules hidden), the bundled model it comes from (None: a tiny pipeline) and the ten
    calls."""
    model = None
    if name == "demo-flux":
        pipe = tiny_pipeline("flux", width=FLUX_SIZES["demo"]["width"])
        calls = [{**tiny_inputs("flux", seed=i, size=FLUX_SIZES["demo"]["size"]), "generator": i}
                 for i in range(GENERATIONS)]  # fmt: skip
    elif name.startswith("tiny-"):
        kind = name.removeprefix("tiny-")
        pipe = tiny_pipeline(kind)
        calls = [{**tiny_inputs(kind, seed=i), "generator": i} for i in range(GENERATIONS)]
    else:
        model = load_digits_model(name)
        pipe = model.pipe
        calls = [{**model.inputs([i % 10]), "generator": i} for i in range(GENERATIONS)]
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=f"benchmark/{name}-schedules-hidden")
    return pipe, model, calls


def _generate(pipe: Any, call: dict[str, Any], steps: int = STEPS) -> tuple[np.ndarray, tuple[float, float]]:
    """One generation, decoded (images ``(N, H, W)`` or videos ``(N, T, H, W)``: the first channel), and its wall
    time and this process's CPU time (every thread's: less disturbed by other work on the machine)."""
    kwargs = {**call, "generator": torch.Generator().manual_seed(call["generator"])}
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = pipe(**kwargs, num_inference_steps=steps, output_type="np", return_dict=False)[0]
    return np.asarray(output, dtype=np.float32)[..., 0], (time.perf_counter() - wall, time.process_time() - cpu)


def _peer_settings(name: str, model: DigitsModel | None, target_psnr: float) -> list[BlockCache]:
    """Per peer family, the setting whose PSNR in the quality benchmark is closest to ``target_psnr`` (the bundled
    image models: the quality benchmark has no block-cache rows for the others)."""
    path = RESULTS_DIR / f"quality_{name}.json"
    if model is None or model.recipe.frames > 1 or not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    ratios = magcache_ratios(model.pipe, calibration_calls(model), STEPS)
    by_method = {cache.method: cache for cache in block_caches(STEPS, ratios)}
    chosen = []
    for family in PEER_FAMILIES:
        measured = [r for r in rows if r["family"] == family and r["method"] in by_method]
        if measured:
            best = min(measured, key=lambda r: abs(r["psnr"] - target_psnr))
            chosen.append(by_method[best["method"]])
    return chosen


def _totals(method: str, timings: list[tuple[float, float]]) -> dict[str, Any]:
    """A row of the ten generations' total wall and CPU time."""
    return {"method": method, "seconds_first_ten": float(sum(t[0] for t in timings)),
            "cpu_seconds_first_ten": float(sum(t[1] for t in timings))}  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_first_generations(benchmark, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / "home"))  # an empty store: an uncalibrated checkpoint
    monkeypatch.setattr(defaults, "MODEL_FAMILIES", {})  # digits-qwen's transformer would get Qwen-Image's presets
    pipe, model, calls = _setup(name)
    uncached = copy.deepcopy(pipe)

    def measure() -> dict[str, Any]:
        # bit-identity is checked against the same pipeline object (a copy may round differently in the last bit)
        first_uncached = _generate(pipe, calls[0])[0]  # also warms this pipeline up, as the next line the copy
        _generate(uncached, calls[0])
        enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET))
        seconds: dict[str, list[tuple[float, float]]] = {"uncached": [], "meancache": [], BOUND: [], CEILING: []}
        generations = []
        for index, call in enumerate(calls):  # the order within each pair alternates
            if index % 2:
                images, seconds_meancache = _generate(pipe, call)
                reference, seconds_uncached = _generate(uncached, call)
            else:
                reference, seconds_uncached = _generate(uncached, call)
                images, seconds_meancache = _generate(pipe, call)
            seconds["uncached"].append(seconds_uncached)
            seconds["meancache"].append(seconds_meancache)
            seconds_budget = _generate(uncached, call, BUDGET)[1]
            seconds[BOUND].append(seconds_uncached if index == 0 else seconds_budget)
            seconds[CEILING].append(seconds_budget)
            report = summary(pipe)
            full = report.computed_steps == STEPS
            if full:  # in the first ten, only the first generation runs in full
                assert index == 0 and np.array_equal(images, first_uncached), f"generation {index} ran in full"
            psnr = float("inf") if full else float(image_metrics(images, reference)[0])
            generations.append({"generation": index + 1, "computed_steps": report.computed_steps, "psnr": psnr,
                                "estimator": report.estimator,
                                "source": report.schedule.metadata.get("source", "")})  # fmt: skip
        disable_mean_cache(pipe)
        cached_psnr = [g["psnr"] for g in generations if np.isfinite(g["psnr"])]
        mean_psnr = float(np.mean(cached_psnr)) if cached_psnr else float("inf")
        rows = [_totals(method, values) for method, values in seconds.items()]
        peers = _peer_settings(name, model, mean_psnr)
        if peers:  # a second pass: the peers, interleaved call by call with the uncached pipeline again
            again: dict[str, list[tuple[float, float]]] = {"uncached (second pass)": []} | {c.method: [] for c in peers}
            copies = {cache.method: copy.deepcopy(uncached) for cache in peers}  # each on its own pipeline
            for cache in peers:  # warmed up like the others
                _generate(copies[cache.method], calls[0])
            for call in calls:
                again["uncached (second pass)"].append(_generate(uncached, call)[1])
                for cache in peers:  # switched on around its own run only: cache-dit patches the pipeline class
                    cache.enable(copies[cache.method])
                    try:
                        again[cache.method].append(_generate(copies[cache.method], call)[1])
                    finally:
                        cache.disable(copies[cache.method])
            rows += [{**_totals(method, values), "pass": 2} for method, values in again.items()]
            seconds |= again
        baselines = {row.get("pass", 1): row for row in rows if row["method"].startswith("uncached")}
        for row in rows:
            baseline = baselines[row.get("pass", 1)]
            row["speedup_first_ten"] = baseline["seconds_first_ten"] / row["seconds_first_ten"]
            row["speedup_first_ten_cpu"] = baseline["cpu_seconds_first_ten"] / row["cpu_seconds_first_ten"]
        bound, ceiling = (next(row for row in rows if row["method"] == method) for method in (BOUND, CEILING))
        return {"model": name, "steps": STEPS, "budget": BUDGET, "generations": generations,
                "meancache_mean_psnr_cached_generations": mean_psnr,
                "speedup_first_ten": rows[1]["speedup_first_ten"],
                "speedup_first_ten_cpu": rows[1]["speedup_first_ten_cpu"],
                "bound_first_ten": bound["speedup_first_ten"], "bound_first_ten_cpu": bound["speedup_first_ten_cpu"],
                "share_of_bound": rows[1]["speedup_first_ten"] / bound["speedup_first_ten"],
                "ceiling_first_ten": ceiling["speedup_first_ten"],
                "ceiling_first_ten_cpu": ceiling["speedup_first_ten_cpu"], "rows": rows,
                "seconds_per_generation": seconds}  # fmt: skip

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    write_results(f"first_generations_{name}", result)
