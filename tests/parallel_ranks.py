"""Helpers for running a tiny pipeline split over several real processes (ranks): spawning them with a deadline,
a loopback gloo process group, context parallelism set up through diffusers or cache-dit, and counters of what
each rank ran (transformer blocks, collectives). Used by ``tests/test_context_parallel.py`` and
``benchmarks/bench_context_parallel.py``; not collected as tests.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig, DiffusionPipeline, ParallelConfig
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = ("all_to_all", "alltoall", "all_gather", "allgather", "all_reduce", "allreduce", "send", "recv")
"""Substrings of the dispatcher op names that move data between ranks (functional and in-place c10d ops)."""


def run_ranks(worker: Callable[..., Any], world_size: int, timeout: float, *args: Any) -> list[Any]:
    """Run ``worker(rank, world_size, rendezvous, *args)`` in ``world_size`` spawned processes and return what
    each rank returned, in rank order.

    ``rendezvous`` is a ``file://`` URL in a fresh temporary directory (nothing listens on a port for it). A rank
    that raises fails this call with the rank's traceback (``torch.multiprocessing.ProcessRaisedException``) and
    the others are terminated; ranks still running after ``timeout`` seconds are killed and ``TimeoutError`` is
    raised, so a deadlock fails instead of hanging."""
    with tempfile.TemporaryDirectory(prefix="meancache-ranks-") as folder:
        rendezvous = f"file://{folder}/rendezvous"
        context = mp.start_processes(
            _run_rank, args=(worker, world_size, rendezvous, folder, args), nprocs=world_size, join=False,
            start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} ranks of {worker.__qualname__} still running after {timeout:.0f} s")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _run_rank(
    rank: int, worker: Callable[..., Any], world_size: int, rendezvous: str, folder: str, args: tuple[Any, ...]
) -> None:
    """One spawned rank: one CPU thread (the ranks share the machine's cores), gloo bound to the loopback
    interface, the worker's result saved for the parent.

    The rank then leaves with ``os._exit``, skipping the interpreter's teardown: about one run in five on this
    machine, a rank that had finished, saved and destroyed its process group still died in that teardown
    ("terminate called without an active exception", SIGABRT), which failed a run whose work was done. It
    matches PyTorch's open report of the same abort at interpreter finalization after Gloo work
    (pytorch/pytorch#190489: C++ worker threads still releasing tensors while the interpreter tears down), not
    anything a rank computed."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    result = worker(rank, world_size, rendezvous, *args)
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_ranks(rank: int, world_size: int, rendezvous: str, backend: str = "gloo", timeout_s: float = 60.0) -> None:
    """Join the default process group (gloo: CPU tensors over the loopback interface; nccl: GPUs)."""
    dist.init_process_group(
        backend, init_method=rendezvous, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )


def enable_ulysses_diffusers(transformer: torch.nn.Module, degree: int) -> None:
    """Ulysses context parallelism with diffusers' own config and hooks, as ``transformer.enable_parallelism(
    ContextParallelConfig(ulysses_degree=degree))`` sets it up, but on CPU.

    The stock call cannot run on a CPU-only torch (it takes the rank modulo ``torch.accelerator.device_count()``,
    which is 0 there), so this does its context-parallel part by hand, with the same diffusers objects: a CPU
    device mesh, ``ParallelConfig.setup``, the config on every attention processor, ``apply_context_parallel``
    with the model's ``_cp_plan``. Relies on private diffusers API (``ModelMixin._parallel_config``,
    ``processor._parallel_config``, ``diffusers.hooks.context_parallel``), checked against diffusers 0.42.1."""
    from diffusers.hooks.context_parallel import apply_context_parallel

    cp_config = ContextParallelConfig(ulysses_degree=degree)
    config = ParallelConfig(context_parallel_config=cp_config)
    mesh = dist.device_mesh.init_device_mesh("cpu", cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, cp_config, transformer._cp_plan)


def enable_ulysses_cache_dit(pipe: DiffusionPipeline, degree: int) -> None:
    """Ulysses context parallelism through cache-dit's public API (no cache-dit cache: parallelism only)."""
    import cache_dit
    from cache_dit import ParallelismConfig

    cache_dit.enable_cache(pipe, parallelism_config=ParallelismConfig(ulysses_size=degree))


class CollectiveCounter(TorchDispatchMode):
    """Counts the collective ops (by dispatcher name) run while it is active on this rank."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = func.name()
        if any(word in name for word in COLLECTIVES):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_block_calls(transformer: torch.nn.Module) -> Counter[str]:
    """A counter of forward calls of the transformer's blocks (``transformer_blocks`` and
    ``single_transformer_blocks``), kept up to date by forward pre-hooks."""
    counts: Counter[str] = Counter()
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, []):
            block.register_forward_pre_hook(lambda *_, name=name: counts.update([name]))
    return counts
