"""The ``meancache`` command.

Exit codes: 0 on success; 2 for refused arguments, reported before any work starts (argparse's own, and every
check of the arguments and of the files they name: ranges, devices, models, output paths and extensions, schedule
and calibration files; and a :class:`~meancache.cli.arguments.RefusedArgument`, found before the work changed
anything); 1 when the work itself fails (a model that does not load, a generation that raises). Both print
``meancache <command>: error: <message>`` on stderr, without a traceback; an error raised from another names that
one too. Options are never abbreviated (``--out`` is not ``--out-dir``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from meancache.cli.arguments import RefusedArgument, check_output_file
from meancache.cli.calibrations import add_calibrations_arguments, run_calibrations
from meancache.cli.generate import add_generate_arguments, check_generate_arguments, run_generate
from meancache.cli.schedules import (
    add_calibrate_arguments,
    add_schedule_arguments,
    check_calibrate_arguments,
    check_schedule_arguments,
    run_calibrate,
    run_schedule,
)
from meancache.models import BUNDLED_MODELS
from meancache.models.recipes import RECIPES
from meancache.validation import MAX_STEPS, check_int

ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""What the library raises for inputs it refuses or work that fails; anything else is a bug and tracebacks."""


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated options (its subcommands' parsers are of this class too)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meancache", description="MeanCache: average-velocity caching for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a bundled digits model with and without MeanCache, compared")
    demo.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    demo.add_argument(
        "--out", type=Path, default=Path("meancache_demo.png"), help="grid image to write (a video model: animated)"
    )
    demo.add_argument("--model", choices=sorted(BUNDLED_MODELS), default="digits-flux", help="bundled model")
    add_calibrate_arguments(
        commands.add_parser("calibrate", help="measure stability costs on full-compute generations of a pipeline")
    )
    add_schedule_arguments(commands.add_parser("schedule", help="solve PSSP schedules from a calibration file"))
    add_generate_arguments(commands.add_parser("generate", help="generate an image with or without MeanCache"))
    add_calibrations_arguments(commands.add_parser("calibrations", help="list or clear calibrations made on first use"))
    return parser


def check_demo_arguments(args: argparse.Namespace) -> None:
    """``--steps`` in [10, MAX_STEPS] and ``--out`` a writable image path (a video model: an animated one)."""
    from meancache.cli.demo import MIN_STEPS

    check_int(args.steps, f"--steps (the demo's smallest budget is {MIN_STEPS})", MIN_STEPS, MAX_STEPS)
    check_output_file(args.out, "--out", image=True, animated=RECIPES[args.model].frames > 1)


def run_demo_command(args: argparse.Namespace) -> None:
    from diffusers.utils.logging import disable_progress_bar

    from meancache.cli.demo import format_result, run_demo

    disable_progress_bar()  # the bundled model loads in a blink: no "Loading pipeline components" bar
    pipeline = RECIPES[args.model].pipeline_class.__name__
    print(f"MeanCache demo: bundled {args.model} model ({pipeline}), digits 0-9, {args.steps} steps, "
          f"on {platform.processor() or platform.machine()} with torch {torch.__version__}", flush=True)  # fmt: skip
    print(format_result(run_demo(args.steps, args.seed, args.out, args.model)))
    animated = "; animated, one frame of every video per image frame" if RECIPES[args.model].frames > 1 else ""
    print(f"grid (rows: methods in table order, labelled; columns: digits 0-9{animated}): {args.out}")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (check_demo_arguments, run_demo_command),
    "calibrate": (check_calibrate_arguments, run_calibrate),
    "schedule": (check_schedule_arguments, run_schedule),
    "generate": (check_generate_arguments, run_generate),
    "calibrations": (lambda args: None, run_calibrations),  # argparse checks its few arguments
}
"""Command -> (check of its arguments, the work)."""


def error_message(error: BaseException) -> str:
    """``error``'s message, then those of the errors it was raised from (a hub download's message may point to
    a cause that no traceback shows)."""
    messages = [str(error)]
    while error.__cause__ is not None:
        error = error.__cause__
        messages.append(f"{type(error).__name__}: {error}")
    return "; caused by ".join(messages)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check, run = COMMANDS[args.command]
    for step, code in ((check, 2), (run, 1)):
        try:
            step(args)
        except ERRORS as e:
            print(f"meancache {args.command}: error: {error_message(e)}", file=sys.stderr)
            return 2 if isinstance(e, RefusedArgument) else code
    return 0
