"""``meancache demo``: a bundled digits model with and without MeanCache, side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.models import load_digits_model
from meancache.models.digits import CLASSES, classify, digit_classifier


@dataclass(frozen=True)
class DemoRow:
    method: str
    model_evaluations: int
    """Steps that ran the model; a true-CFG step (two transformer calls) counts once."""
    seconds: float
    speedup: float
    psnr_db: float
    ssim: float
    class_accuracy: float


def image_metrics(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over a batch of images in [0, 1] of shape (N, H, W) against the reference."""
    psnr = [peak_signal_noise_ratio(r, i, data_range=1.0) for i, r in zip(images, reference, strict=True)]
    ssim = [structural_similarity(r, i, data_range=1.0) for i, r in zip(images, reference, strict=True)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def run_demo(
    steps: int = 50, seed: int = 0, grid_path: Path | None = None, model_name: str = "digits-flux"
) -> list[DemoRow]:
    """Generate every digit with every step computed, then with MeanCache at budgets 25, 17 and 10 (the
    model's shipped calibrated schedules at 50 steps) and with plain reuse at budget 10; time and compare."""
    if steps < 10:
        raise ValueError(f"the demo needs at least 10 steps (its smallest budget), got {steps}")
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = model.inputs(CLASSES)
    classifier = digit_classifier()

    def generate() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                          output_type="np", return_dict=False)[0]  # fmt: skip
        return images[..., 0], time.perf_counter() - start

    def accuracy(images: np.ndarray) -> float:
        return float((classify(classifier, torch.from_numpy(images)) == torch.tensor(CLASSES)).float().mean())

    generate()  # warm-up
    reference, full_seconds = generate()
    rows = [DemoRow("full (no cache)", steps, full_seconds, 1.0, float("inf"), 1.0, accuracy(reference))]
    grid = [reference]

    def add(name: str, config: MeanCacheConfig) -> Schedule:
        enable_mean_cache(pipe, config)
        images, seconds = generate()
        report = summary(pipe)
        disable_mean_cache(pipe)
        psnr, ssim = image_metrics(images, reference)
        rows.append(DemoRow(name, report.computed_steps, seconds, full_seconds / seconds, psnr, ssim,
                            accuracy(images)))  # fmt: skip
        grid.append(images)
        return report.schedule

    for budget in (b for b in (25, 17, 10) if b <= steps):
        smallest = add(f"MeanCache B={budget}", MeanCacheConfig(budget=budget, calibration_runs=0))  # one pass
    add("plain reuse B=10, same steps (K=1)",
        MeanCacheConfig(Schedule(steps, smallest.compute_steps, (1,) * len(smallest.spans))))  # fmt: skip
    add("plain reuse B=10, uniform (K=1)", MeanCacheConfig(Schedule.uniform(steps, 10)))
    if grid_path is not None:
        save_grid(grid, grid_path)
    return rows


def save_grid(rows: list[np.ndarray], path: Path, scale: int = 4) -> None:
    """One row per method, one column per class, pixels upscaled ``scale`` times."""
    tiles = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray((tiles.clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def format_rows(rows: list[DemoRow]) -> str:
    header = (
        f"{'method':36s} {'model evals':>17s} {'wall s':>7s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>6s} "
        f"{'class acc':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.method:36s} {r.model_evaluations:17d} {r.seconds:7.3f} {r.speedup:7.2f}x {r.psnr_db:8.2f} "
            f"{r.ssim:6.3f} {r.class_accuracy:9.0%}"
        )
    return "\n".join(lines)
