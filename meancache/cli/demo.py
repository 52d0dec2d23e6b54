"""``meancache demo``: a bundled digits model with and without MeanCache, side by side (a video model: an
animated grid, and the temporal error in the table)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.cli.generate import save_frames
from meancache.models import load_digits_model
from meancache.models.digits import CLASSES, recognised
from meancache.models.quality import image_metrics, temporal_error
from meancache.validation import MAX_STEPS, check_int

MIN_STEPS = 10
"""The demo's smallest budget."""
REPEATS = 3
"""Timed runs per method, interleaved (every method once per round); the table shows their median."""
TIMING_NOISE = 0.1
"""How far a speedup may exceed the ideal ``N / B`` (steps over model evaluations) as run-to-run noise; beyond it,
the timing is impossible for the work done and is marked as measured under load (other work slowed some runs)."""


@dataclass(frozen=True)
class DemoRow:
    method: str
    model_evaluations: int
    """Steps that ran the model; a true-CFG step (two transformer calls) counts once."""
    seconds: float
    """Median wall time of the denoising loop (``output_type="latent"``: no VAE decode)."""
    speedup: float
    psnr_db: float
    ssim: float
    class_accuracy: float
    """Share of images (a video model: of frames) in which the classifier sees the requested digit."""
    temporal_error: float | None
    """A video model's :func:`~meancache.models.quality.temporal_error` against the full run; ``None`` for images."""


@dataclass(frozen=True)
class DemoResult:
    rows: list[DemoRow]
    decode_seconds: float
    """Median wall time of one VAE decode and post-processing of the ten digits (the same for every method)."""
    repeats: int


def run_demo(
    steps: int = 50, seed: int = 0, grid_path: Path | None = None, model_name: str = "digits-flux",
    repeats: int = REPEATS,
) -> DemoResult:  # fmt: skip
    """Generate every digit with every step computed, then with MeanCache at budgets 25, 17 and 10 (the
    model's shipped calibrated schedules at 50 steps) and with plain reuse at budget 10; time and compare.

    Each method's denoising loop runs ``repeats`` times, the methods interleaved so that a slow moment of
    the machine hits them alike, and its median time is reported; the VAE decode is timed apart."""
    check_int(steps, f"steps (the demo's smallest budget is {MIN_STEPS})", MIN_STEPS, MAX_STEPS)
    model = load_digits_model(model_name)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = model.inputs(CLASSES)
    video = model.recipe.frames > 1

    def denoise(steps_run: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            latents = pipe(**inputs, num_inference_steps=steps_run, generator=torch.Generator().manual_seed(seed),
                           output_type="latent", return_dict=False)[0]  # fmt: skip
        return latents, time.perf_counter() - start

    schedules: dict[str, Schedule] = {}  # the schedule each cached method ran

    def same_steps_as_b10() -> MeanCacheConfig:
        b10 = schedules["MeanCache B=10"]
        return MeanCacheConfig(Schedule(steps, b10.compute_steps, (1,) * len(b10.spans)))

    methods: dict[str, Callable[[], MeanCacheConfig | None]] = {"full (no cache)": lambda: None}
    for budget in (b for b in (25, 17, 10) if b <= steps):  # the bundled schedules; never calibrate here
        methods[f"MeanCache B={budget}"] = lambda budget=budget: MeanCacheConfig(budget=budget, calibration_runs=0)
    methods["plain reuse B=10, same steps (K=1)"] = same_steps_as_b10
    methods["plain reuse B=10, uniform (K=1)"] = lambda: MeanCacheConfig(Schedule.uniform(steps, 10))

    denoise(2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    latents: dict[str, torch.Tensor] = {}
    evaluations: dict[str, int] = {}
    for _ in range(repeats):
        for name, config in methods.items():
            cache = config()
            if cache is not None:
                enable_mean_cache(pipe, cache)
            latents[name], seconds = denoise(steps)
            times[name].append(seconds)
            if cache is not None:
                report = summary(pipe)
                schedules[name], evaluations[name] = report.schedule, report.computed_steps
                disable_mean_cache(pipe)
            else:
                evaluations[name] = steps

    images: dict[str, np.ndarray] = {}
    decode_times = []
    for name, z in latents.items():
        start = time.perf_counter()
        with torch.inference_mode():
            images[name] = model.decode(z)
        decode_times.append(time.perf_counter() - start)

    reference, full_seconds = images["full (no cache)"], statistics.median(times["full (no cache)"])
    rows = []
    for name in methods:
        seconds = statistics.median(times[name])
        psnr, ssim = image_metrics(images[name], reference) if name != "full (no cache)" else (float("inf"), 1.0)
        accuracy = float(recognised(torch.from_numpy(images[name]), CLASSES).float().mean())
        temporal = temporal_error(images[name], reference) if video else None
        rows.append(DemoRow(name, evaluations[name], seconds, full_seconds / seconds, psnr, ssim, accuracy, temporal))
    if grid_path is not None:
        save_grid([images[r.method] for r in rows], [_label(r, steps) for r in rows], grid_path)
    return DemoResult(rows, statistics.median(decode_times), repeats)


def _label(row: DemoRow, steps: int) -> str:
    return f"{row.method}\nB = {row.model_evaluations} of {steps} steps"


def save_grid(rows: list[np.ndarray], labels: list[str], path: Path, scale: int = 4) -> None:
    """One row per method, one column per class, pixels upscaled ``scale`` times; a left gutter names each
    row (``labels``, one per row). Rows of images ``(N, H, W)`` give a still image; rows of videos
    ``(N, T, H, W)`` an animated one whose frame ``t`` shows frame ``t`` of every video."""
    if rows[0].ndim == 4:
        save_frames([_grid_image([row[:, t] for row in rows], labels, scale) for t in range(rows[0].shape[1])], path)
    else:
        save_frames([_grid_image(rows, labels, scale)], path)


def _grid_image(rows: list[np.ndarray], labels: list[str], scale: int) -> Image.Image:
    tiles = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    grid = Image.fromarray((tiles.clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=16)
    measure = ImageDraw.Draw(grid)
    pad = 8
    gutter = pad * 2 + max(int(measure.multiline_textbbox((0, 0), label, font=font)[2]) for label in labels)
    image = Image.new("L", (gutter + grid.width, grid.height), color=255)
    image.paste(grid, (gutter, 0))
    draw = ImageDraw.Draw(image)
    row_height = grid.height // len(rows)
    for index, label in enumerate(labels):
        top, bottom = draw.multiline_textbbox((0, 0), label, font=font)[1::2]
        draw.multiline_text((pad, index * row_height + (row_height - bottom - top) // 2), label, fill=0, font=font)
    return image


def format_result(result: DemoResult) -> str:
    """The comparison table (a video model: class accuracy over frames, and a temporal error column), then how
    it was timed."""
    video = result.rows[0].temporal_error is not None
    steps = result.rows[0].model_evaluations  # the full run computes every step
    under_load = {r.method for r in result.rows if r.speedup > steps / r.model_evaluations * (1 + TIMING_NOISE)}
    header = (
        f"{'method':36s} {'model evals':>17s} {'loop s':>7s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>6s} "
        f"{'class acc':>9s}" + (f" {'temporal err':>12s}" if video else "")
    )
    lines = [header, "-" * len(header)]
    for r in result.rows:
        mark = "*" if r.method in under_load else " "
        lines.append(
            f"{r.method:36s} {r.model_evaluations:17d} {r.seconds:7.3f} {r.speedup:7.2f}x{mark}{r.psnr_db:8.2f} "
            f"{r.ssim:6.3f} {r.class_accuracy:9.0%}" + (f" {r.temporal_error:12.4f}" if video else "")
        )
    lines.append(
        f"loop s: median of {result.repeats} interleaved runs of the denoising loop; the VAE decode of the ten "
        f"{'videos' if video else 'digits'} ({result.decode_seconds:.3f} s, the same for every method) is not "
        "included"
    )
    if under_load:
        lines.append(
            f"* above the ideal speedup (steps / model evals) by more than {TIMING_NOISE:.0%}: impossible for the work "
            "done, so measured under load (other work on the machine slowed some runs); rerun on a quiet machine"
        )
    if video:
        lines.append(
            "PSNR, SSIM and class acc over every frame; temporal err: mean |frame-to-frame change - the full run's| "
            "(0 = the full run's motion)"
        )
    return "\n".join(lines)
