"""The ``meancache`` command."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from meancache.cli.calibrations import add_calibrations_arguments, run_calibrations
from meancache.cli.generate import add_generate_arguments
from meancache.cli.schedules import add_calibrate_arguments, add_schedule_arguments, run_calibrate, run_schedule
from meancache.models.recipes import RECIPES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meancache", description="MeanCache: average-velocity caching for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a bundled digits model with and without MeanCache, compared")
    demo.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    demo.add_argument("--out", type=Path, default=Path("meancache_demo.png"), help="PNG grid to write")
    demo.add_argument("--model", choices=sorted(RECIPES), default="digits-flux", help="bundled model")
    add_calibrate_arguments(
        commands.add_parser("calibrate", help="measure stability costs on full-compute generations of a pipeline")
    )
    add_schedule_arguments(commands.add_parser("schedule", help="solve PSSP schedules from a calibration file"))
    add_generate_arguments(commands.add_parser("generate", help="generate an image with or without MeanCache"))
    add_calibrations_arguments(commands.add_parser("calibrations", help="list or clear calibrations made on first use"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from meancache.cli.demo import format_rows, run_demo

        if args.steps < 10:
            raise SystemExit(f"meancache demo: --steps must be at least 10 (the smallest budget), got {args.steps}")
        pipeline = RECIPES[args.model].pipeline_class.__name__
        print(f"MeanCache demo: bundled {args.model} model ({pipeline}), digits 0-9, {args.steps} steps, "
              f"on {platform.processor() or platform.machine()} with torch {torch.__version__}")  # fmt: skip
        print(format_rows(run_demo(args.steps, args.seed, args.out, args.model)))
        print(f"grid (rows: methods in table order; columns: digits 0-9): {args.out}")
    elif args.command == "calibrate":
        run_calibrate(args)
    elif args.command == "schedule":
        run_schedule(args)
    elif args.command == "calibrations":
        run_calibrations(args)
    elif args.command == "generate":
        from meancache.cli.generate import run_generate

        run_generate(args)
    return 0
