"""Attention output + tangent in one fused pass, against ``torch.func.jvp`` through PyTorch's math-backend
SDPA (the only PyTorch attention with a forward-AD rule): median time and peak memory.

Shapes: batch 1, 8 heads, S = Sq = Sk in {1024, 4096}, head dim in {64, 128}; float32 on CPU, bfloat16 on
CUDA. Rows also time each side's forward alone (``meancache_forward``: our op without tangents;
``sdpa_forward``: PyTorch's default fused SDPA), so ``jvp / forward`` shows what the tangent costs (its
FLOPs are 2x the forward's: a ratio of 3 means the tangent is free of overhead). FLOP rates count
``12 B H S^2 D`` for output + tangent and ``4 B H S^2 D`` for a forward. Peak memory: the growth of the
process's resident set during one call on CPU (``/proc/self/status``), ``max_memory_allocated`` on CUDA.
Results: ``benchmarks/results/jvp_attention_<device>.json``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.helpers import peak_memory_bytes, write_results
from meancache.ops import jvp_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HEADS = 8
IMPLEMENTATIONS = ("meancache", "math_sdpa_jvp", "meancache_forward", "sdpa_forward")
_results: dict[tuple[int, int], dict[str, dict[str, float]]] = {}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _call(implementation: str, tensors: list[torch.Tensor]):
    q, k, v, q_t, k_t, v_t = tensors
    if implementation == "meancache":
        return lambda: jvp_attention(q, k, v, q_t, k_t, v_t)
    if implementation == "meancache_forward":
        return lambda: torch.ops.meancache.jvp_attention(q, k, v, None, None, None, None, q.shape[-1] ** -0.5)
    if implementation == "sdpa_forward":
        return lambda: F.scaled_dot_product_attention(q, k, v)

    def math_jvp():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q_t, k_t, v_t))

    return math_jvp


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("seq", (1024, 4096))
def test_jvp_attention(benchmark, seq, head_dim, implementation):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, HEADS, seq, head_dim, generator=g).to(DEVICE, DTYPE) for _ in range(6)]
    fn = _call(implementation, tensors)
    with torch.no_grad():
        peak = peak_memory_bytes(fn)

        def run():
            fn()
            _sync()

        benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1, iterations=1)
    flops = (4 if implementation.endswith("forward") else 12) * HEADS * seq * seq * head_dim
    seconds = benchmark.stats.stats.median
    _results.setdefault((seq, head_dim), {})[implementation] = {
        "median_s": seconds, "peak_bytes": peak, "tflops": flops / seconds / 1e12,
    }  # fmt: skip


def teardown_module() -> None:
    rows = []
    for (seq, head_dim), by_impl in _results.items():
        row: dict[str, object] = {"batch": 1, "heads": HEADS, "seq": seq, "head_dim": head_dim, "dtype": str(DTYPE)}
        for impl, measured in by_impl.items():
            row |= {f"{impl}_{key}": value for key, value in measured.items()}
        if {"meancache", "math_sdpa_jvp"} <= by_impl.keys():
            ours, theirs = by_impl["meancache"], by_impl["math_sdpa_jvp"]
            row["speedup_vs_math_sdpa_jvp"] = theirs["median_s"] / ours["median_s"]
            row["peak_memory_ratio_math_over_ours"] = theirs["peak_bytes"] / max(ours["peak_bytes"], 1)
        if {"meancache", "meancache_forward"} <= by_impl.keys():
            row["jvp_over_own_forward_time"] = (
                by_impl["meancache"]["median_s"] / by_impl["meancache_forward"]["median_s"]
            )
        rows.append(row)
    if rows:
        write_results(f"jvp_attention_{DEVICE}", {"benchmark": __doc__.split("\n\n")[0], "rows": rows})
