"""Measured cost for the quality benchmark: the blocks a method really runs, and its wall time, eager and
compiled, every method timed the same way.

* :class:`BlockCounter` counts the transformer's repeated blocks (``transformer._repeated_blocks``) that run,
  so a cache that computes part of the model per step is charged for that part: its evaluations per image
  are blocks run / (blocks per model x transformer calls per evaluation).
* :class:`FlopCounter` counts the FLOPs the transformer runs, for caches that skip parts of a block (attention):
  evaluations per image are FLOPs run / FLOPs of one evaluation of the full run.
* :func:`median_seconds` times setups interleaved: each repeat runs every setup once, in turn, so a drift of
  the machine's speed touches all of them alike; one timing is one pipeline call that denoises every class
  of one seed (``output_type="latent"``: the VAE decode is left out). Each block cache gets its own copy of
  the model, switched on once (they patch the model, and not all of them undo every patch when switched off).
  Methods that leave the transformer's forward alone (MeanCache, fewer steps, the reference) share one copy
  and are switched on and off around each timing. Compiled: every copy with ``compile_repeated_blocks``
  (regional compilation, what diffusers documents), warmed up until its graphs exist, so no timing includes
  a compilation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

REPEATS = 5


@dataclass(frozen=True)
class Setup:
    """A method as the benchmark runs it: switched on and off on a pipeline, at a step count."""

    method: str
    enable: Callable[[Any], None]
    disable: Callable[[Any], None]
    steps: int
    touches_forward: bool
    """Whether it changes the transformer's forward (block caches do): it then runs on its own model copy."""
    patches_class: bool = False
    """Whether switching it on patches the pipeline *class* (cache-dit does): then it is switched on only around
    its own runs, so that no two copies are patched at once."""


class BlockCounter:
    """Counts the transformer's repeated blocks (``transformer._repeated_blocks``) that really compute while
    active. A block caching hook (diffusers' FirstBlockCache, TaylorSeer, MagCache) wraps the block's forward and
    may answer a call from its cache, so a call is counted only when one of the block's own submodules runs
    during it (forward pre-hooks on the block arm it, on its children count it)."""

    def __init__(self, transformer: torch.nn.Module, calls_per_evaluation: int) -> None:
        names = set(getattr(transformer, "_repeated_blocks", ()))
        self.blocks = [m for m in transformer.modules() if type(m).__name__ in names]
        if not self.blocks:
            raise ValueError(f"{type(transformer).__name__} declares no _repeated_blocks to count")
        self.calls_per_evaluation = calls_per_evaluation
        self.count = 0
        self._armed: set[int] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> BlockCounter:
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda *_, i=index: self._armed.add(i)))
            for child in block.children():
                self._handles.append(child.register_forward_pre_hook(lambda *_, i=index: self._computed(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _computed(self, block: int) -> None:
        if block in self._armed:
            self._armed.discard(block)
            self.count += 1

    def evaluations(self, generations: int) -> float:
        """Full model evaluations per generation that the computed blocks add up to."""
        return self.count / (len(self.blocks) * self.calls_per_evaluation * generations)


def _fused_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class FlopCounter:
    """Counts the FLOPs (``torch.utils.flop_counter``: matrix products, convolutions, attention) of the
    transformer's calls while active: a :class:`~torch.utils.flop_counter.FlopCounterMode` is entered around
    each call, so the VAE and the scheduler are left out. CPU's fused attention kernel, which the flop counter
    does not know, is counted like the GPU ones. ``flops_per_evaluation``: those of one model evaluation of
    the full run (``None`` while measuring it)."""

    def __init__(self, transformer: torch.nn.Module, flops_per_evaluation: float | None = None) -> None:
        self.transformer = transformer
        self.flops_per_evaluation = flops_per_evaluation
        self.flops = 0
        self._mode: FlopCounterMode | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> FlopCounter:
        self._handles = [
            self.transformer.register_forward_pre_hook(lambda *_: self._start()),
            self.transformer.register_forward_hook(lambda *_: self._stop()),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        if self._mode is not None:
            self._stop()

    def _start(self) -> None:
        fused = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _fused_attention_flops}
        self._mode = FlopCounterMode(display=False, custom_mapping=fused)
        self._mode.__enter__()

    def _stop(self) -> None:
        self._mode.__exit__(None, None, None)
        self.flops += self._mode.get_total_flops()
        self._mode = None

    def evaluations(self, generations: int) -> float:
        """Full model evaluations per generation that the counted FLOPs add up to."""
        if self.flops_per_evaluation is None:
            raise ValueError("flops_per_evaluation is not known yet: measure a full run first")
        return self.flops / (self.flops_per_evaluation * generations)


def median_seconds(
    setups: list[Setup], load_pipe: Callable[[], Any], inputs: dict[str, Any], seed: int, compiled: bool
) -> dict[str, float]:
    """The median over :data:`REPEATS` interleaved rounds of one latent-only generation per setup."""
    torch._dynamo.reset()
    recompile_limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 4 * len(setups)  # one model copy per block cache: graphs per copy
    shared = load_pipe()
    if compiled:
        shared.transformer.compile_repeated_blocks(fullgraph=False)
    own = {}  # block caches: a model each (peers do not all undo their patches), switched on for the whole run
    for setup in setups:
        if setup.touches_forward:
            own[setup.method] = load_pipe()
            if compiled:
                own[setup.method].transformer.compile_repeated_blocks(fullgraph=False)
            if not setup.patches_class:
                setup.enable(own[setup.method])

    def generate(setup: Setup) -> float:
        pipe = own.get(setup.method, shared)
        switch = pipe is shared or setup.patches_class
        if switch:
            setup.enable(pipe)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                pipe(**inputs, num_inference_steps=setup.steps, generator=torch.Generator().manual_seed(seed),
                     output_type="latent")  # fmt: skip
            return time.perf_counter() - start
        finally:
            if switch:
                setup.disable(pipe)

    for setup in setups:  # warm-up: compiles every graph a setup needs (two runs: hooks may differ on the first)
        generate(setup)
        generate(setup)
    times: dict[str, list[float]] = {setup.method: [] for setup in setups}
    for _ in range(REPEATS):
        for setup in setups:
            times[setup.method].append(generate(setup))
    for setup in setups:
        if setup.method in own and not setup.patches_class:
            setup.disable(own[setup.method])
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = recompile_limit
    return {method: statistics.median(values) for method, values in times.items()}
