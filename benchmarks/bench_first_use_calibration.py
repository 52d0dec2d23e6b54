"""Calibrate on first use against the shipped, validated schedules, on the bundled digits models.

For each bundled model, with its shipped schedules hidden (the pipeline's ``name_or_path`` is renamed, so
``MeanCacheConfig(budget=B)`` finds no schedule in the model folder) and the presets matched by transformer
family hidden (digits-qwen runs Qwen-Image's transformer class), ``calibration_runs`` R = 1,
2, 4 and each budget B (a fresh calibration store per R and B, since the last calibrating generation selects the
schedule for its own budget): R generations of one digit each (digit ``i mod 10``, seed ``1000 + i``: disjoint
from the evaluation seeds 0-2 and the shipped calibration's 100-102) run in full while MeanCache calibrates, the
last one also selecting by replay (:mod:`meancache.calibration.replay`); then B runs the schedule
``MeanCacheConfig(budget=B, calibration_runs=R)`` resolves from the store. The same calibration's PSSP solution
with the default solver settings (what a budget gets without a replayed selection) is a row too.

Rows at B = 8, 10, 13, 17, against the full 50-step run over digits 0-9 x seeds 0-2 (PSNR, SSIM): the shipped
validated schedule, a single PSSP solution (closed-loop, gamma 2) of the shipped 30-trajectory calibration,
uniform plain reuse (K = 1), and DPM-Solver++ 2M at B steps. How much the calibration data matters: first use on
three generations of all ten digits (30 trajectories, as the shipped calibration), on the shipped calibration's
own seeds and on others, and its pick with span 1 on the second interval (the look-back from step 1 to step 0)
where it chose more. Overhead: the median wall time of a calibrating
generation over a plain generation of the same one-digit call, for the calibrating generations that only
measure costs and for the last ones, which also select by replay.
Results: ``benchmarks/results/first_use_calibration_<model>.json``.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from benchmarks.bench_quality import SEEDS, SOLVERS, STEPS
from benchmarks.helpers import write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import Calibration, calibration_store
from meancache.integrations.diffusers.first_use import SELECTED, first_use_schedule
from meancache.models import IMAGE_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES
from meancache.models.quality import image_metrics
from meancache.schedule import defaults

BUDGETS = (8, 10, 13, 17)
RUNS = (1, 2, 4)
BATCHED = ((3, (100, 101, 102)), (3, (1000, 1001, 1002)))
"""First use on 30 trajectories: R = 3 generations of all ten digits, on the shipped calibration's own seeds
(100-102) and on others."""
DPM = "fewer steps: DPM-Solver++ 2M"


@pytest.mark.parametrize("model_name", IMAGE_MODELS)
def test_first_use_calibration(benchmark, tmp_path, monkeypatch, model_name):
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=f"benchmark/{model_name}-schedules-hidden")
    monkeypatch.setattr(defaults, "MODEL_FAMILIES", {})  # digits-qwen's transformer would get Qwen-Image's presets
    shipped_calibration = Calibration.load(bundled_model_path(model_name) / "meancache_calibration.json")
    euler = pipe.scheduler

    def generate(inputs: dict, seed: int, steps: int = STEPS) -> np.ndarray:
        with torch.inference_mode():
            return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        output_type="np").images[..., 0]  # fmt: skip

    def evaluate(steps: int = STEPS) -> dict[int, np.ndarray]:
        return {seed: generate(model.inputs(CLASSES), seed, steps) for seed in SEEDS}

    def row(method: str, budget: int, images: dict, references: dict, **extra) -> dict:
        metrics = [image_metrics(images[s], references[s]) for s in SEEDS]
        return {"method": method, "budget": budget, "psnr": float(np.mean([m[0] for m in metrics])),
                "ssim": float(np.mean([m[1] for m in metrics])), **extra}  # fmt: skip

    def run_schedule(schedule: Schedule) -> dict[int, np.ndarray]:
        enable_mean_cache(pipe, MeanCacheConfig(schedule))
        try:
            return evaluate()
        finally:
            disable_mean_cache(pipe)

    def schedule_row(
        method: str, budget: int, schedule: Schedule, references: dict, images: dict | None = None
    ) -> dict:
        """``row`` of ``schedule``'s images (run here unless given), naming its computed steps and spans."""
        images = run_schedule(schedule) if images is None else images
        return row(method, budget, images, references, compute_steps=list(schedule.compute_steps),
                   spans=list(schedule.spans))  # fmt: skip

    def measure() -> tuple[list[dict], dict]:
        references = evaluate()
        rows: list[dict] = []
        seconds: dict[str, list[float]] = {"plain": [], "calibrating": [], "selecting": []}
        for _ in range(3):
            start = time.perf_counter()
            generate(model.inputs([0]), 1000)
            seconds["plain"].append(time.perf_counter() - start)
        for runs, budget in itertools.product(RUNS, BUDGETS):
            monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / f"home_R{runs}_B{budget}"))
            config = MeanCacheConfig(budget=budget, calibration_runs=runs)
            enable_mean_cache(pipe, config)
            for i in range(runs):
                start = time.perf_counter()
                generate(model.inputs([i % 10]), 1000 + i)
                seconds["selecting" if i == runs - 1 else "calibrating"].append(time.perf_counter() - start)
                assert summary(pipe).schedule.metadata["source"].startswith("calibrating on first use")
            disable_mean_cache(pipe)
            enable_mean_cache(pipe, config)
            images = evaluate()
            report = summary(pipe)
            disable_mean_cache(pipe)
            assert report.schedule.metadata["source"].startswith("calibrated on first use (validated by replay"), report
            assert report.computed_steps == budget
            rows.append(schedule_row(f"calibrate on first use, R={runs}", budget, report.schedule, references, images))
            (stored,) = calibration_store().files()
            calibration = Calibration.load(stored)
            assert calibration.trajectories == runs
            del calibration.metadata[SELECTED]
            single = first_use_schedule(calibration, budget)
            rows.append(schedule_row(f"first-use calibration R={runs}: PSSP default settings, no replay", budget,
                                     single, references))  # fmt: skip
        for (runs, seeds), budget in itertools.product(BATCHED, BUDGETS):
            monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / f"home_batched_{seeds[0]}_B{budget}"))
            enable_mean_cache(pipe, MeanCacheConfig(budget=budget, calibration_runs=runs))
            for seed in seeds:
                generate(model.inputs(CLASSES), seed)
            generate(model.inputs([0]), 0)
            schedule = summary(pipe).schedule
            disable_mean_cache(pipe)
            label = f"calibrate on first use, R={runs} generations of digits 0-9, seeds {seeds[0]}-{seeds[-1]}"
            rows.append(schedule_row(label, budget, schedule, references))
            if schedule.spans[1] != 1:
                variant = Schedule(STEPS, schedule.compute_steps, (schedule.spans[0], 1, *schedule.spans[2:]))
                rows.append(schedule_row(f"{label}, span 1 on its second interval", budget, variant, references))
        for budget in BUDGETS:
            shipped = Schedule.load(bundled_model_path(model_name) / "meancache_schedules" / f"schedule_B{budget}.json")
            single = shipped_calibration.schedule(budget, kind="closed-loop", gamma=2.0)
            for method, schedule in {
                "shipped validated schedule": shipped,
                "single PSSP solution of the shipped calibration (closed-loop, gamma 2)": single,
                "plain reuse: uniform steps": Schedule.uniform(STEPS, budget),
            }.items():
                rows.append(row(method, budget, run_schedule(schedule), references))
            pipe.scheduler = SOLVERS[DPM]()
            try:
                rows.append(row(DPM, budget, evaluate(budget), references))
            finally:
                pipe.scheduler = euler
        plain = float(np.median(seconds["plain"]))
        overhead = {f"{kind}_generation_median_s": float(np.median(values)) for kind, values in seconds.items()}
        overhead |= {f"{kind}_over_plain": overhead[f"{kind}_generation_median_s"] / plain
                     for kind in ("calibrating", "selecting")}  # fmt: skip
        return rows, overhead

    rows, overhead = benchmark.pedantic(measure, rounds=1, iterations=1)
    write_results(f"first_use_calibration_{model_name}", {
        "model": model_name, "steps": STEPS, "evaluation_seeds": list(SEEDS), "classes": CLASSES,
        "calibration_seeds": "1000 + i, digit i mod 10", "overhead": overhead, "rows": rows,
    })  # fmt: skip
