"""MeanCache on quantized transformers, as users run them: torchao (through diffusers' ``TorchAoConfig`` and through
``quantize_``), optimum-quanto, GGUF (written with the ``gguf`` package, loaded with ``from_single_file``) and
bitsandbytes layers, on tiny Flux and true-CFG Qwen-Image, under the pipeline's own ``no_grad`` and under
``torch.inference_mode``.

Every quantized transformer is made from the tiny unquantized one saved to a folder (``from_pretrained`` from it,
or a ``.gguf`` file written from its state dict). Per quantizer, model and grad mode, at N = 10 steps and B = 4: a
full budget equals the uncached quantized run; a fixed schedule runs the transformer's blocks on its B computed
steps only; ``MeanCacheConfig(budget=B)`` calibrates on first use (the first call equals the uncached quantized run,
the next runs B steps) under a key whose weight fingerprint is the quantized model's, not the unquantized one's;
``disable_mean_cache`` restores the uncached run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache
from meancache.calibration import Calibration, calibration_store
from meancache.integrations.diffusers.key import WeightsFingerprint, weights_fingerprint
from tests.matrix import CASES
from tests.test_pipeline_matrix import run_counting_blocks

STEPS, BUDGET = 10, 4
SCHEDULE = Schedule(STEPS, (0, 1, 5, 9), (1, 3, 4))
MODELS = ("flux", "qwen-image")
CASE = {case.name: case for case in CASES if case.name in MODELS}
GRAD_MODES: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "no_grad": contextlib.nullcontext,  # the pipeline's own torch.no_grad
    "inference_mode": torch.inference_mode,
}

Quantize = Callable[[type, Path], torch.nn.Module]
"""Makes a quantized transformer of a model class from the folder its unquantized weights were saved to."""


def _loaded(model_class: type, folder: Path) -> torch.nn.Module:
    return model_class.from_pretrained(folder, torch_dtype=torch.float32)


def _torchao_diffusers(config_name: str) -> Quantize:
    """diffusers' ``TorchAoConfig`` with a torchao config, quantizing on ``from_pretrained``."""

    def quantize(model_class: type, folder: Path) -> torch.nn.Module:
        quantization = pytest.importorskip("torchao.quantization")
        from diffusers import TorchAoConfig

        config = TorchAoConfig(getattr(quantization, config_name)())
        return model_class.from_pretrained(folder, quantization_config=config, torch_dtype=torch.float32)

    return quantize


def _torchao(config_name: str) -> Quantize:
    """torchao's ``quantize_`` on the loaded model."""

    def quantize(model_class: type, folder: Path) -> torch.nn.Module:
        quantization = pytest.importorskip("torchao.quantization")
        model = _loaded(model_class, folder)
        quantization.quantize_(model, getattr(quantization, config_name)())
        return model

    return quantize


def _quanto(model_class: type, folder: Path) -> torch.nn.Module:
    """optimum-quanto's int8 weights, frozen (the weights become ``QBytesTensor``)."""
    quanto = pytest.importorskip("optimum.quanto")
    model = _loaded(model_class, folder)
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    return model


def _gguf(type_name: str) -> Quantize:
    """A ``.gguf`` file written from the saved weights with the ``gguf`` package (matrices whose rows fill whole
    blocks in ``type_name``, the rest in float32, as converters keep norms and biases), loaded with diffusers'
    ``from_single_file`` and ``GGUFQuantizationConfig`` (the keys are diffusers' own: no conversion)."""

    def quantize(model_class: type, folder: Path) -> torch.nn.Module:
        gguf = pytest.importorskip("gguf")
        from diffusers import GGUFQuantizationConfig

        kind = gguf.GGMLQuantizationType[type_name]
        block = gguf.GGML_QUANT_SIZES[kind][0]
        path = folder / f"transformer-{type_name}.gguf"
        writer = gguf.GGUFWriter(path, "meancache-test")
        for name, tensor in _loaded(model_class, folder).state_dict().items():
            array = tensor.numpy()
            if array.ndim == 2 and array.shape[-1] % block == 0:
                writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        config = GGUFQuantizationConfig(compute_dtype=torch.float32)
        return model_class.from_single_file(path, config=str(folder), quantization_config=config,
                                            torch_dtype=torch.float32)  # fmt: skip

    return quantize


def _bitsandbytes(layer: str, **settings: Any) -> Quantize:
    """Every ``nn.Linear`` of the loaded model swapped by hand for a bitsandbytes layer (``Linear8bitLt`` without
    fp16 weights, or ``Linear4bit``) holding its weights, quantized by moving it to the CPU."""

    def quantize(model_class: type, folder: Path) -> torch.nn.Module:
        bnb = pytest.importorskip("bitsandbytes")
        model = _loaded(model_class, folder)
        linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
        for name, linear in linears:
            swapped = getattr(bnb.nn, layer)(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                             **settings)  # fmt: skip
            swapped.load_state_dict(linear.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, swapped.to("cpu"))
        return model

    return quantize


QUANTIZERS: dict[str, Quantize] = {
    "torchao-int8-weight-only": _torchao_diffusers("Int8WeightOnlyConfig"),
    "torchao-int8-dynamic": _torchao("Int8DynamicActivationInt8WeightConfig"),
    "torchao-float8-weight-only": _torchao("Float8WeightOnlyConfig"),
    "quanto-qint8": _quanto,
    "gguf-q8_0": _gguf("Q8_0"),
    "bitsandbytes-int8": _bitsandbytes("Linear8bitLt", has_fp16_weights=False),
    "bitsandbytes-nf4": _bitsandbytes("Linear4bit", quant_type="nf4", compute_dtype=torch.float32),
}
"""The quantizers each model and grad mode run under MeanCache."""

OTHER_SETTINGS: dict[str, Quantize] = {
    "torchao-int8-weight-only-quantize_": _torchao("Int8WeightOnlyConfig"),
    "torchao-intx-weight-only": _torchao("IntxWeightOnlyConfig"),
    "gguf-f16": _gguf("F16"),
    "bitsandbytes-fp4": _bitsandbytes("Linear4bit", quant_type="fp4", compute_dtype=torch.float32),
    "bitsandbytes-nf4-bf16-compute": _bitsandbytes("Linear4bit", quant_type="nf4", compute_dtype=torch.bfloat16),
}
"""Other settings of the same quantizers, for the fingerprint's keying apart; the issue's other rows (torchao's
``quantize_`` with int8 weight-only and intx weight-only, GGUF F16) also run first use."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder the unquantized tiny transformer of a model was saved to (once per module)."""
    folders: dict[str, Path] = {}

    def folder(model: str) -> Path:
        if model not in folders:
            folders[model] = tmp_path_factory.mktemp(model)
            CASE[model].build()[0].transformer.save_pretrained(folders[model])
        return folders[model]

    return folder


def quantized_pipeline(model: str, quantizer: str, folder: Path) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The model's tiny pipeline with its transformer quantized by ``quantizer``, and its call arguments."""
    pipe, inputs = CASE[model].build()
    pipe.transformer = {**QUANTIZERS, **OTHER_SETTINGS}[quantizer](type(pipe.transformer), folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, inputs


def _run(model: str, pipe: DiffusionPipeline, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict, int]:
    """The final latents, and the forwards per step (:func:`run_counting_blocks`; every generation starts at step 0)."""
    return run_counting_blocks(CASE[model], pipe, inputs, begin=0)


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_meancache_on_a_quantized_transformer(saved, quantizer: str, model: str, mode: str):
    folder = saved(model)
    pipe, inputs = quantized_pipeline(model, quantizer, folder)
    with GRAD_MODES[mode]():
        baseline, counts, _ = _run(model, pipe, inputs)
        blocks = counts["blocks"]

        enable_mean_cache(pipe, MeanCacheConfig(budget=STEPS, calibration_runs=0))
        full, full_counts, _ = _run(model, pipe, inputs)
        disable_mean_cache(pipe)
        assert torch.equal(full, baseline) and full_counts == counts

        enable_mean_cache(pipe, MeanCacheConfig(SCHEDULE))
        cached, cached_counts, _ = _run(model, pipe, inputs)
        disable_mean_cache(pipe)
        assert cached_counts["blocks"] == {i: blocks[i] for i in SCHEDULE.compute_steps}  # B per CFG branch
        assert torch.isfinite(cached).all() and not torch.equal(cached, baseline)

        enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
        first = _run(model, pipe, inputs)[0]
        first_source = meancache.summary(pipe).schedule.metadata["source"]
        _, next_counts, _ = _run(model, pipe, inputs)
        report = meancache.summary(pipe)
        disable_mean_cache(pipe)
        assert torch.equal(first, baseline) and first_source.startswith("calibrating on first use"), first_source
        assert report.schedule.metadata["source"].startswith("calibrated on first use"), report.schedule.metadata
        assert next_counts["blocks"] == {i: blocks[i] for i in report.schedule.compute_steps}
        assert report.computed_steps == BUDGET

        assert torch.equal(_run(model, pipe, inputs)[0], baseline)
        quantized_weights = weights_fingerprint(torch.nn.ModuleDict({"transformer": pipe.transformer}))
    (stored,) = calibration_store().files()
    key = Calibration.load(stored).metadata["key"]
    plain = torch.nn.ModuleDict({"transformer": _loaded(type(pipe.transformer), folder)})
    assert key["weights"] == quantized_weights != weights_fingerprint(plain)


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("setting", ["torchao-int8-weight-only-quantize_", "torchao-intx-weight-only", "gguf-f16"])
def test_first_use_on_other_settings(saved, setting: str, mode: str):
    """Other settings users run (on Flux): the first call with ``budget=B`` equals the uncached quantized pipeline,
    the next runs B steps."""
    pipe, inputs = quantized_pipeline("flux", setting, saved("flux"))
    with GRAD_MODES[mode]():
        check_first_use_on_flux(pipe, inputs)


def check_first_use_on_flux(pipe: DiffusionPipeline, inputs: dict[str, Any]) -> None:
    """With ``budget=B``, the first call of the Flux pipeline equals its uncached run and the next runs B steps
    calibrated on it."""
    baseline = _run("flux", pipe, inputs)[0]
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    first = _run("flux", pipe, inputs)[0]
    _run("flux", pipe, inputs)
    report = meancache.summary(pipe)
    disable_mean_cache(pipe)
    assert torch.equal(first, baseline)
    assert report.computed_steps == BUDGET and report.schedule.metadata["source"].startswith("calibrated")


@pytest.mark.usefixtures("fresh_dynamo")
def test_first_use_on_a_compiled_quantized_transformer(saved):
    """``transformer.compile()`` (inductor) on the Flux transformer quantized through diffusers' ``TorchAoConfig``
    (int8 weight-only): the first call with ``budget=B`` equals the compiled uncached quantized pipeline, the next
    runs B steps. One quantizer only: an inductor compile takes about a minute on the CI's two cores. Run once for
    every quantizer of ``QUANTIZERS`` (docs/quantization.md): the same holds for all but bitsandbytes int8, whose
    compiled layer recompiles on every call up to dynamo's limit."""
    pipe, inputs = quantized_pipeline("flux", "torchao-int8-weight-only", saved("flux"))
    pipe.transformer.compile()
    check_first_use_on_flux(pipe, inputs)


def test_fingerprint_keys_quantizations_apart_and_a_requantization_alike(saved):
    """Per quantizer and setting, two quantizations of the Flux checkpoint have one fingerprint, the same under
    ``inference_mode``; every setting has its own, and none is the unquantized checkpoint's. Among them: torchao's
    int8 weight-only and int8 dynamic-activation weights (the same int8 codes and scales, another activation
    setting), bitsandbytes nf4 with float32 and bfloat16 compute (the same packed weights)."""
    folder = saved("flux")
    model_class = type(CASE["flux"].build()[0].transformer)
    fingerprints = {"unquantized": weights_fingerprint(_loaded(model_class, folder))}
    for name, quantize in {**QUANTIZERS, **OTHER_SETTINGS}.items():
        first, second = quantize(model_class, folder), quantize(model_class, folder)
        fingerprints[name] = weights_fingerprint(first)
        with torch.inference_mode():
            assert weights_fingerprint(first) == weights_fingerprint(second) == fingerprints[name], name
    assert len(set(fingerprints.values())) == len(fingerprints), fingerprints


def test_cached_fingerprint_follows_a_requantization_in_place(saved):
    """A quantized weight is a tensor subclass without storage of its own (``data_ptr`` 0, version 0 whatever it
    holds): the cached fingerprint follows its inner tensors, so quantizing again in place is seen."""
    quantization = pytest.importorskip("torchao.quantization")
    model = _loaded(type(CASE["flux"].build()[0].transformer), saved("flux"))
    cached = WeightsFingerprint()
    unquantized = cached(model)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    weight_only = cached(model)
    dynamic = _torchao("Int8DynamicActivationInt8WeightConfig")(type(model), saved("flux"))
    for name, module in dynamic.named_modules():
        if isinstance(module, torch.nn.Linear):
            model.get_submodule(name).weight = module.weight  # the same int8 codes and scales, another setting
    assert len({unquantized, weight_only, cached(model)}) == 3
    assert cached(model) == weights_fingerprint(dynamic)


def test_weights_made_under_inference_mode_are_fingerprinted_on_every_call():
    """Inference tensors count no versions, so an in-place write to one (possible under ``inference_mode``) would go
    unseen by the cached check: such a module is fingerprinted anew each time."""
    with torch.inference_mode():
        model = torch.nn.Linear(4, 4)
        cached = WeightsFingerprint()
        before = cached(model)
        model.weight.add_(1.0)
        assert cached(model) == weights_fingerprint(model) != before
    assert cached(model) == weights_fingerprint(model)


class _Opaque(torch.Tensor):
    """A tensor subclass whose values no operation reaches: no storage, no ``__tensor_flatten__``, every op but
    ``detach`` (which ``nn.Parameter`` needs) refused, as a quantizer's own weight class may be."""

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], setting: str) -> _Opaque:
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)
        tensor.setting = setting
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.detach.default:
            return _Opaque(args[0].shape, args[0].setting)
        raise NotImplementedError(f"_Opaque dispatch: {func}")


def test_an_unreadable_tensor_is_keyed_by_its_identity_with_one_warning(caplog: pytest.LogCaptureFixture):
    def model(setting: str) -> torch.nn.Module:
        module = torch.nn.Linear(4, 4, bias=False)
        module.weight = torch.nn.Parameter(_Opaque((4, 4), setting), requires_grad=False)
        module.register_buffer("codes", _Opaque((2,), setting))
        return module

    with caplog.at_level(logging.WARNING, logger="meancache"):
        first = weights_fingerprint(model("nf4"))
    assert caplog.text.count("could not read the values of 2 tensor(s), first weight (_Opaque") == 1
    assert weights_fingerprint(model("nf4")) == first != weights_fingerprint(model("fp4"))
    assert WeightsFingerprint()(model("nf4")) == first


def test_sampling_reads_fixed_positions_of_any_layout():
    """The gather of :func:`weights_fingerprint` reads the same elements of a transposed (non-contiguous) tensor as
    of its contiguous copy, so a layout does not change the key."""
    weights = torch.arange(24.0).reshape(4, 6)
    transposed = torch.nn.Module()
    transposed.register_buffer("w", weights.t())
    contiguous = torch.nn.Module()
    contiguous.register_buffer("w", weights.t().contiguous())
    assert not transposed.w.is_contiguous()
    assert weights_fingerprint(transposed) == weights_fingerprint(contiguous)
    np.testing.assert_array_equal(
        meancache.integrations.diffusers.key.sample_elements(weights.t(), 4).numpy(), [0.0, 2.0, 21.0, 23.0]
    )
