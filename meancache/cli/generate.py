"""``meancache generate``: one image from a checkpoint (a folder, a hub id, or a bundled digits model),
with MeanCache at a budget or from a schedule file, or without it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from meancache import MeanCacheConfig, Schedule, enable_mean_cache, summary
from meancache.cli.schedules import DTYPES
from meancache.models import BUNDLED_MODELS, load_digits_model


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"pipeline folder, hub id, or a bundled model: {', '.join(BUNDLED_MODELS)}"
    )
    parser.add_argument("--prompt", required=True, help="text prompt (for the bundled models: the digit, 0-9)")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default 50)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--budget", type=int, help="MeanCache with this many computed steps (schedule picks itself)")
    cache.add_argument("--schedule", type=Path, help="MeanCache with this schedule JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="image file to write (PNG, JPEG, ...)")


def run_generate(args: argparse.Namespace) -> None:
    pipe, inputs = _load(args)
    if args.budget is not None or args.schedule is not None:
        schedule = Schedule.load(args.schedule) if args.schedule is not None else None
        enable_mean_cache(pipe, MeanCacheConfig(schedule=schedule, budget=args.budget))
    start = time.perf_counter()
    image = pipe(**inputs, num_inference_steps=args.steps,
                 generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]  # fmt: skip
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    cached = args.budget is not None or args.schedule is not None
    print(summary(pipe) if cached else f"no cache: {args.steps} steps, every step computed")
    print(f"wrote {args.out} in {seconds:.2f} s")


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    if args.model in BUNDLED_MODELS:
        if args.prompt not in [str(d) for d in range(10)]:
            raise SystemExit(
                f"meancache generate: {args.model} draws a digit: --prompt must be 0-9, got {args.prompt!r}"
            )
        model = load_digits_model(args.model, dtype=DTYPES[args.dtype])
        return model.pipe.to(args.device), {**model.inputs([int(args.prompt)]), **size}
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    return pipe, {"prompt": args.prompt, **size}
