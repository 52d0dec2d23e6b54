"""``meancache demo``: a small FLUX pipeline with and without MeanCache, side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.testing import tiny_inputs, tiny_pipeline


@dataclass(frozen=True)
class DemoRow:
    method: str
    transformer_calls: int
    seconds: float
    speedup: float
    psnr_db: float


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images with values in [0, 1]: ``10 log10(1 / MSE)``."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def demo_schedules(steps: int) -> dict[str, Schedule]:
    """MeanCache on the published Qwen-Image table shapes, and plain reuse (K = 1) at the smallest budget."""
    schedules = {
        f"MeanCache B={b} (qwen-image table)": Schedule.preset("qwen-image", b).for_steps(steps)
        for b in (25, 17, 10)
        if b <= steps
    }
    if not schedules:
        raise ValueError(f"the demo needs at least 10 steps (its smallest budget), got {steps}")
    smallest = min(schedules.values(), key=lambda s: s.budget)
    schedules[f"plain reuse B={smallest.budget} (K=1)"] = Schedule(
        steps, smallest.compute_steps, (1,) * len(smallest.spans)
    )
    return schedules


def run_demo(steps: int = 50, size: int = 128, seed: int = 0) -> list[DemoRow]:
    """Generate one image with every step computed, then with each demo schedule; time and compare them."""
    pipe = tiny_pipeline("flux", seed=seed, width=64)
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("flux", seed=seed, size=size)

    def generate() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                          output_type="np", return_dict=False)[0]  # fmt: skip
        return images, time.perf_counter() - start

    generate()  # warm-up
    reference, full_seconds = generate()
    rows = [DemoRow("full (no cache)", steps, full_seconds, 1.0, float("inf"))]
    for name, schedule in demo_schedules(steps).items():
        enable_mean_cache(pipe, MeanCacheConfig(schedule))
        images, seconds = generate()
        calls = summary(pipe).transformer_calls
        disable_mean_cache(pipe)
        rows.append(DemoRow(name, calls, seconds, full_seconds / seconds, psnr(images, reference)))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    header = f"{'method':36s} {'transformer evals':>17s} {'wall s':>8s} {'speedup':>8s} {'PSNR dB':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.method:36s} {r.transformer_calls:17d} {r.seconds:8.3f} {r.speedup:7.2f}x {r.psnr_db:8.2f}")
    return "\n".join(lines)
