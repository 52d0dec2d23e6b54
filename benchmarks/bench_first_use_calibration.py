"""Calibrate on first use against the shipped, validated schedules, on the bundled digits models.

For each bundled model, with its shipped schedules hidden (the pipeline's ``name_or_path`` is renamed, so
``MeanCacheConfig(budget=B)`` finds no schedule in the model folder) and the presets matched by transformer
family hidden (digits-qwen runs Qwen-Image's transformer class), ``calibration_runs`` R = 1, 2, 4 (digits-video:
the default only) and five calibration draws (a fresh calibration store each): R generations of one digit each
(draw ``d``, generation ``i``: digit ``(2 d + i) mod 10``, seed ``1000 + 100 d + i``; draw 0 is digits 0, 1, ... with
seeds 1000, 1001, ...; all disjoint from the evaluation seeds 0-2 and the shipped calibration's 100-102) run in full
at B = 8 while MeanCache calibrates and records their runs, the last one also selecting schedule and estimator by
replay (:func:`meancache.calibration.select_by_replay`, refined); then each budget B runs the schedule
``MeanCacheConfig(budget=B, calibration_runs=R)`` resolves from the store (another budget than the calibrating
one is selected the same way, on the stored runs, when first asked for). Rows of the same calibration: its PSSP
solution with the default solver settings (what a budget gets without recorded runs) and, for R = 1, the unrefined
pick on its one run, what a user's generations 2-10 get while the default R = 4 is provisional. ``summary`` holds
each method's mean, lowest and highest PSNR over the draws. First use is progressive (one full generation, then a
full one every ``FULL_RUN_EVERY``-th); here every generation until R calibrates (``FULL_RUN_EVERY`` set to 1). The
rows of the default ``calibration_runs`` carry ``"default": true`` (and so do their entries in ``summary``).

Rows at B = 8, 10, 13, 17, 25, against the full 50-step run over digits 0-9 x seeds 0-2 (PSNR, SSIM): the shipped
validated schedule, a single PSSP solution (closed-loop, gamma 2) of the shipped 30-trajectory calibration,
uniform plain reuse (K = 1), and DPM-Solver++ 2M at B steps. How much the calibration data matters: first use on
three generations of all ten digits (30 trajectories, as the shipped calibration), on the shipped calibration's
own seeds and on others (image models). Overhead: the median wall time of a calibrating generation over a plain
generation of the same one-digit call, for the calibrating generations that only measure costs (and make the
provisional pick) and for the last ones, which also select and refine by replay; and the first generation at
another budget, which selects for it.
Results: ``benchmarks/results/first_use_calibration_<model>.json`` and the plot of PSNR against measured speed with
the first-use schedules, ``first_use_calibration_<model>_measured.png`` (speeds from ``quality_<model>.json``).
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from benchmarks.bench_quality import SEEDS, SHIPPED, SOLVERS, STEPS
from benchmarks.helpers import RESULTS_DIR, save_plot, write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import Calibration, calibration_store, select_by_replay
from meancache.config import DEFAULT_CALIBRATION_RUNS
from meancache.integrations.diffusers import first_use as first_use_module
from meancache.integrations.diffusers.first_use import SELECTED, first_use_schedule
from meancache.models import BUNDLED_MODELS, IMAGE_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES
from meancache.models.quality import image_metrics
from meancache.schedule import defaults

BUDGETS = (8, 10, 13, 17, 25)
RUNS = (1, 2, 4)
DRAWS = range(5)
BATCHED = ((3, (100, 101, 102)), (3, (1000, 1001, 1002)))
"""First use on 30 trajectories: R = 3 generations of all ten digits, on the shipped calibration's own seeds
(100-102) and on others."""
DPM = "fewer steps: DPM-Solver++ 2M"
PROVISIONAL = "first use after one generation, unrefined (generations 2-10 of the default calibration_runs)"


def draw_calls(draw: int, runs: int) -> list[tuple[int, int]]:
    """``(digit, seed)`` of each calibrating generation of calibration draw ``draw`` (module docstring)."""
    return [((2 * draw + i) % 10, 1000 + 100 * draw + i) for i in range(runs)]


@pytest.mark.parametrize("model_name", BUNDLED_MODELS)
def test_first_use_calibration(benchmark, tmp_path, monkeypatch, model_name):
    video = model_name not in IMAGE_MODELS
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=f"benchmark/{model_name}-schedules-hidden")
    monkeypatch.setattr(defaults, "MODEL_FAMILIES", {})  # digits-qwen's transformer would get Qwen-Image's presets
    monkeypatch.setattr(first_use_module, "FULL_RUN_EVERY", 1)  # every generation until R calibrates
    shipped_calibration = Calibration.load(bundled_model_path(model_name) / "meancache_calibration.json")
    euler = pipe.scheduler

    def generate(inputs: dict, seed: int, steps: int = STEPS) -> np.ndarray:
        with torch.inference_mode():
            latents = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                           output_type="latent", return_dict=False)[0]  # fmt: skip
        return model.decode(latents)

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

    def schedule_row(method: str, budget: int, schedule: Schedule, references: dict, **extra) -> dict:
        """``row`` of ``schedule``'s images, naming its computed steps, spans and estimator."""
        return row(method, budget, run_schedule(schedule), references, compute_steps=list(schedule.compute_steps),
                   spans=list(schedule.spans), estimator=schedule.metadata.get("estimator", "paper"),
                   **extra)  # fmt: skip

    def measure() -> tuple[list[dict], dict]:
        references = evaluate()
        rows: list[dict] = []
        seconds: dict[str, list[float]] = {"plain": [], "calibrating": [], "selecting": [], "another_budget": []}
        for _ in range(3):
            start = time.perf_counter()
            generate(model.inputs([0]), 1000)
            seconds["plain"].append(time.perf_counter() - start)

        def first_use(calls: list[tuple[list[int], int]], runs: int, label: str) -> dict[int, Schedule]:
            """Per budget, the schedule first use resolves after calibrating on ``calls`` (classes, seed) with
            ``calibration_runs=runs`` at the first budget, timing its generations (module docstring)."""
            monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / f"home_{label}"))
            schedules = {}
            for budget in BUDGETS:
                config = MeanCacheConfig(budget=budget, calibration_runs=runs)
                enable_mean_cache(pipe, config)
                if budget == BUDGETS[0]:
                    for i, (classes, seed) in enumerate(calls):
                        start = time.perf_counter()
                        generate(model.inputs(classes), seed)
                        seconds["selecting" if i == runs - 1 else "calibrating"].append(time.perf_counter() - start)
                        assert summary(pipe).schedule.metadata["source"].startswith("calibrating on first use")
                start = time.perf_counter()
                generate(model.inputs([0]), 0)
                if budget != BUDGETS[0]:
                    seconds["another_budget"].append(time.perf_counter() - start)
                report = summary(pipe)
                disable_mean_cache(pipe)
                assert report.schedule.metadata["source"].startswith("calibrated on first use (validated by replay")
                assert report.computed_steps == budget, report
                schedules[budget] = report.schedule
            return schedules

        for runs, draw in itertools.product(RUNS if not video else (DEFAULT_CALIBRATION_RUNS,), DRAWS):
            extra = {"draw": draw, "default": runs == DEFAULT_CALIBRATION_RUNS}
            calls = [([digit], seed) for digit, seed in draw_calls(draw, runs)]
            schedules = first_use(calls, runs, f"R{runs}_draw{draw}")
            (stored,) = calibration_store().files()
            calibration = Calibration.load(stored)
            assert calibration.trajectories == runs
            del calibration.metadata[SELECTED]
            recorded = [(*run, calibration.sigmas) for run in calibration_store().runs(calibration.metadata["key"])]
            for budget, schedule in schedules.items():
                rows.append(schedule_row(f"calibrate on first use, R={runs}", budget, schedule, references, **extra))
                single = first_use_schedule(calibration, budget)
                rows.append(schedule_row(f"first-use calibration R={runs}: PSSP default settings, no replay", budget,
                                         single, references, **extra))  # fmt: skip
                if runs == 1:
                    provisional = select_by_replay(calibration.candidate_schedules(budget), recorded, refine=False)
                    rows.append(schedule_row(PROVISIONAL, budget, provisional, references, **extra))
        for runs, seeds in () if video else BATCHED:
            schedules = first_use([(CLASSES, seed) for seed in seeds], runs, f"batched_{seeds[0]}")
            label = f"calibrate on first use, R={runs} generations of digits 0-9, seeds {seeds[0]}-{seeds[-1]}"
            rows += [schedule_row(label, budget, schedule, references) for budget, schedule in schedules.items()]
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
        "calibration_draws": "draw d, generation i: digit (2d + i) mod 10, seed 1000 + 100 d + i",
        "overhead": overhead, "summary": over_draws(rows), "rows": rows,
    })  # fmt: skip
    plot_measured_speed(model_name, over_draws(rows))


def plot_measured_speed(model_name: str, summary: list[dict]) -> None:
    """PSNR against measured speed with first-use schedules: the default first use's mean and worst draw over
    calibrations, at the measured eager speedup of MeanCache with the same number of computed steps (the shipped
    schedule's in ``quality_<model>.json``: same steps, same estimators, so the same cost), beside every timed row of
    that benchmark (solvers and peers, at their own measured speed). ``first_use_calibration_<model>_measured.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [r for r in json.loads((RESULTS_DIR / f"quality_{model_name}.json").read_text())["rows"]
               if "speedup_eager" in r and np.isfinite(r["psnr"])]  # fmt: skip
    speed = {r["budget"]: r["speedup_eager"] for r in quality if r["method"] == SHIPPED}
    fig, ax = plt.subplots(figsize=(9, 6))
    first_use = sorted((s for s in summary if s["default"] and s["method"].startswith("calibrate on first use")),
                       key=lambda s: s["budget"])  # fmt: skip
    for key, style, label in (("psnr_mean", "-", "mean of 5 calibrations"), ("psnr_min", "--", "worst calibration")):
        ax.plot([speed[s["budget"]] for s in first_use], [s[key] for s in first_use], style, marker="o", linewidth=3,
                color="tab:red", label=f"MeanCache, first use (default), {label}")  # fmt: skip
    families: dict[str, list[dict]] = {}
    for r in quality:
        families.setdefault("MeanCache (shipped schedule)" if r["method"] == SHIPPED else r["family"], []).append(r)
    colors = iter(c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (6, 7))  # red: first use
    for name, points in sorted(families.items()):
        points = sorted(points, key=lambda r: r["speedup_eager"])
        ax.plot([p["speedup_eager"] for p in points], [p["psnr"] for p in points], marker="o", linewidth=1,
                color=next(colors), label=name)  # fmt: skip
    save_plot(fig, ax, f"measured eager speedup over the full {STEPS}-step run (quality benchmark's timings)",
              f"PSNR against the full {STEPS}-step run (dB)",
              f"{model_name}: first-use schedules against measured speed",
              f"first_use_calibration_{model_name}_measured")  # fmt: skip


def over_draws(rows: list[dict]) -> list[dict]:
    """Mean, lowest and highest PSNR of each (method, budget) over its calibration draws."""
    groups: dict[tuple[str, int, bool], list[float]] = {}
    for r in rows:
        if "draw" in r:
            groups.setdefault((r["method"], r["budget"], r.get("default", False)), []).append(r["psnr"])
    return [{"method": method, "budget": budget, "draws": len(values), "psnr_mean": float(np.mean(values)),
             "psnr_min": min(values), "psnr_max": max(values), "default": default}
            for (method, budget, default), values in groups.items()]  # fmt: skip
