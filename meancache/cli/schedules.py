"""``meancache calibrate`` and ``meancache schedule``: measure stability costs, then solve schedules."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from meancache.calibration import AGGREGATES, COST_KINDS, Calibration
from meancache.cli.arguments import check_device, check_model, check_output_dir, check_output_file, check_prompts
from meancache.cli.pipelines import DTYPES, load_pipeline
from meancache.method.estimators import SELECTABLE
from meancache.models import BUNDLED_MODELS
from meancache.schedule import Schedule
from meancache.validation import MAX_STEPS, check_int


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"pipeline folder, hub id, or a bundled model: {', '.join(BUNDLED_MODELS)}"
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="a calibration prompt (bundled models: a digit); repeat"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds per prompt (default: 0)")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default 50)")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-gap", type=int, default=8, help="longest interval measured (default 8)")
    parser.add_argument("--max-span", type=int, default=5, help="largest look-back span K (default 5)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="over generations (default mean)")
    parser.add_argument("--out", type=Path, required=True, help="calibration file to write (.json)")
    parser.add_argument(
        "--select", type=int, nargs="+", metavar="B",
        help="then, per budget B, run the candidate PSSP schedules on the same prompts and seeds and write the "
        "one closest to the full runs as schedule_B<B>.json beside --out",
    )  # fmt: skip


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("calibration", type=Path, help="a file written by `meancache calibrate`")
    parser.add_argument("--budget", type=int, nargs="+", required=True, help="computed steps; one schedule each")
    parser.add_argument("--cost", choices=COST_KINDS, default="closed-loop", help="cost kind (default closed-loop)")
    parser.add_argument("--gamma", type=float, default=2.0, help="peak exponent >= 1 (default 2)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for schedule_B<budget>.json files")


def check_calibrate_arguments(args: argparse.Namespace) -> None:
    """The model (:func:`check_model`), ``--steps`` in [1, MAX_STEPS], ``--max-gap >= 2``, ``--max-span`` in
    [1, steps], each ``--select`` budget in [2, steps], positive sizes, the device, the prompts for a digits
    model, and ``--out`` (a writable ``.json`` file path; selected schedules go beside it)."""
    check_model(args.model)
    check_int(args.steps, "--steps", 1, MAX_STEPS)
    check_int(args.max_gap, "--max-gap", 2)
    check_int(args.max_span, "--max-span", 1, args.steps)
    for budget in args.select or ():
        check_int(budget, f"--select (computed steps of --steps {args.steps})", 2, args.steps)
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None:
            check_int(size, flag, 1)
    check_device(args.device)
    check_prompts(args.model, args.prompt)
    check_output_file(args.out, "--out", suffix=".json")


def run_calibrate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from meancache.calibration import select_by_replay
    from meancache.integrations.diffusers import calibrate_pipeline
    from meancache.integrations.diffusers.selection import record_runs

    pipe, prompt_inputs = load_pipeline(args.model, args.dtype, args.device)
    pipe.set_progress_bar_config(leave=False)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    jobs = [(prompt, seed) for prompt in args.prompt for seed in args.seeds]

    def calls() -> Iterator[dict]:
        """Each prompt x seed's pipeline arguments, made when the generation before it has finished."""
        for prompt, seed in jobs:
            yield {**prompt_inputs(prompt), "generator": torch.Generator(args.device).manual_seed(seed), **size}

    progress = tqdm(calls(), desc="calibrating", total=len(jobs), unit="generation")
    calibration = calibrate_pipeline(pipe, progress, args.steps, args.max_gap, args.max_span, args.aggregate)
    calibration.metadata |= {
        "model": args.model, "prompts": len(args.prompt), "seeds": args.seeds, **size, "device": args.device,
    }  # fmt: skip
    calibration.save(args.out)
    print(
        f"wrote {args.out}: {calibration.trajectories} generations x {calibration.num_steps} steps, "
        f"edges up to gap {calibration.max_gap}, spans 1..{calibration.max_span}, "
        f"{calibration.metadata['calibration_seconds']:.1f} s"
    )
    if args.select:
        print(f"recording the full runs of the {len(jobs)} generation(s) for replay", flush=True)
        runs = record_runs(pipe, list(calls()), args.steps)
    for budget in args.select or ():
        candidates = calibration.candidate_schedules(budget)
        print(f"B={budget}: replaying {len(candidates)} candidate schedules x {len(SELECTABLE)} estimators",
              flush=True)  # fmt: skip
        _write_schedule(select_by_replay(candidates, runs), args.out.parent / f"schedule_B{budget}.json")


def check_schedule_arguments(args: argparse.Namespace) -> None:
    """Loads the calibration file and solves every ``--budget`` with ``--cost`` and ``--gamma`` (the solver
    checks them; ``args.schedules`` holds the results), and checks ``--out-dir``: nothing is written yet."""
    calibration = Calibration.load(args.calibration)
    args.schedules = [calibration.schedule(budget, kind=args.cost, gamma=args.gamma) for budget in args.budget]
    check_output_dir(args.out_dir, "--out-dir")


def run_schedule(args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for schedule in args.schedules:
        _write_schedule(schedule, args.out_dir / f"schedule_B{schedule.budget}.json")


def _write_schedule(schedule: Schedule, path: Path) -> None:
    schedule.save(path)
    if "replay_error" in schedule.metadata:
        metadata = schedule.metadata
        score = f"replay error {metadata['replay_error']:.4g}, estimator {metadata['estimator']}"
    else:
        score = f"worst edge {schedule.metadata['worst_edge_cost']:.4g}"
    print(
        f"B={schedule.budget}: computed {list(schedule.compute_steps)} spans {list(schedule.spans)} ({score}) -> {path}"
    )
