"""Quality against speed at equal transformer evaluations, on the bundled digits-flux model.

Reference: the full 50-step Euler run of the same pipeline; digits 0-9 x seeds 0, 1, 2 (the shipped
calibration used seeds 100-102). Rows per budget B (transformer evaluations):

* MeanCache (the paper's rule) with PSSP schedules from the shipped calibration: closed-loop and one-shot
  (paper's) costs at gamma 1, 2 and 4 (closed-loop gamma 2 is what ``MeanCacheConfig(budget=B)`` ships);
* MeanCache on the published Qwen-Image table's shape where one exists (another model's schedule);
* plain velocity reuse (K = 1): uniform steps, and the closed-loop gamma-2 steps (isolates the spans);
* fewer steps: B-step sampling with Euler, DPM-Solver++ (2M; it needs FluxPipeline's dynamic shift, here
  mu = 0.47 for 64 image tokens) and UniPC (flow sigmas);
* diffusers' own caches, FirstBlockCache (threshold sweep) and TaylorSeer (interval x order sweep, full and
  lite mode): for each B the best-PSNR setting whose transformer compute is at most B full evaluations.
  Compute is measured with ``torch.utils.flop_counter`` (transformer FLOPs / one full evaluation's);
* a max-gap x K-set study of closed-loop gamma-2 schedules (B = 10 and 17);
* MeanCache with the ``exact-jvp`` estimator (dv/dsigma from a forward-mode pass through the fused JVP
  attention): on the same closed-loop gamma-2 schedule as the paper's rule (``nfe`` then counts each
  forward-mode pass at its measured cost in forward-equivalents, so it exceeds B), and at equal compute
  (the largest schedule whose forward-equivalents fit in B). The cost ratio is measured here, as the
  median wall time of one forward-mode pass over one plain forward of the transformer.

Not covered: MagCache (needs its own calibration pass) and cache-dit (not installed here).

Metrics: PSNR and SSIM against the reference (scikit-image), how often a digit classifier recognises the
requested class, and wall-clock speedup over the reference (same seeds, same machine).
Results: ``benchmarks/results/quality_digits-flux.json``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FirstBlockCacheConfig, TaylorSeerCacheConfig, UniPCMultistepScheduler
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.helpers import write_results
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.cli.demo import image_metrics
from meancache.integrations.jvp_attention import disable_jvp_attention, enable_jvp_attention
from meancache.method.estimators import ExactJVPEstimator
from meancache.models import bundled_model_path, class_inputs, load_digits_pipeline
from meancache.models.digits import classify, digit_classifier
from meancache.schedule.calibration import Calibration

STEPS = 50
SEEDS = (0, 1, 2)
BUDGETS = (8, 10, 13, 17, 25)
CLASSES = list(range(10))


def _schedules(calibration: Calibration, budget: int) -> dict[str, Schedule]:
    rows = {
        f"meancache: pssp {kind} gamma={gamma:g}": calibration.schedule(budget, kind=kind, gamma=gamma)
        for kind in ("closed-loop", "one-shot")
        for gamma in (1.0, 2.0, 4.0)
    }
    if budget in (10, 17, 25):
        rows["meancache: qwen-image table shape"] = Schedule.preset("qwen-image", budget)
    rows["plain reuse: uniform steps"] = Schedule.uniform(STEPS, budget)
    steps = rows["meancache: pssp closed-loop gamma=2"].compute_steps
    rows["plain reuse: pssp closed-loop gamma=2 steps"] = Schedule(STEPS, steps, (1,) * (budget - 1))
    return rows


def _max_gap_and_span_study(pipe, embeddings, generate, references: dict) -> list[dict]:
    """Recalibrate with max gap 12 (same seeds as the shipped calibration), then solve closed-loop gamma-2
    schedules restricted to max gap 6, 8 or 12 and spans 1..1, 1..3 or 1..5."""
    from meancache.integrations.diffusers import calibrate_pipeline
    from meancache.models.digits import calibration_calls
    from meancache.schedule.pssp import solve_pssp

    costs = calibrate_pipeline(pipe, calibration_calls(embeddings), STEPS, max_gap=12, max_span=5).costs("closed-loop")
    rows = []
    for budget in (10, 17):
        for max_gap in (6, 8, 12):
            for max_span in (1, 3, 5):
                schedule = solve_pssp(costs[..., :max_span], budget, gamma=2.0, max_gap=max_gap)
                enable_mean_cache(pipe, MeanCacheConfig(schedule))
                images = {seed: generate(seed) for seed in SEEDS}
                disable_mean_cache(pipe)
                rows.append({
                    "method": f"study: pssp closed-loop gamma=2, max_gap={max_gap}, K<={max_span}", "budget": budget,
                    "nfe": budget, "psnr": float(np.mean([image_metrics(images[s], references[s])[0] for s in SEEDS])),
                    "compute_steps": list(schedule.compute_steps), "spans": list(schedule.spans),
                })  # fmt: skip
    return rows


DIFFUSERS_CACHES = {
    **{f"FirstBlockCache threshold={t:g}": FirstBlockCacheConfig(threshold=t)
       for t in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)},
    **{f"TaylorSeer interval={k} order={o}{' lite' if lite else ''}": TaylorSeerCacheConfig(
        cache_interval=k, disable_cache_before_step=1, max_order=o, use_lite_mode=lite)
       for k in (3, 5, 8) for o in (1, 2) for lite in (False, True)},
}  # fmt: skip


def _jvp_cost_in_forwards(pipe, inputs: dict) -> float:
    """Median wall time of a forward-mode pass (tangents on latents and timestep) over a plain forward."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw) or None, with_kwargs=True)
    with torch.inference_mode():
        pipe(**inputs, num_inference_steps=2, output_type="latent")
    handle.remove()
    kwargs = {**calls[0], "return_dict": False}
    hidden, timestep = kwargs.pop("hidden_states"), kwargs.pop("timestep").contiguous()

    def velocity(h, t):
        return pipe.transformer(hidden_states=h, timestep=t, **kwargs)[0]

    def median_seconds(fn) -> float:
        times = []
        for _ in range(21):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))

    enable_jvp_attention(pipe.transformer)
    with torch.no_grad():
        forward = median_seconds(lambda: velocity(hidden, timestep))
        jvp = median_seconds(lambda: torch.func.jvp(velocity, (hidden, timestep), (hidden, torch.ones_like(timestep))))
    disable_jvp_attention(pipe.transformer)
    return jvp / forward


def _forward_equivalents(schedule: Schedule, jvp_cost: float) -> float:
    """Transformer cost of an exact-jvp run on ``schedule``: plain forwards plus forward-mode passes."""
    estimator = ExactJVPEstimator(schedule)
    passes = sum(estimator.needs_derivative(i) for i in range(schedule.num_steps))
    extra_tangent_call = 1 if passes and estimator.needs_derivative(0) else 0
    return schedule.budget - passes + passes * jvp_cost + extra_tangent_call


def _transformer_flops(pipe, inputs: dict) -> float:
    with FlopCounterMode(display=False) as counter:
        pipe(
            **inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEEDS[0]), output_type="latent"
        )
    return float(sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values()))


SOLVERS = {
    "fewer steps: Euler": None,  # the pipeline's own FlowMatchEulerDiscreteScheduler
    "fewer steps: DPM-Solver++ 2M": lambda: DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        algorithm_type="dpmsolver++",
        solver_order=2,
    ),
    "fewer steps: UniPC": lambda: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
}


def test_quality(benchmark):
    pipe, embeddings = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calibration = Calibration.load(bundled_model_path() / "meancache_calibration.json")
    classifier = digit_classifier()
    inputs = class_inputs(embeddings, CLASSES)
    euler = pipe.scheduler

    def generate(seed: int, steps: int = STEPS) -> np.ndarray:
        with torch.inference_mode():
            return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        output_type="np").images[..., 0]  # fmt: skip

    def run(steps: int = STEPS) -> tuple[dict[int, np.ndarray], float]:
        start = time.perf_counter()
        images = {seed: generate(seed, steps) for seed in SEEDS}
        return images, time.perf_counter() - start

    def row(method: str, budget: int, nfe: int, images: dict, seconds: float, references: dict, full: float) -> dict:
        metrics = [image_metrics(images[s], references[s]) for s in SEEDS]
        predicted = torch.cat([classify(classifier, torch.from_numpy(images[s])) for s in SEEDS])
        return {
            "method": method, "budget": budget, "nfe": nfe, "speedup_wall": full / seconds,
            "psnr": float(np.mean([m[0] for m in metrics])), "ssim": float(np.mean([m[1] for m in metrics])),
            "class_acc": float((predicted == torch.tensor(CLASSES * len(SEEDS))).float().mean()),
        }  # fmt: skip

    reference: dict = {}  # the full 50-step run, measured once inside the timed evaluation
    jvp_cost = _jvp_cost_in_forwards(pipe, inputs)

    def evaluate() -> list[dict]:
        run()  # warm-up
        references, full_seconds = run()
        reference.update(images=references, seconds=full_seconds)
        rows = [row("full 50 steps (reference)", STEPS, STEPS, references, full_seconds, references, full_seconds)]
        for budget in BUDGETS:
            for method, schedule in _schedules(calibration, budget).items():
                enable_mean_cache(pipe, MeanCacheConfig(schedule))
                images, seconds = run()
                nfe = summary(pipe).transformer_calls
                disable_mean_cache(pipe)
                rows.append({**row(method, budget, nfe, images, seconds, references, full_seconds),
                             "compute_steps": list(schedule.compute_steps), "spans": list(schedule.spans)})  # fmt: skip
            lowest = -(-(STEPS - 1) // calibration.max_gap) + 1  # fewer computed steps cannot bridge the gaps
            pssp = {b: calibration.schedule(b, kind="closed-loop", gamma=2.0) for b in range(lowest, budget + 1)}
            fitting = [b for b, schedule in pssp.items() if _forward_equivalents(schedule, jvp_cost) <= budget]
            exact_runs = {"meancache exact-jvp: pssp closed-loop gamma=2 (same schedule)": pssp[budget]}
            if fitting:
                exact_runs["meancache exact-jvp: pssp closed-loop gamma=2 (equal compute)"] = pssp[max(fitting)]
            for method, schedule in exact_runs.items():
                enable_mean_cache(pipe, MeanCacheConfig(schedule, estimator="exact-jvp"))
                images, seconds = run()
                disable_mean_cache(pipe)
                nfe = round(_forward_equivalents(schedule, jvp_cost), 2)
                measured = row(method, budget, nfe, images, seconds, references, full_seconds)
                rows.append({**measured, "compute_steps": list(schedule.compute_steps), "jvp_cost": jvp_cost})
            for method, make_scheduler in SOLVERS.items():
                pipe.scheduler = make_scheduler() if make_scheduler else euler
                images, seconds = run(budget)
                pipe.scheduler = euler
                rows.append(row(method, budget, budget, images, seconds, references, full_seconds))
        return rows

    def diffusers_cache_rows(references: dict, full_seconds: float) -> tuple[list[dict], list[dict]]:
        full_flops = _transformer_flops(pipe, inputs)
        candidates = []
        for name, config in DIFFUSERS_CACHES.items():
            pipe.transformer.enable_cache(config)
            nfe = STEPS * _transformer_flops(pipe, inputs) / full_flops
            images, seconds = run()
            pipe.transformer.disable_cache()
            candidates.append(row(f"diffusers {name}", 0, round(nfe, 1), images, seconds, references, full_seconds))
        rows = []
        for family in ("FirstBlockCache", "TaylorSeer"):
            for budget in BUDGETS:
                fitting = [c for c in candidates if c["nfe"] <= budget and family in c["method"]]
                if fitting:
                    rows.append({**max(fitting, key=lambda c: c["psnr"]), "budget": budget})
        return rows, candidates

    rows = benchmark.pedantic(evaluate, rounds=1, iterations=1)
    cache_rows, sweep = diffusers_cache_rows(reference["images"], reference["seconds"])
    rows += cache_rows
    rows += _max_gap_and_span_study(pipe, embeddings, generate, reference["images"])
    write_results("quality_digits-flux", {
        "model": "digits-flux", "steps": STEPS, "seeds": list(SEEDS), "classes": CLASSES, "rows": rows,
        "diffusers_cache_sweep": sweep, "exact_jvp_cost_in_forwards": jvp_cost,
    })  # fmt: skip
    # MeanCache and fewer-steps rows ran the transformer exactly B times; block caches and equal-compute
    # exact-jvp at most B equivalents
    for r in rows:
        if r["method"].startswith("diffusers") or "equal compute" in r["method"]:
            assert r["nfe"] <= r["budget"], r
        elif "same schedule" not in r["method"]:
            assert r["nfe"] == r["budget"], r
