"""Quality against speed at equal transformer compute, on the bundled digits models.

For each bundled model (``digits-flux``: FluxPipeline, guidance embedding; ``digits-qwen``:
QwenImagePipeline, true CFG; ``digits-video``: HunyuanVideoPipeline, guidance embedding, 9-frame videos), the
reference is the full 50-step Euler run of the same pipeline, over digits 0-9 x seeds 0, 1, 2 (the shipped
calibrations used seeds 100-102). ``nfe`` counts model evaluations per
image, a CFG pair counting once (digits-qwen runs two transformer calls per evaluation). Rows per budget
B (model evaluations):

* MeanCache (the paper's rule) with the shipped schedule (what ``MeanCacheConfig(budget=B)`` uses: of the
  calibration's candidate PSSP schedules, the one whose runs on the calibration seeds end closest to the
  full runs), and with single PSSP solutions: closed-loop and one-shot (paper's) costs at gamma 1, 2, 4;
* MeanCache on the published Qwen-Image table's shape where one exists (a schedule from another model);
* plain velocity reuse (K = 1): uniform steps, and the shipped schedule's steps (isolates the spans);
* fewer steps: B-step sampling with Euler, DPM-Solver++ (2M; it needs the pipelines' dynamic shift, here
  mu = 0.47 for 64 image tokens) and UniPC (flow sigmas);
* MeanCache with the ``exact-jvp`` estimator (dv/dsigma from a forward-mode pass through the fused JVP
  attention): on the same closed-loop gamma-2 schedule (``nfe`` then counts each forward-mode pass at its
  measured cost in forward-equivalents, so it exceeds B), and at equal compute (the largest schedule whose
  forward-equivalents fit in B). The cost ratio is measured here: the median wall time of one
  forward-mode pass over one plain forward of the transformer;
* block-level peers (:mod:`benchmarks.quality_peers`: diffusers' FirstBlockCache, TaylorSeer and MagCache,
  cache-dit's DBCache with and without TaylorSeer): for each B and family, the best-PSNR setting whose
  measured compute is at most B full evaluations. Compute is counted in blocks: a peer that runs its first
  block on a skipped step is charged for that block (:class:`benchmarks.quality_speed.BlockCounter`);
* on the video model also the attention-level peers (diffusers' PyramidAttentionBroadcast and FasterCache),
  charged by the FLOPs they really run (:class:`benchmarks.quality_speed.FlopCounter`).

Metrics: PSNR and SSIM against the reference (scikit-image; a video: over all its frames), how often a digit
classifier recognises the requested class (a video: in each frame), and for videos the temporal error: how far
the frame-to-frame changes stray from the full run's (:func:`~meancache.models.quality.temporal_error`).
Measured speed (:func:`benchmarks.quality_speed.median_seconds`): the reference and, per B,
the shipped MeanCache schedule, uniform plain reuse, the three fewer-steps solvers and each peer family's best
setting are timed the same way, interleaved, median of 5, denoising loop only, eager and with regional
compilation; ``speedup_eager`` / ``speedup_compiled`` are over the reference in the same mode.
Results: ``benchmarks/results/quality_<model>.json``, the quality-vs-compute plot ``quality_<model>.png`` and
the quality-vs-measured-speedup plot ``quality_<model>_measured.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.helpers import FLOW_MULTISTEP_SCHEDULERS, save_plot, write_results
from benchmarks.quality_peers import attention_caches, block_caches, magcache_ratios
from benchmarks.quality_speed import BlockCounter, FlopCounter, Setup, median_seconds
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import Calibration
from meancache.integrations.jvp_attention import disable_jvp_attention, enable_jvp_attention
from meancache.method.estimators import ExactJVPEstimator
from meancache.models import BUNDLED_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES, recognised
from meancache.models.quality import image_metrics, temporal_error
from meancache.models.train import calibration_calls

STEPS = 50
SEEDS = (0, 1, 2)
BUDGETS = (8, 10, 13, 17, 25)
SHIPPED = "meancache: shipped schedule (pssp candidates validated on the calibration seeds)"


def _schedules(model_name: str, calibration: Calibration, budget: int) -> dict[str, Schedule]:
    shipped = bundled_model_path(model_name) / "meancache_schedules" / f"schedule_B{budget}.json"
    rows = {SHIPPED: Schedule.load(shipped)}
    rows |= {
        f"meancache: pssp {kind} gamma={gamma:g}": calibration.schedule(budget, kind=kind, gamma=gamma)
        for kind in ("closed-loop", "one-shot")
        for gamma in (1.0, 2.0, 4.0)
    }
    if budget in (10, 17, 25):
        rows["meancache: qwen-image table shape"] = Schedule.preset("qwen-image", budget)
    rows["plain reuse: uniform steps"] = Schedule.uniform(STEPS, budget)
    rows["plain reuse: shipped schedule's steps"] = Schedule(STEPS, rows[SHIPPED].compute_steps, (1,) * (budget - 1))
    return rows


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

    def median_call_seconds(fn) -> float:
        times = []
        for _ in range(21):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))

    enable_jvp_attention(pipe.transformer)
    with torch.no_grad():
        forward = median_call_seconds(lambda: velocity(hidden, timestep))
        jvp = median_call_seconds(
            lambda: torch.func.jvp(velocity, (hidden, timestep), (hidden, torch.ones_like(timestep)))
        )
    disable_jvp_attention(pipe.transformer)
    return jvp / forward


def _forward_equivalents(schedule: Schedule, jvp_cost: float) -> float:
    """Transformer cost of an exact-jvp run on ``schedule``: plain forwards plus forward-mode passes."""
    estimator = ExactJVPEstimator(schedule)
    passes = sum(estimator.needs_derivative(i) for i in range(schedule.num_steps))
    extra_tangent_call = 1 if passes and estimator.needs_derivative(0) else 0
    return schedule.budget - passes + passes * jvp_cost + extra_tangent_call


SOLVERS: dict[str, Callable[[], Any] | None] = {
    "fewer steps: Euler": None,  # the pipeline's own FlowMatchEulerDiscreteScheduler
    **{f"fewer steps: {name}": make for name, make in FLOW_MULTISTEP_SCHEDULERS.items()},
}


def family(method: str) -> str:
    """The series a row of ours belongs to in the plot (peer rows carry their own)."""
    if method == SHIPPED:
        return "MeanCache (shipped schedule)"
    if method.startswith("meancache:"):
        return "MeanCache (other schedules)"
    return method


def plot_quality(model_name: str, rows: list[dict], sweep: list[dict]) -> None:
    """PSNR against compute speedup (``STEPS / nfe``), one series per family, peers' full sweeps in grey.

    Compute, not wall time, on the x axis: on these tiny models a whole run takes about a second and wall
    time varies by tens of percent between runs (the measured speedups are in the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    finite = [r for r in sweep if np.isfinite(r["psnr"])]
    ax.scatter([STEPS / r["nfe"] for r in finite], [r["psnr"] for r in finite], s=10, color="0.8",
               label="peer caches, every setting swept")  # fmt: skip
    series: dict[str, list[dict]] = {}
    for r in rows:
        if np.isfinite(r["psnr"]) and r["nfe"] <= r["budget"]:
            series.setdefault(r["family"], []).append(r)
    colors = iter(plt.get_cmap("tab20").colors)
    for name, points in sorted(series.items(), key=lambda kv: kv[0] != family(SHIPPED)):
        points = sorted(points, key=lambda r: r["nfe"])
        style = {
            family(SHIPPED): {"linewidth": 3, "marker": "o", "zorder": 3},
            family("meancache:"): {"linestyle": "none", "marker": "x"},  # several schedules per budget
        }.get(name, {"linewidth": 1, "linestyle": "--", "marker": "o"})
        ax.plot([STEPS / p["nfe"] for p in points], [p["psnr"] for p in points], label=name, color=next(colors),
                **style)  # fmt: skip
    save_plot(fig, ax, f"speedup in transformer compute ({STEPS} / model evaluations)",
              f"PSNR against the full {STEPS}-step run (dB)",
              f"{model_name}: quality against compute (MeanCache rows at B = {', '.join(map(str, BUDGETS))})",
              f"quality_{model_name}")  # fmt: skip


def plot_measured_speed(model_name: str, rows: list[dict]) -> None:
    """PSNR against measured wall speedup over the full run, eager (solid) and compiled (dashed, open markers):
    the Pareto front a user sees, per family of the timed rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if "speedup_eager" in r and np.isfinite(r["psnr"]):
            series.setdefault(r["family"], []).append(r)
    colors = iter(plt.get_cmap("tab10").colors)
    for name, points in sorted(series.items(), key=lambda kv: kv[0] != family(SHIPPED)):
        color = next(colors)
        for mode, style in (("eager", {"linestyle": "-"}), ("compiled", {"linestyle": "--", "mfc": "none"})):
            ordered = sorted((p for p in points if f"speedup_{mode}" in p), key=lambda p: p[f"speedup_{mode}"])
            ax.plot([p[f"speedup_{mode}"] for p in ordered], [p["psnr"] for p in ordered], marker="o", color=color,
                    linewidth=3 if name == family(SHIPPED) else 1, label=f"{name} ({mode})", **style)  # fmt: skip
    save_plot(fig, ax, f"measured speedup over the full {STEPS}-step run (denoising loop, median of 5)",
              f"PSNR against the full {STEPS}-step run (dB)",
              f"{model_name}: quality against measured speed, eager and compiled (B = {', '.join(map(str, BUDGETS))})",
              f"quality_{model_name}_measured", legend_columns=2)  # every family twice: eager, compiled  # fmt: skip


@pytest.mark.parametrize("model_name", sorted(BUNDLED_MODELS))
def test_quality(benchmark, model_name):
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    calibration = Calibration.load(bundled_model_path(model_name) / "meancache_calibration.json")
    inputs = model.inputs(CLASSES)
    euler = pipe.scheduler
    video = model.recipe.frames > 1

    def generate(seed: int, steps: int = STEPS) -> np.ndarray:
        """Images (N, H, W) or videos (N, T, H, W) in [0, 1]: the pipeline's ``output_type="np"`` output."""
        with torch.inference_mode():
            latents = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                           output_type="latent", return_dict=False)[0]  # fmt: skip
            return model.decode(latents)

    def run(steps: int = STEPS) -> dict[int, np.ndarray]:
        return {seed: generate(seed, steps) for seed in SEEDS}

    def row(method: str, budget: int, nfe: float, images: dict, references: dict) -> dict:
        metrics = [image_metrics(images[s], references[s]) for s in SEEDS]
        seen = torch.cat([recognised(torch.from_numpy(images[s]), CLASSES).flatten() for s in SEEDS])
        result = {
            "method": method, "budget": budget, "nfe": nfe,
            "psnr": float(np.mean([m[0] for m in metrics])), "ssim": float(np.mean([m[1] for m in metrics])),
            "class_acc": float(seen.float().mean()),
        }  # fmt: skip
        if video:
            result["temporal_error"] = float(np.mean([temporal_error(images[s], references[s]) for s in SEEDS]))
        return result

    def meancache_setup(method: str, schedule: Schedule) -> Setup:
        return Setup(method, lambda p: enable_mean_cache(p, MeanCacheConfig(schedule)), disable_mean_cache, STEPS,
                     touches_forward=False)  # fmt: skip

    def solver_setup(method: str, budget: int) -> Setup:
        make = SOLVERS[method]

        def enable(p: Any) -> None:
            p.scheduler = make() if make else type(euler).from_config(euler.config)

        def disable(p: Any) -> None:
            p.scheduler = type(euler).from_config(euler.config)

        return Setup(f"{method} B={budget}", enable, disable, budget, touches_forward=False)

    reference: dict = {}
    setups: dict[tuple[str, int], Setup] = {}  # (method, budget) -> how to run it, for the rows that get timed
    jvp_cost = _jvp_cost_in_forwards(pipe, inputs)

    def evaluate() -> list[dict]:
        with FlopCounter(pipe.transformer) as flops:
            references = run()
        reference.update(images=references, flops_per_evaluation=flops.flops / (STEPS * len(SEEDS)))
        rows = [row("full 50 steps (reference)", STEPS, STEPS, references, references)]
        setups["full 50 steps (reference)", STEPS] = Setup("full 50 steps (reference)", lambda p: None,
                                                           lambda p: None, STEPS, touches_forward=False)  # fmt: skip
        for budget in BUDGETS:
            for method, schedule in _schedules(model_name, calibration, budget).items():
                enable_mean_cache(pipe, MeanCacheConfig(schedule))
                images = run()
                report = summary(pipe)
                nfe = report.computed_steps
                reference["calls_per_evaluation"] = report.transformer_calls // nfe
                disable_mean_cache(pipe)
                rows.append({**row(method, budget, nfe, images, references),
                             "compute_steps": list(schedule.compute_steps), "spans": list(schedule.spans)})  # fmt: skip
                if method in (SHIPPED, "plain reuse: uniform steps"):
                    setups[method, budget] = meancache_setup(f"{method} B={budget}", schedule)
            lowest = -(-(STEPS - 1) // calibration.max_gap) + 1  # fewer computed steps cannot bridge the gaps
            pssp = {b: calibration.schedule(b, kind="closed-loop", gamma=2.0) for b in range(lowest, budget + 1)}
            fitting = [b for b, schedule in pssp.items() if _forward_equivalents(schedule, jvp_cost) <= budget]
            exact_runs = {"meancache exact-jvp: pssp closed-loop gamma=2 (same schedule)": pssp[budget]}
            if fitting:
                exact_runs["meancache exact-jvp: pssp closed-loop gamma=2 (equal compute)"] = pssp[max(fitting)]
            for method, schedule in exact_runs.items():
                enable_mean_cache(pipe, MeanCacheConfig(schedule, estimator="exact-jvp"))
                images = run()
                disable_mean_cache(pipe)
                nfe = round(_forward_equivalents(schedule, jvp_cost), 2)
                measured = row(method, budget, nfe, images, references)
                rows.append({**measured, "compute_steps": list(schedule.compute_steps), "jvp_cost": jvp_cost})
            for method, make_scheduler in SOLVERS.items():
                pipe.scheduler = make_scheduler() if make_scheduler else euler
                images = run(budget)
                pipe.scheduler = euler
                rows.append(row(method, budget, budget, images, references))
                setups[method, budget] = solver_setup(method, budget)
        return rows

    def peer_rows(references: dict) -> tuple[list[dict], list[dict]]:
        sweep, by_method = [], {}
        caches = list(block_caches(STEPS, magcache_ratios(pipe, calibration_calls(model), STEPS)))
        if video:
            caches += attention_caches(lambda: pipe.current_timestep)
        for cache in caches:
            cache.enable(pipe)
            counter = (
                FlopCounter(pipe.transformer, reference["flops_per_evaluation"])
                if cache.attention
                else BlockCounter(pipe.transformer, reference["calls_per_evaluation"])
            )
            with counter:
                images = run()
            cache.disable(pipe)
            nfe = round(counter.evaluations(len(SEEDS)), 1)
            sweep.append({**row(cache.method, 0, nfe, images, references),
                          "family": cache.family})  # fmt: skip
            by_method[cache.method] = cache
        best = []
        for name in dict.fromkeys(r["family"] for r in sweep):
            for budget in BUDGETS:
                fitting = [r for r in sweep if r["family"] == name and r["nfe"] <= budget]
                if fitting:
                    chosen = max(fitting, key=lambda r: r["psnr"])
                    best.append({**chosen, "budget": budget})
                    cache = by_method[chosen["method"]]
                    setups[chosen["method"], budget] = Setup(chosen["method"], cache.enable, cache.disable, STEPS,
                                                             touches_forward=True,
                                                             patches_class=name.startswith("cache-dit"))  # fmt: skip
        return best, sweep

    rows = benchmark.pedantic(evaluate, rounds=1, iterations=1)
    best_peers, sweep = peer_rows(reference["images"])
    rows += best_peers
    timed = list({setup.method: setup for setup in setups.values()}.values())
    for mode in ("eager", "compiled"):
        seconds = median_seconds(timed, lambda: _fresh_pipeline(model_name), inputs, SEEDS[0], mode == "compiled")
        full = seconds["full 50 steps (reference)"]
        for (method, budget), setup in setups.items():
            for r in rows:
                if r["method"] == method and r["budget"] == budget:
                    r[f"speedup_{mode}"] = full / seconds[setup.method]
    for r in rows:
        r.setdefault("family", family(r["method"]))
    write_results(f"quality_{model_name}", {
        "model": model_name, "steps": STEPS, "seeds": list(SEEDS), "classes": CLASSES,
        "transformer_calls_per_evaluation": reference["calls_per_evaluation"], "rows": rows,
        "peer_sweep": sweep, "exact_jvp_cost_in_forwards": jvp_cost,
        "timing": "median of 5 interleaved latent-only runs (10 classes, seed 0); eager, and compiled with "
                  "transformer.compile_repeated_blocks (a model copy per block cache)",
    })  # fmt: skip
    plot_quality(model_name, rows, sweep)
    plot_measured_speed(model_name, rows)
    # MeanCache and fewer-steps rows ran the model exactly B times; peers and equal-compute exact-jvp at most B
    for r in rows:
        if r["method"].startswith(("diffusers", "cache-dit")) or "equal compute" in r["method"]:
            assert r["nfe"] <= r["budget"], r
        elif "same schedule" not in r["method"]:
            assert r["nfe"] == r["budget"], r


def _fresh_pipeline(model_name: str) -> Any:
    pipe = load_digits_model(model_name).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe
