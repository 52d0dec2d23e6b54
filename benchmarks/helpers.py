"""Shared benchmark helpers: machine description and result files in benchmarks/results/."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

RESULTS_DIR = Path(__file__).parent / "results"

FLUX_SIZES = {"tiny": {"width": 16, "size": 32}, "demo": {"width": 64, "size": 128}}
"""Random-weight FLUX architectures: ``tiny`` (the test model: per-step overhead is a visible share) and
``demo`` (the demo's model, 4096 image tokens: the transformer dominates). ``width`` is the head dim."""


@functools.cache
def flux_pipeline(size: str) -> Any:
    """The FluxPipeline of ``FLUX_SIZES[size]``, built once per process, progress bar off."""
    from meancache.testing import tiny_pipeline

    pipe = tiny_pipeline("flux", width=FLUX_SIZES[size]["width"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def own_flow_sigmas(scheduler_class: type, **config: Any) -> Any:
    """``scheduler_class(**config)`` stepping on its own flow-sigma schedule. FluxPipeline drops the sigmas it
    would pass when a scheduler has ``use_flow_sigmas``; QwenImagePipeline always passes them, which
    DPM-Solver++ cannot take. Both pipelines then run the same solver: the pipeline's sigmas only set the
    step count."""

    class OwnFlowSigmas(scheduler_class):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, **kwargs):
            steps = len(sigmas) if sigmas is not None else num_inference_steps
            super().set_timesteps(steps, device=device, **kwargs)

    return OwnFlowSigmas(**config)


FLOW_MULTISTEP_SCHEDULERS: dict[str, Callable[[], Any]] = {
    "DPM-Solver++ 2M": lambda: own_flow_sigmas(
        DPMSolverMultistepScheduler,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        algorithm_type="dpmsolver++",
        solver_order=2,
    ),
    "UniPC": lambda: own_flow_sigmas(UniPCMultistepScheduler, use_flow_sigmas=True, prediction_type="flow_prediction"),
}
"""The multistep flow solvers a user would pick (it needs the pipelines' dynamic shift: here mu = 0.47 for 64
image tokens), by name: fresh instances."""


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_1_5_15_min": list(os.getloadavg()),  # other work on the machine while measuring
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if commit.returncode == 0:
        info["git_commit"] = commit.stdout.strip()
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine description."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path


def peak_memory_bytes(fn: Any) -> int:
    """Peak memory growth while ``fn()`` runs once: ``max_memory_allocated`` on CUDA; on CPU the growth of
    the resident set's high-water mark (reset through ``/proc/self/clear_refs``)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def save_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, name: str, legend_columns: int = 1) -> None:
    """Label, grid and legend ``ax`` (in ``legend_columns``), and write ``fig`` as ``benchmarks/results/<name>.png``
    (and close it)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if legend_columns == 1 else 6, loc="upper right", ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{name}.png", dpi=120)
    plt.close(fig)
