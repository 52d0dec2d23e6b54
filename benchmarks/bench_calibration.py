"""Calibration cost per generation relative to one plain generation (same pipeline, steps and inputs), before and
after batching the cost and replay computations.

Models: the bundled ``digits-flux`` (64 latent tokens, one digit, ``output_type="np"`` as in
``bench_first_use_calibration.py``) and the two sizes of the random-weight FLUX architecture of
``bench_pipeline_speedup.py`` (``output_type="latent"``), 50 steps. Per round, interleaved so that every mode sees
the same load on the machine:

* ``plain``: a generation;
* ``calibrating``: a generation observed step by step (``observe_steps``: a hook on the scheduler's ``step``, as
  first use has) by a :class:`~meancache.calibration.StabilityCostAccumulator` (max gap 8, spans 1..5: first use's
  settings);
* ``selecting``: the same, also keeping the trajectory in bfloat16 on the CPU, then picking by the paper's rule's
  replay among the candidates of a budget-10 calibration (:meth:`Calibration.candidate_schedules`; first use now
  replays every selectable estimator and refines: ``bench_first_use_calibration.py`` times that);
* ``replay``: the replay alone, on the same candidates and trajectory.

``before`` is the step-by-step implementation (one cost or candidate at a time, through the runtime estimator,
one host read per cost), kept as the reference of ``tests/test_calibration.py``; ``after`` the batched one. The
load average of the machine is recorded per model, with one intra-op thread (``THREADS``).

What first use costs where a latent is as large as a real model's (``first_use``; the demo size: 262,144 latent
elements, as FLUX.1 at 1024 x 1024, so recorded runs hold ``REPLAY_ELEMENTS`` of each step and the replay pools its
cap, as they would there): ``MeanCacheConfig(budget=BUDGET)`` on an empty calibration store, every generation
calibrating until ``calibration_runs`` (``FULL_RUN_EVERY`` set to 1; seeds 1-4), the last of them also selecting
and refining schedule and estimator by replay on the four runs; then the first generation at ``ANOTHER_BUDGET``,
which selects and refines for it on the stored runs, and one at ``BUDGET`` with the schedule chosen. Each against
the median of plain generations timed before and after. Results: ``benchmarks/results/calibration_overhead.json``
and ``benchmarks/results/first_use_overhead.json`` (each written only by its own test, with the machine it ran on).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.helpers import FLUX_SIZES, flux_pipeline, write_results
from meancache import MeanCacheConfig, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import Calibration, StabilityCostAccumulator
from meancache.calibration.replay import replay_errors
from meancache.config import DEFAULT_CALIBRATION_RUNS
from meancache.integrations.diffusers import first_use as first_use_module
from meancache.integrations.diffusers.calibration import observe_steps
from meancache.models import load_digits_model
from meancache.schedule import defaults
from meancache.testing import tiny_inputs
from tests.test_calibration import StepByStepCosts, step_by_step_replay_error

STEPS, BUDGET, MAX_GAP, MAX_SPAN = 50, 10, 8, 5
ANOTHER_BUDGET = 25
ROUNDS = {"digits-flux": 9, "tiny": 9, "demo": 2}
THREADS = 1
"""Intra-op threads while measuring: on this shared 2-core VM under load, two threads wait on each other at every
parallel op (a run with two measured plain generations 8-10x slower than unloaded, and noisier than the effect)."""
IMPLEMENTATIONS = ("before", "after")


class Observer:
    """What a calibrating generation does per step: accumulate costs and, when selecting, keep the trajectory."""

    def __init__(self, implementation: str, keep: bool) -> None:
        self.implementation, self.keep = implementation, keep
        self.costs: Any = None
        self.trajectory: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def __call__(self, step: int, z: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor) -> None:
        if step == 0:
            accumulator = StepByStepCosts if self.implementation == "before" else StabilityCostAccumulator
            self.sigmas = sigmas.tolist()
            self.costs = accumulator(self.sigmas, MAX_GAP, MAX_SPAN)
        self.costs.add_step(step, z, v)
        if self.keep:
            for kept, tensor in zip(self.trajectory, (z, v), strict=True):
                kept.append(tensor.detach().to("cpu", torch.bfloat16))

    def calibration(self) -> Calibration:
        if self.implementation == "after":
            return self.costs.result()
        one_shot, closed_loop = self.costs.costs("one-shot"), self.costs.costs("closed-loop")
        return Calibration(self.sigmas, MAX_GAP, MAX_SPAN, one_shot, closed_loop, self.costs.trajectories)


def select(implementation: str, calibration: Calibration, latents: list, velocities: list) -> tuple:
    """``(compute_steps, spans)`` of the candidate of budget ``BUDGET`` with the least replay error."""
    candidates = calibration.candidate_schedules(BUDGET)
    sigmas = calibration.sigmas
    if implementation == "after":
        errors = replay_errors(candidates, latents, velocities, sigmas)
    else:
        errors = [step_by_step_replay_error(c, latents, velocities, sigmas) for c in candidates]
    chosen = candidates[min(range(len(candidates)), key=errors.__getitem__)]
    return chosen.compute_steps, chosen.spans


def pipeline_and_call(name: str) -> tuple[Any, Callable[[], Any]]:
    if name == "digits-flux":
        model = load_digits_model(name)
        pipe, inputs, output_type = model.pipe, model.inputs([3]), "np"
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = flux_pipeline(name)
        inputs, output_type = tiny_inputs("flux", size=FLUX_SIZES[name]["size"]), "latent"

    def generate(seed: int = 0) -> Any:
        with torch.inference_mode():
            return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                        output_type=output_type)  # fmt: skip

    return pipe, generate


@pytest.mark.parametrize("name", list(ROUNDS))
def test_calibration_overhead(benchmark, name):
    _rows.append(on_measuring_threads(benchmark, lambda: measure(name)))


def on_measuring_threads(benchmark: Any, measurement: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measurement()``, run once by pytest-benchmark with ``THREADS`` intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return benchmark.pedantic(measurement, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(name: str) -> dict[str, Any]:
    """One row: medians over the rounds after the first, ratios over the plain generation."""
    pipe, generate = pipeline_and_call(name)
    generate()  # warm-up

    seconds: dict[str, list[float]] = {}
    picks: dict[str, tuple] = {}
    load = [os.getloadavg()]
    for _ in range(ROUNDS[name] + 1):  # the first round warms the calibration code up, and is dropped
        times = {"plain": timed(generate)[0]}
        for implementation in IMPLEMENTATIONS:
            observer = Observer(implementation, keep=False)
            with observe_steps(pipe, observer):
                times[f"calibrating_{implementation}"] = timed(generate)[0] + timed(observer.calibration)[0]
            observer = Observer(implementation, keep=True)

            def selecting(observer: Observer = observer, implementation: str = implementation) -> tuple:
                with observe_steps(pipe, observer):
                    generate()
                return select(implementation, observer.calibration(), *observer.trajectory)

            times[f"selecting_{implementation}"], picks[implementation] = timed(selecting)
            calibration = observer.calibration()
            times[f"replay_{implementation}"] = timed(
                lambda c=calibration, o=observer, i=implementation: select(i, c, *o.trajectory)
            )[0]
        for mode, value in times.items():
            seconds.setdefault(mode, []).append(value)
    load.append(os.getloadavg())
    assert picks["before"] == picks["after"], picks  # the same schedule, whichever implementation picks it
    medians = {mode: float(np.median(values[1:])) for mode, values in seconds.items()}
    plain = medians.pop("plain")
    row: dict[str, Any] = {"model": name, "rounds": ROUNDS[name], "plain_generation_median_s": plain}
    for mode in ("calibrating", "selecting", "replay"):
        for implementation in IMPLEMENTATIONS:
            median = medians[f"{mode}_{implementation}"]
            row[f"{mode}_{implementation}_median_s"] = median
            row[f"{mode}_{implementation}_over_plain"] = median / plain
    row["candidates"] = len(calibration.candidate_schedules(BUDGET))
    row["torch_threads"] = torch.get_num_threads()
    row["load_average_1_5_15_min"] = {"start": list(load[0]), "end": list(load[1])}
    return row


@pytest.mark.parametrize("name", ["demo"])
def test_first_use_overhead(benchmark, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / "home"))  # an empty store: an uncalibrated checkpoint
    monkeypatch.setattr(defaults, "MODEL_FAMILIES", {})  # no FLUX.1 presets: FluxPipeline would get the paper's
    monkeypatch.setattr(first_use_module, "FULL_RUN_EVERY", 1)
    _first_use.append(on_measuring_threads(benchmark, lambda: measure_first_use(name)))


def measure_first_use(name: str) -> dict[str, Any]:
    """One row of ``first_use`` (module docstring): each generation's wall time, over the plain median."""
    pipe, generate = pipeline_and_call(name)
    generate()  # warm-up
    load = [os.getloadavg()]
    plain = [timed(generate)[0]]
    generations: list[dict[str, Any]] = []

    def timed_generation(budget: int, seed: int) -> None:
        enable_mean_cache(pipe, MeanCacheConfig(budget=budget))
        try:
            seconds = timed(lambda: generate(seed))[0]
            report = summary(pipe)
        finally:
            disable_mean_cache(pipe)
        metadata = report.schedule.metadata
        generations.append({"budget": budget, "seconds": seconds, "computed_steps": report.computed_steps,
                            "source": metadata.get("source", ""),
                            "replay_moves": metadata.get("replay_moves")})  # fmt: skip

    for seed in range(1, DEFAULT_CALIBRATION_RUNS + 1):
        timed_generation(BUDGET, seed)
    timed_generation(ANOTHER_BUDGET, 0)
    timed_generation(BUDGET, 0)
    plain.append(timed(generate)[0])
    load.append(os.getloadavg())
    median = float(np.median(plain))
    for generation in generations:
        generation["over_plain"] = generation["seconds"] / median
    assert [g["computed_steps"] for g in generations] == [STEPS] * DEFAULT_CALIBRATION_RUNS + [ANOTHER_BUDGET, BUDGET]
    return {"model": name, "plain_generation_median_s": median, "plain_generations_s": plain,
            "generations": generations, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min": {"start": list(load[0]), "end": list(load[1])}}  # fmt: skip


_rows: list[dict[str, Any]] = []
_first_use: list[dict[str, Any]] = []


def teardown_module() -> None:
    if _rows:
        write_results(
            "calibration_overhead",
            {
                "benchmark": "calibrating / selecting generations vs plain, step-by-step (before) vs batched (after)",
                "steps": STEPS, "budget": BUDGET, "max_gap": MAX_GAP, "max_span": MAX_SPAN, "rows": _rows,
            },
        )  # fmt: skip
    if _first_use:
        write_results(
            "first_use_overhead",
            {"benchmark": "first use's generations vs plain where the latent is as large as a real model's",
             "steps": STEPS, "budget": BUDGET, "another_budget": ANOTHER_BUDGET, "rows": _first_use},
        )  # fmt: skip
