"""MeanCache under context (or tensor) parallelism: every rank must skip the same steps.

When a transformer's work is split over ranks (diffusers' ``transformer.enable_parallelism``, cache-dit's
``ParallelismConfig``), each transformer call runs collectives (Ulysses all-to-all, ring exchanges, the output
all-gather) that every rank must join. MeanCache decides compute or skip from a static schedule before any of
those hooks run, so ranks that hold the same schedule stay in step by construction. A rank holding another
schedule (another budget, step count or schedule file) would wait in a collective that the others never join;
:func:`check_same_schedule_on_all_ranks` turns that into an error at the start of the generation instead.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from meancache.schedule import Schedule


def is_parallelized(transformer: torch.nn.Module) -> bool:
    """Whether diffusers (``enable_parallelism``, recorded as ``_parallel_config``) or cache-dit
    (``_is_parallelized``) split this transformer's work over ranks."""
    return getattr(transformer, "_parallel_config", None) is not None or bool(
        getattr(transformer, "_is_parallelized", False)
    )


def schedule_fingerprint(schedule: Schedule) -> int:
    """A 64-bit hash of the step count, computed steps and spans, equal on every process for equal schedules
    (Python's ``hash`` is salted per process, so it cannot be compared between ranks)."""
    text = json.dumps([schedule.num_steps, schedule.compute_steps, schedule.spans])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def check_same_schedule_on_all_ranks(schedule: Schedule, transformer: torch.nn.Module) -> None:
    """Raise ``RuntimeError`` on every rank if the ranks of the default process group hold different schedules.

    Does nothing unless ``torch.distributed`` is initialised and ``transformer`` is parallelized (ranks that
    generate independently, as in data parallelism, may hold different schedules). Otherwise every rank of the
    default group must call it at the start of the same generation, as MeanCache does: it all-gathers one
    fingerprint per rank (:func:`schedule_fingerprint`), and only when they differ, the schedules themselves, to
    name them in the error. A rank that never arrives fails the others after the process group's timeout. Over
    NCCL the gathered objects go through the current CUDA device: call ``torch.cuda.set_device(rank)`` first, as
    every context-parallel setup does."""
    if not (dist.is_available() and dist.is_initialized()) or not is_parallelized(transformer):
        return
    fingerprints: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, schedule_fingerprint(schedule))
    if len(set(fingerprints)) == 1:
        return
    schedules: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(schedules, _describe(schedule))
    listing = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(schedules))
    raise RuntimeError(
        f"MeanCache schedules differ between the ranks of this parallelized transformer (this is rank "
        f"{dist.get_rank()}), so they would skip different steps and wait on each other's collectives: {listing}. "
        "Give every rank the same MeanCacheConfig and schedule (and the same num_inference_steps)"
    )


def _describe(schedule: Schedule) -> str:
    return f"{schedule.num_steps} steps, computed {list(schedule.compute_steps)}, spans {list(schedule.spans)}"
