"""MeanCache under context parallelism: a tiny FluxPipeline split over 2 real ranks (spawned processes, gloo over
the loopback interface, file rendezvous), with Ulysses attention set up through cache-dit's public API and
through diffusers' own context-parallel hooks, MeanCache enabled before and after the parallelism.

Each stack's ranks run once (module-scoped fixture, under a deadline): an uncached parallel generation, MeanCache
enabled first, MeanCache enabled last, and a generation in which the ranks were given different schedules. The
tests then check what each rank ran. A GPU variant runs the stock ``transformer.enable_parallelism`` path (ring
attention over NCCL); it is skipped without 2 GPUs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from meancache import MeanCacheConfig, Schedule, enable_mean_cache, summary
from meancache.integrations.diffusers.distributed import check_same_schedule_on_all_ranks, schedule_fingerprint
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline
from tests.parallel_ranks import (
    CollectiveCounter,
    count_block_calls,
    enable_ulysses_cache_dit,
    enable_ulysses_diffusers,
    init_ranks,
    run_ranks,
)

WORLD_SIZE = 2
STEPS = 50
BUDGET = 10
TIMEOUT_S = 150.0
"""Deadline for one stack's 2 ranks (start-up included: about 30 s on a busy 2-core machine)."""
ORDERS = ("uncached", "mean_cache_first", "mean_cache_last")
CP_COLLECTIVES = ("_c10d_functional::all_to_all_single", "_c10d_functional::all_gather_into_tensor")
"""What the Ulysses attention (all-to-all) and the output gather hook (all-gather) run on each transformer call."""

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def _parallelize(stack: str, pipe: Any) -> None:
    if stack == "diffusers":
        enable_ulysses_diffusers(pipe.transformer, WORLD_SIZE)
    else:
        enable_ulysses_cache_dit(pipe, WORLD_SIZE)


def _stack_ranks(rank: int, world_size: int, rendezvous: str, stack: str) -> dict[str, Any]:
    """One rank: each order on a fresh pipeline, then a generation with a schedule that differs per rank."""
    init_ranks(rank, world_size, rendezvous)
    results: dict[str, Any] = {}
    try:
        for order in ORDERS:
            pipe = tiny_pipeline("flux")
            pipe.set_progress_bar_config(disable=True)
            if order == "mean_cache_first":
                enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
            _parallelize(stack, pipe)
            if order == "mean_cache_last":
                enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
            blocks = count_block_calls(pipe.transformer)
            with CollectiveCounter() as collectives:
                latents = generate_latents(pipe, tiny_inputs("flux"), STEPS)
            schedule = summary(pipe).schedule if order != "uncached" else None
            results[order] = {
                "latents": latents, "blocks": dict(blocks), "collectives": dict(collectives.counts),
                "schedule": (schedule.compute_steps, schedule.spans) if schedule else None,
            }  # fmt: skip
        results["first_use"] = _calibrate_on_first_use(stack, rendezvous)
        pipe = tiny_pipeline("flux")
        pipe.set_progress_bar_config(disable=True)
        _parallelize(stack, pipe)
        enable_mean_cache(pipe, MeanCacheConfig(Schedule.uniform(STEPS, BUDGET + 2 * rank)))
        try:
            generate_latents(pipe, tiny_inputs("flux"), STEPS)
            results["mismatch_error"] = None
        except RuntimeError as error:
            results["mismatch_error"] = str(error)
    finally:
        dist.destroy_process_group()
    return results


def _calibrate_on_first_use(stack: str, rendezvous: str) -> dict[str, Any]:
    """``MeanCacheConfig(budget=B)`` with nothing stored (the ranks share one fresh ``MEANCACHE_HOME``): one
    calibrating generation, then two with the schedule the ranks settled on."""
    os.environ["MEANCACHE_HOME"] = str(Path(rendezvous.removeprefix("file://")).parent / "meancache_home")
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    _parallelize(stack, pipe)
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    calibrating = generate_latents(pipe, tiny_inputs("flux"), STEPS)
    blocks = count_block_calls(pipe.transformer)
    cached = generate_latents(pipe, tiny_inputs("flux", seed=1), STEPS)
    cached_blocks = dict(blocks)
    schedule = summary(pipe).schedule
    return {
        "calibrating": calibrating, "cached": cached, "blocks": cached_blocks,
        "repeat": generate_latents(pipe, tiny_inputs("flux", seed=1), STEPS),
        "schedule": (schedule.compute_steps, schedule.spans), "source": schedule.metadata["source"],
    }  # fmt: skip


STACKS = [
    pytest.param("diffusers", marks=pytest.mark.diffusers_private, id="diffusers-hooks"),
    pytest.param(
        "cache-dit",
        marks=pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit not installed"),
        id="cache-dit",
    ),
]


@pytest.fixture(scope="module", params=STACKS)
def ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(_stack_ranks, WORLD_SIZE, TIMEOUT_S, request.param)


@pytest.fixture(scope="module")
def single_process() -> dict[str, Any]:
    """The same generations in this process, without parallelism: uncached and with MeanCache."""
    results: dict[str, Any] = {}
    for name in ("uncached", "mean_cache"):
        pipe = tiny_pipeline("flux")
        pipe.set_progress_bar_config(disable=True)
        if name == "mean_cache":
            enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
        results[name] = generate_latents(pipe, tiny_inputs("flux"), STEPS)
        if name == "mean_cache":
            schedule = summary(pipe).schedule
            results["schedule"] = (schedule.compute_steps, schedule.spans)
    return results


def test_every_rank_resolves_the_same_schedule(ranks, single_process):
    """``MeanCacheConfig(budget=B)`` (calibration off) resolves to one schedule in every process, in both orders."""
    schedules = {rank[order]["schedule"] for rank in ranks for order in ORDERS[1:]}
    assert schedules == {single_process["schedule"]}
    assert len(single_process["schedule"][0]) == BUDGET


@pytest.mark.parametrize("order", ORDERS[1:])
def test_skipped_steps_run_no_block_and_no_collective(ranks, order):
    """On each rank MeanCache runs B x blocks block calls, and the parallel split/gather (with its collectives)
    only on the B computed steps: exactly B / N of the uncached parallel run's all-to-alls and all-gathers. The
    one other collective is the rank check of the schedule at the start of the generation."""
    for rank in ranks:
        assert rank["uncached"]["blocks"] == {"transformer_blocks": STEPS, "single_transformer_blocks": STEPS}
        assert rank[order]["blocks"] == {"transformer_blocks": BUDGET, "single_transformer_blocks": BUDGET}
        uncached, cached = rank["uncached"]["collectives"], rank[order]["collectives"]
        assert set(CP_COLLECTIVES) <= set(uncached), uncached
        for name in CP_COLLECTIVES:
            assert cached.get(name, 0) * STEPS == uncached[name] * BUDGET, (name, cached, uncached)
        assert set(uncached) == set(CP_COLLECTIVES), uncached
        assert set(cached) > set(CP_COLLECTIVES), cached  # plus the schedule check's all-gather, once per generation


@pytest.mark.parametrize("order", ORDERS)
def test_ranks_match_a_single_process(ranks, single_process, order):
    """Every rank ends with the single-process latents (uncached and MeanCache): the split is real and exact."""
    expected = single_process["uncached" if order == "uncached" else "mean_cache"]
    for rank in ranks:
        torch.testing.assert_close(rank[order]["latents"], expected, atol=1e-5, rtol=0)


def test_different_schedules_on_two_ranks_are_an_error_not_a_hang(ranks):
    """Rank r was given ``Schedule.uniform(N, B + 2 r)``: both ranks raise, naming both schedules."""
    for rank in ranks:
        error = rank["mismatch_error"]
        assert error is not None and "schedules differ between the ranks" in error
        for budget in (BUDGET, BUDGET + 2):
            assert str(list(Schedule.uniform(STEPS, budget).compute_steps)) in error


def test_calibrate_on_first_use_under_context_parallelism(ranks):
    """The default path, ``budget=B`` on a checkpoint with nothing stored: the calibrating generation is the
    uncached parallel run, then every rank takes the same calibrated schedule and runs B x blocks; a repeat is
    bit-identical."""
    schedules = {rank["first_use"]["schedule"] for rank in ranks}
    assert len(schedules) == 1 and len(next(iter(schedules))[0]) == BUDGET
    for rank in ranks:
        first_use = rank["first_use"]
        assert torch.equal(first_use["calibrating"], rank["uncached"]["latents"])
        assert first_use["source"].startswith("calibrated on first use")
        assert first_use["blocks"] == {"transformer_blocks": BUDGET, "single_transformer_blocks": BUDGET}
        assert torch.equal(first_use["repeat"], first_use["cached"])
    torch.testing.assert_close(ranks[0]["first_use"]["cached"], ranks[1]["first_use"]["cached"], atol=1e-5, rtol=0)


def test_schedule_fingerprint_is_a_value_of_the_steps_and_spans():
    schedule = Schedule(10, (0, 4, 9), (1, 3))
    assert schedule_fingerprint(schedule) == schedule_fingerprint(Schedule(10, [0, 4, 9], [1, 3], {"model": "x"}))
    assert schedule_fingerprint(schedule) != schedule_fingerprint(Schedule(10, (0, 4, 9), (1, 2)))
    assert schedule_fingerprint(schedule) != schedule_fingerprint(Schedule(11, (0, 4, 10), (1, 3)))


def test_the_rank_check_is_off_without_a_process_group():
    assert not dist.is_initialized()
    check_same_schedule_on_all_ranks(Schedule.uniform(STEPS, BUDGET), tiny_pipeline("flux").transformer)


def _stock_ring_ranks(rank: int, world_size: int, rendezvous: str) -> dict[str, Any]:
    """One GPU rank: the stock ``enable_parallelism`` with ring attention (needs an attention backend that returns
    the log-sum-exp: cuDNN), MeanCache enabled before and after it; and MeanCache on this GPU alone."""
    torch.cuda.set_device(rank)
    init_ranks(rank, world_size, rendezvous, backend="nccl")
    results: dict[str, Any] = {}
    try:
        for order in ("single_gpu", *ORDERS[1:]):
            pipe = tiny_pipeline("flux").to(f"cuda:{rank}", torch.bfloat16)
            pipe.set_progress_bar_config(disable=True)
            pipe.transformer.set_attention_backend("_native_cudnn")
            if order in ("mean_cache_first", "single_gpu"):
                enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
            if order != "single_gpu":
                pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=world_size))
            if order == "mean_cache_last":
                enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
            blocks = count_block_calls(pipe.transformer)
            inputs = {
                key: value.to(f"cuda:{rank}", torch.bfloat16) if isinstance(value, torch.Tensor) else value
                for key, value in tiny_inputs("flux").items()
            }
            latents = generate_latents(pipe, inputs, STEPS)
            results[order] = {"latents": latents.cpu(), "blocks": dict(blocks)}
    finally:
        dist.destroy_process_group()
    return results


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_stock_enable_parallelism_ring_attention_on_two_gpus():
    ranks = run_ranks(_stock_ring_ranks, WORLD_SIZE, TIMEOUT_S)
    for order in ORDERS[1:]:
        assert [rank[order]["blocks"] for rank in ranks] == [
            {"transformer_blocks": BUDGET, "single_transformer_blocks": BUDGET}
        ] * WORLD_SIZE
        torch.testing.assert_close(ranks[0][order]["latents"], ranks[1][order]["latents"], atol=0, rtol=0)
    torch.testing.assert_close(ranks[0]["mean_cache_first"]["latents"], ranks[0]["mean_cache_last"]["latents"])
    parallel, single = ranks[0]["mean_cache_first"]["latents"].float(), ranks[0]["single_gpu"]["latents"].float()
    assert (parallel - single).norm() <= 0.02 * single.norm()  # bfloat16, ring-merged softmax vs one kernel
