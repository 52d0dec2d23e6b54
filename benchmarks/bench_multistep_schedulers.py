"""Does MeanCache hold on multistep flow schedulers? Measured on the bundled digits models.

For each bundled model and scheduler (the pipeline's Euler, and the multistep flow solvers of
:data:`benchmarks.helpers.FLOW_MULTISTEP_SCHEDULERS`: DPM-Solver++ 2M and UniPC), the reference is the full
50-step run with *that* scheduler, over digits 0-9 x seeds 0, 1, 2. Rows at B = 10 model evaluations:

* MeanCache's rule (the paper's estimator, the model's shipped B = 10 schedule) feeding its velocity to that
  scheduler on the skipped steps. The scheduler's ``step`` is wrapped here, on the instance, with the library's
  estimator (the transformer still runs on every step and its output is dropped on skipped ones, so wall
  time is not measured): the same rule for every scheduler, including UniPC, which ``enable_mean_cache``
  refuses because of this measurement;
* the same scheduler run with 10 steps.

The estimator derives its correction from the realised latents as if each step were an Euler step
``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i``; a multistep solver's steps are not, which is what this
measures. Results: ``benchmarks/results/multistep_schedulers.json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.helpers import FLOW_MULTISTEP_SCHEDULERS, write_results
from meancache import Schedule
from meancache.method.estimators import PaperRuleEstimator
from meancache.models import IMAGE_MODELS, bundled_model_path, load_digits_model
from meancache.models.digits import CLASSES
from meancache.models.quality import image_metrics

STEPS = 50
BUDGET = 10
SEEDS = (0, 1, 2)


@contextmanager
def mean_cache_velocities(scheduler: Any, schedule: Schedule) -> Iterator[None]:
    """While active, ``scheduler`` steps with MeanCache's estimate (paper's rule) on ``schedule``'s skipped steps
    and with the model's output on its computed steps."""
    original = scheduler.step
    state: dict[str, Any] = {}

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if scheduler.step_index is None:  # a new generation
            state.update(estimator=PaperRuleEstimator(schedule), sigmas=scheduler.sigmas.tolist(), i=0)
        estimator, sigmas, i = state["estimator"], state["sigmas"], state["i"]
        if schedule.is_computed(i):
            estimator.record(i, sample, sigmas[i], model_output)
        else:
            model_output = estimator.estimate(i, sample, sigmas[i], sigmas[i + 1])[1].to(model_output.dtype)
        state["i"] = i + 1
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step


@pytest.mark.parametrize("model_name", IMAGE_MODELS)
def test_multistep_schedulers(benchmark, model_name):
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = model.inputs(CLASSES)
    euler = pipe.scheduler
    schedule = Schedule.load(bundled_model_path(model_name) / "meancache_schedules" / f"schedule_B{BUDGET}.json")

    def images(steps: int) -> list[np.ndarray]:
        with torch.inference_mode():
            return [
                pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                     output_type="np").images[..., 0]
                for seed in SEEDS
            ]  # fmt: skip

    def psnr(ours: list[np.ndarray], reference: list[np.ndarray]) -> float:
        return float(np.mean([image_metrics(o, r)[0] for o, r in zip(ours, reference, strict=True)]))

    def evaluate() -> list[dict[str, Any]]:
        rows = []
        for name, make in {"Euler": lambda: euler, **FLOW_MULTISTEP_SCHEDULERS}.items():
            pipe.scheduler = make()
            try:
                reference = images(STEPS)
                with mean_cache_velocities(pipe.scheduler, schedule):
                    cached = images(STEPS)
                fewer = images(BUDGET)
            finally:
                pipe.scheduler = euler
            rows.append({
                "scheduler": name, "budget": BUDGET, "psnr_meancache": psnr(cached, reference),
                "psnr_fewer_steps": psnr(fewer, reference),
            })  # fmt: skip
        return rows

    rows = benchmark.pedantic(evaluate, rounds=1, iterations=1)
    write_results(f"multistep_schedulers_{model_name}", {
        "model": model_name, "steps": STEPS, "seeds": list(SEEDS), "classes": CLASSES,
        "schedule": {"compute_steps": list(schedule.compute_steps), "spans": list(schedule.spans)},
        "reference": "the full 50-step run with the same scheduler", "rows": rows,
    })  # fmt: skip
    for row in rows:
        assert np.isfinite(row["psnr_meancache"]) and np.isfinite(row["psnr_fewer_steps"]), row
