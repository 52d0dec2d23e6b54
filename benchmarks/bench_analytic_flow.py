"""Estimators and solvers on a flow with a closed-form velocity: flow matching on a 16-D Gaussian mixture.

The model error is zero here (:class:`meancache.method.analytic_flow.GaussianMixtureFlow`, 6 components, stds
0.05-0.3, velocity checked by ``tests/test_analytic_flow.py``), so every row's error is the sampler's. Grid: the
bundled pipelines' 50-step sigmas (``linspace(1, 1/50, 50)``, then 0). 256 evaluation starts (seed 1); the
calibration (:func:`meancache.calibration.calibrate`, max gap 8, spans 1-5) runs on 64 other starts (seed 2).
Two references: the exact ODE (RK4 on 500 steps, checked against 1000) and the full 50-step Euler run (what a cache
approximates; the digits benchmarks' reference). Rows at B = 8, 10, 13, 17, 25 evaluations:

* fewer steps with B evaluations: Euler and DPM-Solver++ 2M (data prediction, log-SNR; first order on the first
  and last step, as diffusers);
* the paper's rule on uniform steps (spans 1, 2, 3), on the single PSSP solution (closed-loop costs, gamma 2), and on
  the calibration's candidate schedules picked by replay on the calibration trajectories (the analogue of the shipped
  schedules);
* what first use and the shipped schedules do by default: the candidate and the estimator of
  :data:`~meancache.method.estimators.SELECTABLE` picked together by replay on the calibration trajectories, then
  refined (:func:`~meancache.calibration.select_by_replay`); the same unrefined; and stop 25's default (the
  schedule picked under the paper's rule, then its estimator);
* extrapolation estimators (:class:`~meancache.method.estimators.TrajectoryExtrapolationEstimator`) on the same
  replay-picked schedule and on uniform steps: the registered ``data-linear`` and the variants of the digits grid.

Error: RMS over all elements of the final samples, and ``20 log10(range of the reference / RMS)`` dB.
Results: ``benchmarks/results/analytic_flow.json``.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.bench_estimators import registered
from benchmarks.helpers import write_results
from meancache import Schedule, sample
from meancache.calibration import calibrate, select_by_replay, select_estimator_by_replay
from meancache.calibration.replay import replay_errors
from meancache.method.analytic_flow import (
    GaussianMixtureFlow,
    dpm_solver_pp_2m,
    euler,
    flow_sigmas,
    psnr_db,
    rk4,
    rms,
)
from meancache.method.estimators import DataLinearEstimator

STEPS = 50
BUDGETS = (8, 10, 13, 17, 25)
VARIANTS = {
    **{
        f"{target}-linear damping={damping:g}": {"target": target, "damping": damping, "min_base": 1.0}
        for target in ("velocity", "data")
        for damping in (0.5, 0.75, 1.0)
    },
    "velocity-linear, last two computed steps, undamped": {"target": "velocity", "damping": 1.0, "min_base": 0.0},
    "data-linear in log-SNR, last two computed steps, undamped": {
        "target": "data",
        "variable": "lambda",
        "damping": 1.0,
        "min_base": 0.0,
    },
    "velocity-quadratic, last three computed steps": {
        "target": "velocity",
        "damping": 1.0,
        "min_base": 0.0,
        "order": 3,
    },
}


def test_analytic_flow(benchmark):
    flow = GaussianMixtureFlow.random(dim=16, components=6, seed=0)
    sigmas = flow_sigmas(STEPS)
    z0 = torch.randn(256, flow.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calibration_starts = torch.randn(64, flow.dim, generator=torch.Generator().manual_seed(2))

    def velocity32(z: torch.Tensor, sigma: float) -> torch.Tensor:
        return flow.velocity(z, sigma).float()

    def run() -> dict[str, Any]:
        exact = rk4(flow.velocity, z0, flow_sigmas(500))
        exact_check = rms(rk4(flow.velocity, z0, flow_sigmas(1000)), exact)
        full = euler(flow.velocity, z0, sigmas)
        calibration = calibrate(velocity32, [z[None] for z in calibration_starts], sigmas, max_gap=8, max_span=5)
        latents, velocities, z = [], [], calibration_starts
        for i in range(STEPS):  # the calibration trajectories again, batched, for the replay
            v = velocity32(z, sigmas[i])
            latents.append(z)
            velocities.append(v)
            z = z + (sigmas[i + 1] - sigmas[i]) * v

        def row(method: str, budget: int, out: torch.Tensor, schedule: Schedule | None = None) -> dict[str, Any]:
            out = out.double()
            result = {"method": method, "budget": budget, "rms_vs_exact": rms(out, exact),
                      "psnr_vs_exact": psnr_db(rms(out, exact), exact), "rms_vs_full_50": rms(out, full),
                      "psnr_vs_full_50": psnr_db(rms(out, full), full)}  # fmt: skip
            if schedule is not None:
                result |= {"compute_steps": list(schedule.compute_steps), "spans": list(schedule.spans)}
            return result

        rows = [row("full 50 Euler steps", STEPS, full)]
        with registered(VARIANTS):
            for budget in BUDGETS:
                rows.append(row("fewer steps: Euler", budget, euler(flow.velocity, z0, flow_sigmas(budget))))
                rows.append(row("fewer steps: DPM-Solver++ 2M", budget,
                                dpm_solver_pp_2m(flow.velocity, z0, flow_sigmas(budget))))  # fmt: skip
                uniform = Schedule.uniform(STEPS, budget)
                candidates = calibration.candidate_schedules(budget)
                paper_errors = replay_errors(candidates, latents, velocities, sigmas)
                picked = candidates[min(range(len(candidates)), key=paper_errors.__getitem__)]
                schedules = {
                    **{f"uniform, span {k}": Schedule.uniform(STEPS, budget, span=k) for k in (1, 2, 3)},
                    "pssp closed-loop gamma 2": calibration.schedule(budget),
                    "pssp candidates, replay pick": picked,
                }
                for label, schedule in schedules.items():
                    rows.append(row(f"paper: {label}", budget, sample(velocity32, z0.float(), sigmas, schedule),
                                    schedule))  # fmt: skip
                runs = [(latents, velocities, sigmas)]
                for method, chosen in (
                    ("default: schedule and estimator picked together by replay, refined",
                     select_by_replay(candidates, runs)),
                    ("picked together by replay, not refined", select_by_replay(candidates, runs, refine=False)),
                    ("stop 25: replay pick under the paper's rule, then the estimator picked by replay",
                     select_estimator_by_replay(picked, runs)),
                ):  # fmt: skip
                    rows.append({**row(method, budget, sample(velocity32, z0.float(), sigmas, chosen), chosen),
                                 "estimator": chosen.metadata["estimator"]})  # fmt: skip
                for name in (DataLinearEstimator.name, *VARIANTS):
                    for label, schedule in (("pssp candidates, replay pick", picked), ("uniform", uniform)):
                        out = sample(velocity32, z0.float(), sigmas, schedule, estimator=name)
                        rows.append(row(f"{name}: {label}", budget, out, schedule))
        return {"rows": rows, "exact_rk4_500_vs_1000_rms": exact_check}

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    write_results("analytic_flow", {
        "flow": {"dim": flow.dim, "components": len(flow.weights), "stds": flow.stds.tolist(),
                 "weights": flow.weights.tolist(), "seed": 0},
        "steps": STEPS, "sigmas": sigmas, "evaluation_samples": len(z0), "calibration_samples": len(calibration_starts),
        "variants": VARIANTS, **results,
    })  # fmt: skip
    assert results["exact_rk4_500_vs_1000_rms"] < 1e-6
