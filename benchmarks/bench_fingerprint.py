"""The weight fingerprint of the calibration key against one transformer call, on the demo-size FLUX model
(``FLUX_SIZES["demo"]``: 4096 image tokens), unquantized and with each quantizer of ``tests/test_quantized.py``.

``weights_fingerprint`` runs when a ``budget=`` generation needs its key and the weights changed since the last
(a model holding inference tensors: every such generation). Per quantizer: the least wall time of
``weights_fingerprint(transformer)`` over 30 runs and of one transformer forward on the pipeline's first-step inputs
over 5, both under ``torch.inference_mode`` (the least: the machine is shared, and load only adds), and their
ratio; the number of parameters and buffers, and of the plain tensors the
fingerprint reads (a quantized weight holds several: codes, scales, zero points). Results:
``benchmarks/results/fingerprint.json``.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.helpers import FLUX_SIZES, flux_pipeline, write_results
from meancache.integrations.diffusers.key import tensor_parts, weights_fingerprint
from meancache.testing import tiny_inputs
from tests.test_quantized import QUANTIZERS

KINDS = ("unquantized", *QUANTIZERS)
_rows: dict[str, dict[str, Any]] = {}


@functools.cache
def _saved_demo_transformer() -> tuple[type, Path]:
    """The demo-size transformer's class and the folder its weights were saved to."""
    transformer = flux_pipeline("demo").transformer
    folder = Path(tempfile.mkdtemp(prefix="bench_fingerprint_"))
    transformer.save_pretrained(folder)
    return type(transformer), folder


@functools.cache
def _first_call_kwargs() -> dict[str, Any]:
    """The keyword arguments of the demo pipeline's first transformer call."""
    pipe = flux_pipeline("demo")
    calls: list[dict[str, Any]] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(**tiny_inputs("flux", size=FLUX_SIZES["demo"]["size"]), num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    return calls[0]


def _transformer(kind: str) -> torch.nn.Module:
    model_class, folder = _saved_demo_transformer()
    if kind == "unquantized":
        return model_class.from_pretrained(folder)
    return QUANTIZERS[kind](model_class, folder)


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_against_a_transformer_call(benchmark, kind):
    transformer = _transformer(kind)
    kwargs = _first_call_kwargs()
    with torch.inference_mode():
        transformer(**kwargs)  # warm-up (bitsandbytes and torchao pick kernels on the first call)
        benchmark.pedantic(transformer, kwargs=kwargs, rounds=5, warmup_rounds=1)
        call = benchmark.stats.stats.min
        fingerprint = min(_timed(lambda: weights_fingerprint(transformer)) for _ in range(30))
    tensors = list(transformer.parameters()) + list(transformer.buffers())
    _rows[kind] = {
        "kind": kind, "tensors": len(tensors), "plain_tensors_read": sum(len(tensor_parts(t)[1]) for t in tensors),
        "fingerprint_ms": fingerprint * 1e3, "transformer_call_ms": call * 1e3,
        "fingerprint_over_call_percent": 100 * fingerprint / call,
    }  # fmt: skip


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def teardown_module() -> None:
    if _rows:
        write_results("fingerprint", {
            "benchmark": "weights_fingerprint vs one transformer forward, demo-size FLUX (4096 image tokens), "
                         "inference_mode; best of 30 fingerprints, best of 5 calls (the machine is shared: the "
                         "least disturbed run)",
            "rows": [_rows[kind] for kind in KINDS if kind in _rows],
        })  # fmt: skip
