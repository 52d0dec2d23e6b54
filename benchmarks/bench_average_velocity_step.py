"""The fused average-velocity step on this machine: against the eager PyTorch composite it replaces, and
against a memory copy moving the same bytes (4 tensor reads + 2 writes).

Rows: ``fused`` and ``eager`` are the public calls (same input checks, then the fused op or the composite);
``fused_out`` is the public call writing into preallocated outputs (what MeanCache's estimator does);
``kernel`` is the dispatcher op's ``.out`` overload alone (no Python-side checks, no allocation); ``copy``
is ``dst.copy_(src)`` over 3 latents' worth of float32 (the same 6 latents of traffic).

Sizes are float32 latents (MeanCache's history dtype) of FLUX 1024x1024 (4096 x 64), Qwen-Image 1664x928
(6032 x 64) and HunyuanVideo 720p x 129 frames (16 x 33 x 90 x 160). Results:
``benchmarks/results/average_velocity_step_<device>.json``.
"""

from __future__ import annotations

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
IMPLEMENTATIONS = ("fused", "fused_out", "kernel", "eager", "copy")
_timings: dict[str, dict[str, float]] = {}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", SIZES)
def test_average_velocity_step(benchmark, size, implementation):
    shape = SIZES[size]
    inputs = [torch.randn(shape, device=DEVICE) for _ in range(4)]
    if implementation == "copy":  # the same traffic: read 3 latents' worth, write 3
        src = torch.cat([t.reshape(-1) for t in inputs[:3]])
        dst = torch.empty_like(src)

        def run():
            dst.copy_(src)
            _sync()
    elif implementation == "kernel":
        tables = _sigma_tables(inputs[0], *SIGMAS)
        z_next, u_hat = torch.empty_like(inputs[0]), torch.empty_like(inputs[0])

        def run():
            torch.ops.meancache.average_velocity_step.out(*inputs, *tables, z_next=z_next, u_hat=u_hat)
            _sync()
    elif implementation == "fused_out":
        out = (torch.empty_like(inputs[0]), torch.empty_like(inputs[0]))

        def run():
            average_velocity_step(*inputs, *SIGMAS, out=out)
            _sync()
    else:
        fn = average_velocity_step if implementation == "fused" else average_velocity_step_reference

        def run():
            fn(*inputs, *SIGMAS)
            _sync()

    benchmark.pedantic(run, rounds=50, warmup_rounds=5, iterations=1)
    _timings.setdefault(size, {})[implementation] = benchmark.stats.stats.median


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
