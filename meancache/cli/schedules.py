"""``meancache calibrate`` and ``meancache schedule``: measure stability costs, then solve schedules."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from meancache.calibration import AGGREGATES, COST_KINDS, Calibration
from meancache.schedule import Schedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (or hub id) for from_pretrained")
    parser.add_argument("--prompt", action="append", required=True, help="a calibration prompt; repeat for more")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds per prompt (default: 0)")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default 50)")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-gap", type=int, default=8, help="longest interval measured (default 8)")
    parser.add_argument("--max-span", type=int, default=5, help="largest look-back span K (default 5)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="over generations (default mean)")
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON file to write")
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


def run_calibrate(args: argparse.Namespace) -> None:
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from meancache.integrations.diffusers import calibrate_pipeline, select_schedule

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype]).to(args.device)
    pipe.set_progress_bar_config(leave=False)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    jobs = [(prompt, seed) for prompt in args.prompt for seed in args.seeds]

    def calls(progress: str) -> list[dict]:
        return [
            {"prompt": prompt, "generator": torch.Generator(args.device).manual_seed(seed), **size}
            for prompt, seed in tqdm(jobs, desc=progress, unit="generation")
        ]

    calibration = calibrate_pipeline(
        pipe, iter(calls("calibrating")), args.steps, args.max_gap, args.max_span, args.aggregate
    )
    calibration.metadata |= {
        "model": args.model, "prompts": len(args.prompt), "seeds": args.seeds, **size, "device": args.device,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    print(
        f"wrote {args.out}: {calibration.trajectories} generations x {calibration.num_steps} steps, "
        f"edges up to gap {calibration.max_gap}, spans 1..{calibration.max_span}, "
        f"{calibration.metadata['calibration_seconds']:.1f} s"
    )
    for budget in args.select or ():
        candidates = calibration.candidate_schedules(budget)
        schedule = select_schedule(pipe, calls(f"B={budget}: {len(candidates)} candidates"), candidates, args.steps)
        _write_schedule(schedule, args.out.parent / f"schedule_B{budget}.json")


def run_schedule(args: argparse.Namespace) -> None:
    calibration = Calibration.load(args.calibration)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for budget in args.budget:
        _write_schedule(calibration.schedule(budget, kind=args.cost, gamma=args.gamma),
                        args.out_dir / f"schedule_B{budget}.json")  # fmt: skip


def _write_schedule(schedule: Schedule, path: Path) -> None:
    schedule.save(path)
    if "validation_error" in schedule.metadata:
        score = f"validation error {schedule.metadata['validation_error']:.4g}"
    else:
        score = f"worst edge {schedule.metadata['worst_edge_cost']:.4g}"
    print(
        f"B={schedule.budget}: computed {list(schedule.compute_steps)} spans {list(schedule.spans)} ({score}) -> {path}"
    )
