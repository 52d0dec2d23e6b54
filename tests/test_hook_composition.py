"""MeanCache with diffusers' and accelerate's other hooks, each enabled both ways round: offloading and casting
compose (skipped steps run no block and no transfer; the summary counts what ran), diffusers' own caches are
refused with an error that says what to do, and disabling MeanCache leaves every other hook as it was."""

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline

SCHEDULE = Schedule(12, (0, 1, 4, 8, 11), (1, 2, 3, 4))
CALLS_PER_STEP = {"flux": 1, "qwen-image": 2}
CPU = torch.device("cpu")


def _offload_model(pipe):
    pipe.enable_model_cpu_offload(device="cpu")


def _offload_sequential(pipe):
    pipe.enable_sequential_cpu_offload(device="cpu")


def _group_offload_blocks(pipe):
    pipe.transformer.enable_group_offload(CPU, CPU, offload_type="block_level", num_blocks_per_group=1)


def _group_offload_leaves(pipe):
    pipe.transformer.enable_group_offload(CPU, CPU, offload_type="leaf_level")


def _cast_layers(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


COMPOSABLE = {
    "model CPU offload": _offload_model,
    "sequential CPU offload": _offload_sequential,
    "group offload, block level": _group_offload_blocks,
    "group offload, leaf level": _group_offload_leaves,
    "layerwise casting": _cast_layers,
}

DIFFUSERS_CACHES = {
    "FirstBlockCache": lambda: FirstBlockCacheConfig(threshold=0.2),
    "TaylorSeerCache": lambda: TaylorSeerCacheConfig(cache_interval=2),
    "MagCache": lambda: MagCacheConfig(mag_ratios=[1.0] * 12, num_inference_steps=12),
    "PyramidAttentionBroadcast": lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
    ),
    "FasterCache": lambda: FasterCacheConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500,
        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
    ),
}  # fmt: skip


class Counters:
    """Real transformer forwards (a pre-hook on the root, inside every gate) and group-offload onloads."""

    def __init__(self, transformer):
        self.forwards = 0
        self.onloads = 0
        self._handle = transformer.register_forward_pre_hook(self._count_forward)
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.get_hook("group_offloading") if registry is not None else None
            if hook is not None and "onload_" not in vars(hook.group):
                hook.group.onload_ = self._counting(hook.group.onload_)

    def _count_forward(self, *_):
        self.forwards += 1

    def _counting(self, onload):
        def counted():
            self.onloads += 1
            onload()

        return counted

    def remove(self):
        self._handle.remove()


@pytest.fixture(scope="module")
def expected():
    """MeanCache alone, and each composable setting alone, per pipeline kind (twice: run to run it is stable)."""
    results = {}
    for kind in CALLS_PER_STEP:
        pipe = tiny_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
        results[kind] = generate_latents(pipe, tiny_inputs(kind), 12)
        cast = tiny_pipeline(kind)
        cast.set_progress_bar_config(disable=True)
        _cast_layers(cast)
        enable_mean_cache(cast, MeanCacheConfig(SCHEDULE))
        results[kind, "layerwise casting"] = generate_latents(cast, tiny_inputs(kind), 12)
    return results


NEEDS_ACCELERATOR = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="accelerate's sequential offload cannot use the CPU as its execution device (fails without MeanCache too)",
)


@pytest.mark.parametrize("kind", list(CALLS_PER_STEP))
@pytest.mark.parametrize(
    "setting",
    [pytest.param(s, marks=NEEDS_ACCELERATOR) if s == "sequential CPU offload" else s for s in COMPOSABLE],
)
@pytest.mark.parametrize("meancache_first", [True, False], ids=["MeanCache first", "MeanCache second"])
def test_offloading_and_casting_compose_in_either_order(expected, kind, setting, meancache_first):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    if meancache_first:
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
        COMPOSABLE[setting](pipe)
    else:
        COMPOSABLE[setting](pipe)
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    counters = Counters(pipe.transformer)
    reference = expected.get((kind, setting), expected[kind])
    for _ in range(2):  # model offload re-applies its hooks after every call: the second generation must skip too
        before = (counters.forwards, counters.onloads)
        torch.testing.assert_close(generate_latents(pipe, tiny_inputs(kind), 12), reference, rtol=0, atol=0)
        runs = SCHEDULE.budget * CALLS_PER_STEP[kind]
        assert counters.forwards - before[0] == runs
        report = meancache.summary(pipe)
        assert (report.transformer_calls, report.skipped_calls) == (runs, (12 - SCHEDULE.budget) * CALLS_PER_STEP[kind])
        if setting == "group offload, block level":  # one onload per group per real forward, none when skipped
            groups = counters.onloads - before[1]
            assert groups > 0 and groups % runs == 0
    counters.remove()


@pytest.mark.parametrize("cache", list(DIFFUSERS_CACHES))
def test_diffusers_caches_are_refused_in_either_order(cache):
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(DIFFUSERS_CACHES[cache]())
    with pytest.raises(RuntimeError, match=r"a diffusers cache .* pipe.transformer.disable_cache\(\)"):
        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    pipe.transformer.disable_cache()
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    pipe.transformer.enable_cache(DIFFUSERS_CACHES[cache]())
    with pytest.raises(RuntimeError, match=r"would count MeanCache's computed steps as its own"):
        generate_latents(pipe, tiny_inputs("flux"), 12)
    pipe.transformer.disable_cache()
    generate_latents(pipe, tiny_inputs("flux"), 12)  # nothing was left half-started
    assert meancache.summary(pipe).transformer_calls == SCHEDULE.budget


@pytest.mark.parametrize("setting", ["group offload, block level", "layerwise casting", "FasterCache"])
def test_disable_leaves_hooks_added_later_exactly_as_they_are(setting):
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    plain = generate_latents(pipe, tiny_inputs("flux"), 12)
    enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
    generate_latents(pipe, tiny_inputs("flux"), 12)
    transformer = pipe.transformer
    if setting in COMPOSABLE:
        COMPOSABLE[setting](pipe)
    else:
        transformer.enable_cache(DIFFUSERS_CACHES[setting]())
    forward, hooks = transformer.forward, dict(transformer._diffusers_hook.hooks)
    disable_mean_cache(pipe)
    assert "_compiled_call_impl" not in vars(transformer)
    assert (transformer.forward, transformer._diffusers_hook.hooks) == (forward, hooks)
    if setting == "group offload, block level":
        assert torch.equal(generate_latents(pipe, tiny_inputs("flux"), 12), plain)
