"""The fused average-velocity step on this machine: against the eager PyTorch composite it replaces, and
against a memory copy moving the same bytes (4 tensor reads + 2 writes).

Rows: ``fused`` and ``eager`` are the public calls (the fused op, which checks its own arguments on CPU, or
the checked composite);
``fused_out`` is the public call writing into preallocated outputs (what MeanCache's estimator does);
``kernel`` is the dispatcher op's ``.out`` overload alone (no Python-side checks, no allocation); ``copy``
is ``dst.copy_(src)`` over 3 latents' worth of float32 (the same 6 latents of traffic).

Rows are timed interleaved (each round runs every row once, in turn; the eager composite apart), median of
200 rounds, so a change in the machine's load falls on every row alike. Sizes are float32 latents
(MeanCache's history dtype) of FLUX 1024x1024 (4096 x 64), Qwen-Image 1664x928 (6032 x 64) and HunyuanVideo
720p x 129 frames (16 x 33 x 90 x 160). Results:
``benchmarks/results/average_velocity_step_<device>.json``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.helpers import write_results
from meancache.ops import average_velocity_step, average_velocity_step_reference
from meancache.ops.average_velocity_step import _sigma_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {
    "flux-1024x1024": (1, 4096, 64),
    "qwen-image-1664x928": (1, 6032, 64),
    "hunyuan-video-720p-129f": (1, 16, 33, 90, 160),
}
SIGMAS = (0.93, 0.71, 0.64)
ROUNDS = 200
_timings: dict[str, dict[str, float]] = {}


def _implementations(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """One zero-argument call per row, each on its own tensors."""
    inputs = [torch.randn(shape, device=DEVICE) for _ in range(4)]
    src = torch.cat([t.reshape(-1) for t in inputs[:3]])  # the copy: read 3 latents' worth, write 3
    dst = torch.empty_like(src)
    tables = _sigma_tables(inputs[0], *SIGMAS)
    kernel_out = (torch.empty_like(inputs[0]), torch.empty_like(inputs[0]))
    public_out = (torch.empty_like(inputs[0]), torch.empty_like(inputs[0]))
    return {
        "fused": lambda: average_velocity_step(*inputs, *SIGMAS),
        "fused_out": lambda: average_velocity_step(*inputs, *SIGMAS, out=public_out),
        "kernel": lambda: torch.ops.meancache.average_velocity_step.out(
            *inputs, *tables, z_next=kernel_out[0], u_hat=kernel_out[1]
        ),
        "eager": lambda: average_velocity_step_reference(*inputs, *SIGMAS),
        "copy": lambda: dst.copy_(src),
    }


INTERLEAVED = (("fused", "fused_out", "kernel", "copy"), ("eager",))
"""Rows timed interleaved with each other. The eager composite goes apart: freeing its five temporaries per
call trims the heap, so whichever call follows it would fault fresh pages in."""


@pytest.mark.parametrize("size", SIZES)
def test_average_velocity_step(benchmark, size):
    """Each group of :data:`INTERLEAVED` rows timed interleaved: every round runs each row once, in turn, so a
    change in the machine's load falls on all of them alike; the median of :data:`ROUNDS` rounds."""
    calls = _implementations(SIZES[size])
    seconds: dict[str, list[float]] = {name: [] for name in calls}

    def interleaved_rounds() -> None:
        for group in INTERLEAVED:
            for _ in range(ROUNDS):
                for name in group:
                    _sync()
                    start = time.perf_counter()
                    calls[name]()
                    _sync()
                    seconds[name].append(time.perf_counter() - start)

    interleaved_rounds()  # warm-up: allocator, caches, CPU frequency
    for values in seconds.values():
        values.clear()
    benchmark.pedantic(interleaved_rounds, rounds=1, iterations=1)
    _timings[size] = {name: statistics.median(values) for name, values in seconds.items()}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def teardown_module() -> None:
    rows = []
    for size, by_impl in _timings.items():
        numel = 1
        for n in SIZES[size]:
            numel *= n
        traffic = 6 * numel * 4  # bytes moved by the fused op and by the copy
        row = {"size": size, "elements": numel, "bytes_moved": traffic}
        for impl, seconds in by_impl.items():
            row[f"{impl}_median_s"] = seconds
            row[f"{impl}_GBps"] = traffic / seconds / 1e9
        for impl in ("fused", "fused_out"):
            if {impl, "eager"} <= by_impl.keys():
                row[f"{impl}_speedup_vs_eager"] = by_impl["eager"] / by_impl[impl]
        for impl in ("fused", "fused_out", "kernel"):
            if {impl, "copy"} <= by_impl.keys():
                row[f"{impl}_fraction_of_copy_bandwidth"] = by_impl["copy"] / by_impl[impl]
        rows.append(row)
    if rows:
        write_results(f"average_velocity_step_{DEVICE}", {"benchmark": __doc__.split("\n\n")[0], "rows": rows})
