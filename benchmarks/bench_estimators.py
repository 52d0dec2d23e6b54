"""Estimators for skipped steps on the bundled digits models: the paper's rule against extrapolating computed steps.

Every MeanCache row runs the model's *shipped* schedule (``MeanCacheConfig(budget=B)``'s, validated for the paper's
rule) at B = 8, 10, 13, 17, 25 of 50 Euler steps, changing only the estimator. Reference: the full 50-step run of the
same pipeline; PSNR over digits 0-9 x seeds 0, 1, 2 (scikit-image, as ``bench_quality.py``). Rows per budget:

* ``paper``: the authors' rule (:class:`~meancache.method.estimators.PaperRuleEstimator`);
* the extrapolation grid (:class:`~meancache.method.estimators.TrajectoryExtrapolationEstimator`, linear, wide-base
  nodes): target ``velocity`` or ``data`` x damping 0.25 / 0.5 / 0.75 / 1, and two ablations of the registered one
  (nodes = the last two computed steps, and no damping);
* the fewer-steps solvers at B evaluations (Euler, DPM-Solver++ 2M, UniPC: the configurations of
  ``bench_quality.py``), and the best non-MeanCache row of the committed ``quality_<model>.json`` (block and attention
  caches included), for the margin the issue asks for.

Selection without the evaluation seeds: every grid row is also run on the shipped calibration's seeds (100-102, the
calls :func:`meancache.models.train.calibration_calls` makes), scored as ``select_schedule`` scores schedules (mean
``||z_hat - z|| / ||z||`` of the final latents against the full runs). The grid point with the least mean log error
over both image models and all budgets is the pick (``selection`` in the results); the registered ``data-linear``
estimator must be it. ``digits-video`` is held out: never used to choose, measured for the pick, paper and solvers.
Results: ``benchmarks/results/estimators_digits.json``.

Per budget (:func:`test_estimator_per_budget`, ``benchmarks/results/estimators_per_budget.json``): no grid point
wins at every budget, so the variant is chosen per model and budget, on the shipped schedule, among the paper's rule
and ``PER_BUDGET_GRID`` (target x damping 0.5 / 0.75 / 1 x wide base / last two nodes), three ways: (a) the least
replay error (:func:`~meancache.calibration.replay_estimator_error`, summed over recorded full runs of the
calibration calls, kept as first use keeps its trajectory), (b) the least calibration-seed error of real runs (the
``select_schedule`` score above), (c) the evaluation seeds' best (oracle, for reference). ``digits-video`` is measured
as the image models are; no rule is fitted on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from benchmarks.helpers import FLOW_MULTISTEP_SCHEDULERS, RESULTS_DIR, write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.calibration import replay_estimator_error
from meancache.integrations.diffusers.calibration import observe_steps
from meancache.integrations.diffusers.first_use import TRAJECTORY_DTYPE
from meancache.method.estimators import ESTIMATORS, DataLinearEstimator, TrajectoryExtrapolationEstimator
from meancache.models import bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES
from meancache.models.quality import image_metrics
from meancache.models.train import CALIBRATION_SEEDS, calibration_calls

STEPS = 50
SEEDS = (0, 1, 2)
BUDGETS = (8, 10, 13, 17, 25)
SELECTION_MODELS = ("digits-flux", "digits-qwen")
HELD_OUT = ("digits-video",)
GRID = {
    f"{target}-linear damping={damping:g}": {"target": target, "damping": damping, "min_base": 1.0}
    for target in ("velocity", "data")
    for damping in (0.25, 0.5, 0.75, 1.0)
}
ABLATIONS = {
    "data-linear, last two computed steps as nodes": {"target": "data", "damping": 0.5, "min_base": 0.0},
    "velocity-linear, last two computed steps, undamped": {"target": "velocity", "damping": 1.0, "min_base": 0.0},
}
PER_BUDGET_GRID = {
    f"{target}-linear damping={damping:g}, {nodes}": {"target": target, "damping": damping, "min_base": min_base}
    for target in ("velocity", "data")
    for damping in (0.5, 0.75, 1.0)
    for nodes, min_base in (("wide base", 1.0), ("last two", 0.0))
}
SOLVERS = {"fewer steps: Euler": None, **{f"fewer steps: {n}": make for n, make in FLOW_MULTISTEP_SCHEDULERS.items()}}


@contextmanager
def registered(variants: dict[str, dict[str, Any]]) -> Iterator[None]:
    """``variants`` (name -> class attributes of a linear extrapolation estimator) in ``ESTIMATORS`` while active."""
    for name, attributes in variants.items():
        ESTIMATORS[name] = type(name, (TrajectoryExtrapolationEstimator,), {"name": name, "order": 2, **attributes})
    try:
        yield
    finally:
        for name in variants:
            del ESTIMATORS[name]


def best_peer_rows(model_name: str) -> dict[int, dict[str, Any]]:
    """Per budget, the best-PSNR row of the committed quality benchmark that is not MeanCache and fits in B."""
    rows = json.loads((RESULTS_DIR / f"quality_{model_name}.json").read_text())["rows"]
    best = {}
    for budget in BUDGETS:
        peers = [r for r in rows if r["budget"] == budget and not r["method"].startswith(("meancache", "plain reuse"))
                 and r["nfe"] <= budget]  # fmt: skip
        chosen = max(peers, key=lambda r: r["psnr"])
        best[budget] = {"method": chosen["method"], "psnr": chosen["psnr"], "nfe": chosen["nfe"]}
    return best


def shipped_schedule(model_name: str, budget: int) -> Schedule:
    """The schedule ``MeanCacheConfig(budget=budget)`` uses on the bundled model."""
    return Schedule.load(bundled_model_path(model_name) / "meancache_schedules" / f"schedule_B{budget}.json")


def measure(model_name: str, estimators: list[str], calibrate: bool) -> dict[str, Any]:
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = model.inputs(CLASSES)
    euler = pipe.scheduler

    def latents(kwargs: dict, steps: int = STEPS) -> torch.Tensor:
        with torch.inference_mode():
            return pipe(**kwargs, num_inference_steps=steps, output_type="latent", return_dict=False)[0].float()

    def evaluation(steps: int = STEPS) -> dict[int, np.ndarray]:
        seeded = {s: {**inputs, "generator": torch.Generator().manual_seed(s)} for s in SEEDS}
        return {s: model.decode(latents(kwargs, steps)) for s, kwargs in seeded.items()}

    def calibration_latents() -> list[torch.Tensor]:
        return [latents(call) for call in calibration_calls(model)]  # fresh generators on every call

    references = evaluation()
    calibration_references = calibration_latents() if calibrate else []

    def psnr(images: dict[int, np.ndarray]) -> float:
        return float(np.mean([image_metrics(images[s], references[s])[0] for s in SEEDS]))

    def calibration_error(found: list[torch.Tensor]) -> float:
        return float(np.mean([float((a - b).norm() / b.norm()) for a, b in zip(found, calibration_references,
                                                                               strict=True)]))  # fmt: skip

    rows = []
    peers = best_peer_rows(model_name)
    for budget in BUDGETS:
        shipped = shipped_schedule(model_name, budget)
        for method, make in SOLVERS.items():
            pipe.scheduler = make() if make else euler
            rows.append({"method": method, "budget": budget, "nfe": budget, "psnr": psnr(evaluation(budget))})
            pipe.scheduler = euler
        rows.append({"method": f"committed best peer: {peers[budget]['method']}", "budget": budget,
                     "nfe": peers[budget]["nfe"], "psnr": peers[budget]["psnr"]})  # fmt: skip
        for name in estimators:
            enable_mean_cache(pipe, MeanCacheConfig(shipped, estimator=name))
            row = {"method": f"meancache shipped schedule, estimator {name}", "estimator": name, "budget": budget,
                   "nfe": budget, "psnr": psnr(evaluation())}  # fmt: skip
            if calibrate:
                row["calibration_error"] = calibration_error(calibration_latents())
            disable_mean_cache(pipe)
            rows.append(row)
    return {"rows": rows}


def selection(results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Mean over selection models and budgets of ``log10`` calibration-seed error, per grid point; the least wins."""
    scores = {}
    for name in names:
        errors = [r["calibration_error"] for m in SELECTION_MODELS for r in results[m]["rows"]
                  if r.get("estimator") == name]  # fmt: skip
        scores[name] = float(np.mean([math.log10(e) for e in errors]))
    return {"mean_log10_calibration_error": scores, "pick": min(scores, key=scores.__getitem__)}


def test_estimators(benchmark):
    torch.manual_seed(0)
    registered_name = DataLinearEstimator.name
    grid_names = list(GRID)

    def run() -> dict[str, Any]:
        results = {}
        with registered({**GRID, **ABLATIONS}):
            for model_name in SELECTION_MODELS:
                results[model_name] = measure(model_name, ["paper", *grid_names, *ABLATIONS, registered_name], True)
            for model_name in HELD_OUT:
                results[model_name] = measure(model_name, ["paper", registered_name], False)
        return results

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    chosen = selection(results, grid_names)
    attributes = GRID[chosen["pick"]]
    write_results("estimators_digits", {
        "steps": STEPS, "seeds": list(SEEDS), "classes": CLASSES, "budgets": list(BUDGETS),
        "selection_models": list(SELECTION_MODELS), "held_out": list(HELD_OUT), "grid": GRID, "ablations": ABLATIONS,
        "selection": chosen, "registered": {"name": registered_name, **{k: getattr(DataLinearEstimator, k)
                                                                        for k in attributes}},
        "models": results,
    })  # fmt: skip
    # the registered estimator is the calibration-seed pick, and runs as its grid point does
    assert all(getattr(DataLinearEstimator, k) == v for k, v in attributes.items()), chosen
    for model_name in SELECTION_MODELS:
        rows = results[model_name]["rows"]
        for budget in BUDGETS:
            by = {r.get("estimator"): r["psnr"] for r in rows if r["budget"] == budget}
            assert by[registered_name] == by[chosen["pick"]]


def selected_schedule_rows(model_name: str) -> list[dict[str, Any]]:
    """Per budget: of the calibration's candidate schedules (deduplicated by computed steps: ``data-linear`` ignores
    spans), the shipped one and uniform steps, the one whose ``data-linear`` runs end closest to the full runs on the
    calibration seeds (``select_schedule``'s score), measured on the evaluation seeds."""
    from meancache.calibration import Calibration

    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = model.inputs(CLASSES)
    calibration = Calibration.load(bundled_model_path(model_name) / "meancache_calibration.json")

    def latents(kwargs: dict) -> torch.Tensor:
        with torch.inference_mode():
            return pipe(**kwargs, num_inference_steps=STEPS, output_type="latent", return_dict=False)[0].float()

    def evaluation() -> dict[int, np.ndarray]:
        seeded = {s: {**inputs, "generator": torch.Generator().manual_seed(s)} for s in SEEDS}
        return {s: model.decode(latents(kwargs)) for s, kwargs in seeded.items()}

    def relative_error(found: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        return float(np.mean([float((a - b).norm() / b.norm()) for a, b in zip(found, reference, strict=True)]))

    references = evaluation()
    calibration_references = [latents(call) for call in calibration_calls(model)]
    rows = []
    for budget in BUDGETS:
        shipped = shipped_schedule(model_name, budget)
        found = [shipped, Schedule.uniform(STEPS, budget), *calibration.candidate_schedules(budget)]
        candidates = {s.compute_steps: s for s in reversed(found)}  # the shipped one wins a tie of computed steps
        errors = {}
        for steps, schedule in candidates.items():
            enable_mean_cache(pipe, MeanCacheConfig(schedule, estimator=DataLinearEstimator.name))
            errors[steps] = relative_error([latents(call) for call in calibration_calls(model)], calibration_references)
            disable_mean_cache(pipe)
        pick = min(errors, key=errors.__getitem__)
        enable_mean_cache(pipe, MeanCacheConfig(candidates[pick], estimator=DataLinearEstimator.name))
        images = evaluation()
        disable_mean_cache(pipe)
        rows.append({
            "method": "meancache data-linear, schedule selected for it", "budget": budget, "nfe": budget,
            "psnr": float(np.mean([image_metrics(images[s], references[s])[0] for s in SEEDS])),
            "compute_steps": list(pick), "candidates": len(candidates), "calibration_error": errors[pick],
            "shipped_calibration_error": errors[shipped.compute_steps], "picked_shipped": pick == shipped.compute_steps,
        })  # fmt: skip
    return rows


def test_schedule_selected_for_data_linear(benchmark):
    """The shipped schedules were selected for the paper's rule; here ``data-linear`` gets its own
    (:func:`selected_schedule_rows`). Results: ``benchmarks/results/estimators_selected_schedule.json``."""
    results = benchmark.pedantic(lambda: {m: {"rows": selected_schedule_rows(m)} for m in SELECTION_MODELS},
                                 rounds=1, iterations=1)  # fmt: skip
    write_results("estimators_selected_schedule", {
        "steps": STEPS, "seeds": list(SEEDS), "budgets": list(BUDGETS), "estimator": DataLinearEstimator.name,
        "models": results,
    })  # fmt: skip


def replay_errors_per_budget(model_name: str, estimators: list[str]) -> dict[int, dict[str, float]]:
    """Per budget and estimator: the replay error of the shipped schedule, summed over full runs of the calibration
    calls recorded as first use records its trajectory (``observe_steps``, kept in ``TRAJECTORY_DTYPE``)."""
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    runs: list[tuple[list[torch.Tensor], list[torch.Tensor], list[float]]] = []

    def observer(step: int, z: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor) -> None:
        latents, velocities, _ = runs[-1]
        latents.append(z.detach().to("cpu", TRAJECTORY_DTYPE))
        velocities.append(v.detach().to("cpu", TRAJECTORY_DTYPE))
        runs[-1] = (latents, velocities, sigmas.tolist())

    with observe_steps(pipe, observer), torch.inference_mode():
        for call in calibration_calls(model):
            runs.append(([], [], []))
            pipe(**call, num_inference_steps=STEPS, output_type="latent")
    return {
        budget: {name: sum(replay_estimator_error(ESTIMATORS[name], shipped_schedule(model_name, budget), *run)
                           for run in runs) for name in estimators}
        for budget in BUDGETS
    }  # fmt: skip


def per_budget_picks(rows: list[dict[str, Any]], replayed: dict[int, dict[str, float]]) -> dict[int, dict[str, Any]]:
    """Per budget: the best non-MeanCache row and the estimators picked by (a) least replay error, (b) least
    calibration-seed error of real runs and (c) best evaluation PSNR, each with its PSNR and margin over that row."""
    picks = {}
    for budget in BUDGETS:
        at = [r for r in rows if r["budget"] == budget]
        peer = max((r for r in at if "estimator" not in r), key=lambda r: r["psnr"])
        psnr = {r["estimator"]: r["psnr"] for r in at if "estimator" in r}
        chosen = {
            "replay": min(replayed[budget], key=replayed[budget].__getitem__),
            "calibration_runs": min(psnr, key=lambda n: next(r["calibration_error"] for r in at
                                                              if r.get("estimator") == n)),
            "oracle": max(psnr, key=psnr.__getitem__),
        }  # fmt: skip
        picks[budget] = {"best_non_meancache": {"method": peer["method"], "psnr": peer["psnr"]}} | {
            how: {"estimator": name, "psnr": psnr[name], "margin": psnr[name] - peer["psnr"]}
            for how, name in chosen.items()
        }
    return picks


def rule_summary(picks: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per selection rule over the budgets: the least margin, the cells at +2 dB or more, the cells where it picks
    the oracle's estimator and the summed PSNR it leaves below the oracle."""
    return {
        how: {"least_margin": min(p[how]["margin"] for p in picks.values()),
              "cells_over_2_db": sum(p[how]["margin"] >= 2.0 for p in picks.values()),
              "oracle_picks": sum(p[how]["estimator"] == p["oracle"]["estimator"] for p in picks.values()),
              "shortfall_db": sum(p["oracle"]["psnr"] - p[how]["psnr"] for p in picks.values())}
        for how in ("replay", "calibration_runs", "oracle")
    }  # fmt: skip


def test_estimator_per_budget(benchmark):
    """The extrapolation variant chosen per model and budget (module docstring); writes
    ``benchmarks/results/estimators_per_budget.json``."""
    torch.manual_seed(0)
    names = ["paper", *PER_BUDGET_GRID]

    def run() -> dict[str, Any]:
        results = {}
        with registered(PER_BUDGET_GRID):
            for model_name in (*SELECTION_MODELS, *HELD_OUT):
                rows = measure(model_name, names, True)["rows"]
                replayed = replay_errors_per_budget(model_name, names)
                picks = per_budget_picks(rows, replayed)
                results[model_name] = {"rows": rows, "replay_error": replayed, "picks": picks,
                                       "rules": rule_summary(picks)}  # fmt: skip
        return results

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    write_results("estimators_per_budget", {
        "steps": STEPS, "seeds": list(SEEDS), "classes": CLASSES, "budgets": list(BUDGETS),
        "calibration_seeds": list(CALIBRATION_SEEDS), "trajectory_dtype": str(TRAJECTORY_DTYPE),
        "selection_models": list(SELECTION_MODELS), "held_out": list(HELD_OUT), "grid": PER_BUDGET_GRID,
        "models": results,
    })  # fmt: skip
