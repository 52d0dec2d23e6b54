"""``meancache calibrations list`` and ``meancache calibrations clear [KEY...]``: the calibrations made on first use."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from meancache.calibration import Calibration, calibration_store
from meancache.cli.arguments import RefusedArgument


def add_calibrations_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="one line per stored calibration: key, model, settings, generations")
    clear = actions.add_parser("clear", help="delete stored calibrations (all of them without KEY)")
    clear.add_argument("keys", nargs="*", metavar="KEY", help="keys (or unique key prefixes) from `list`")


def run_calibrations(args: argparse.Namespace) -> None:
    store = calibration_store()
    if args.action == "list":
        files = store.files()
        print(f"{len(files)} calibration(s) in {store.folder}")
        for path in files:
            print(_describe(path))
    else:
        try:
            removed = store.remove(args.keys)
        except ValueError as e:  # an unknown or ambiguous key; nothing was deleted
            raise RefusedArgument(str(e)) from None
        print(f"removed {len(removed)} calibration(s) from {store.folder}")


def _describe(path: Path) -> str:
    """``KEY  pipeline checkpoint  N steps  latent shape dtype  guidance  generations  date``."""
    modified = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    try:
        calibration = Calibration.load(path)
        key = calibration.metadata["key"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"warning: {path} is unreadable ({e}); `meancache calibrations clear {path.stem}` deletes it",
              file=sys.stderr)  # fmt: skip
        return f"{path.stem}  (unreadable)  {modified}"
    guidance = ", ".join(f"{k}={v}" for k, v in key.get("guidance", {}).items()) or "-"
    return (
        f"{path.stem}  {key['pipeline']} {key['checkpoint'] or '(unnamed)'}  {calibration.num_steps} steps  "
        f"latents {key['latent_shape']} {key['dtype']}  guidance: {guidance}  weights {key['weights']}  "
        f"{calibration.trajectories} generation(s)  {modified}"
    )
