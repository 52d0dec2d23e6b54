"""``meancache generate``: one image from a checkpoint (a folder, a hub id, or a bundled digits model; a video
model's frames as an animated image), with MeanCache at a budget or from a schedule file, or without it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from meancache import MeanCacheConfig, Schedule, enable_mean_cache, summary
from meancache.cli.arguments import check_device, check_model, check_output_file, check_prompts
from meancache.cli.pipelines import DTYPES, load_pipeline
from meancache.config import DEFAULT_CALIBRATION_RUNS
from meancache.models import BUNDLED_MODELS, digits_model_frames
from meancache.validation import MAX_STEPS, check_int

FRAME_MILLISECONDS = 100
"""How long each frame of a video shows in the animated image written for it."""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"pipeline folder, hub id, or a bundled model: {', '.join(BUNDLED_MODELS)}"
    )
    parser.add_argument("--prompt", required=True, help="text prompt (for the bundled models: the digit, 0-9)")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default 50)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--budget", type=int, help="MeanCache with this many computed steps (schedule picks itself)")
    cache.add_argument("--schedule", type=Path, help="MeanCache with this schedule JSON")
    parser.add_argument(
        "--calibration-runs", type=int, metavar="R",
        help="with --budget, where no schedule is known for the model and settings: generations that run in full "
        "while MeanCache calibrates on them, the first one at once, then every tenth (the others run the budget) "
        f"(default {DEFAULT_CALIBRATION_RUNS}; 0: uniform steps, no calibration)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, required=True, help="image file to write (PNG, JPEG, ...; a video model: GIF, PNG, WebP)"
    )


def check_generate_arguments(args: argparse.Namespace) -> None:
    """The model (:func:`check_model`), ``--steps`` in [1, MAX_STEPS], ``--budget`` in [2, steps],
    ``--calibration-runs`` >= 0 and only with ``--budget``, ``--schedule`` a valid schedule that can run
    ``--steps`` (loaded here: ``args.schedule`` becomes the ``Schedule``), positive sizes, the device, the
    prompt for a digits model and ``--out`` (a writable image path)."""
    check_model(args.model)
    check_int(args.steps, "--steps", 1, MAX_STEPS)
    if args.budget is not None:
        check_int(args.budget, f"--budget (computed steps of --steps {args.steps})", 2, args.steps)
    if args.calibration_runs is not None:
        check_int(args.calibration_runs, "--calibration-runs", 0)
        if args.budget is None:
            raise ValueError("--calibration-runs applies to --budget only (a --schedule or no cache never calibrates)")
    if args.schedule is not None:
        args.schedule = Schedule.load(args.schedule)
        args.schedule.for_steps(args.steps)
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None:
            check_int(size, flag, 1)
    check_device(args.device)
    check_prompts(args.model, [args.prompt])
    check_output_file(args.out, "--out", image=True, animated=digits_model_frames(args.model) > 1)


def run_generate(args: argparse.Namespace) -> None:
    pipe, prompt_inputs = load_pipeline(args.model, args.dtype, args.device)
    cached = args.budget is not None or args.schedule is not None
    if cached:
        runs = DEFAULT_CALIBRATION_RUNS if args.calibration_runs is None else args.calibration_runs
        enable_mean_cache(pipe, MeanCacheConfig(args.schedule, args.budget, calibration_runs=runs))
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    start = time.perf_counter()
    output = pipe(**prompt_inputs(args.prompt), **size, num_inference_steps=args.steps,
                  generator=torch.Generator(args.device).manual_seed(args.seed))  # fmt: skip
    frames = output.frames[0] if hasattr(output, "frames") else [output.images[0]]  # a video pipeline: its frames
    seconds = time.perf_counter() - start
    save_frames(frames, args.out)
    print(summary(pipe) if cached else f"no cache: {args.steps} steps, every step computed")
    print(f"wrote {args.out} in {seconds:.2f} s")


def save_frames(frames: Sequence[Image.Image], path: Path) -> None:
    """One frame as a still image, several as an animated one (``FRAME_MILLISECONDS`` each, looping)."""
    if len(frames) == 1:
        frames[0].save(path)
    else:
        frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=FRAME_MILLISECONDS, loop=0)
