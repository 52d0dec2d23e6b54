"""Flux-family cases: Flux (with its Fill, Kontext, Control and ControlNet variants), VisualCloze, Chroma and Flux2."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    ChromaImg2ImgPipeline,
    ChromaInpaintPipeline,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxControlImg2ImgPipeline,
    FluxControlInpaintPipeline,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    VisualClozeGenerationPipeline,
    VisualClozePipeline,
)

from tests.matrix.common import (
    CONTROL,
    IMG2IMG,
    INPAINT,
    SIZE,
    Build,
    Case,
    clip_t5_text_encoders,
    inpaint_mask,
    kl_vae,
    pil_image,
    randn,
    tensor_image,
    tiny,
)


def _flux_transformer(in_channels: int = 16, model: type = FluxTransformer2DModel) -> torch.nn.Module:
    """A one-double-block, one-single-block Flux transformer (or, with ``model``, a Flux ControlNet of that size)."""
    torch.manual_seed(0)
    out = {"out_channels": 16} if model is FluxTransformer2DModel else {}
    return model(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True, **out,
    )  # fmt: skip


def _flux_inputs(negative: bool = False) -> dict[str, Any]:
    inputs = {"prompt_embeds": randn(1, 8, 32), "pooled_prompt_embeds": randn(1, 32, seed=1),
              "height": SIZE, "width": SIZE}  # fmt: skip
    if negative:
        inputs |= {"negative_prompt_embeds": randn(1, 8, 32, seed=2),
                   "negative_pooled_prompt_embeds": randn(1, 32, seed=3), "true_cfg_scale": 3.0}  # fmt: skip
    return inputs


def _flux_components(in_channels: int = 16) -> dict[str, Any]:
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": kl_vae(4), "text_encoder": None,
            "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
            "transformer": _flux_transformer(in_channels)}  # fmt: skip


KONTEXT: dict[str, Any] = {"image": tensor_image(), "max_area": SIZE * SIZE, "_auto_resize": False}


def _flux(pipeline: type, in_channels: int = 16, controlnet: bool = False, **extra: Any) -> Build:
    """A Flux-family pipeline on the tiny Flux components: ``in_channels`` of the transformer (Flux Control appends
    the control image's latent channels), with a ControlNet of the same size if ``controlnet``."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        components = _flux_components(in_channels)
        if controlnet:
            components["controlnet"] = _flux_transformer(model=FluxControlNetModel)
        return pipeline(**components), {**_flux_inputs(), **extra}

    return build


def _visualcloze(pipeline: type = VisualClozeGenerationPipeline, **extra: Any) -> Build:
    """A VisualCloze pipeline on the tiny Flux components (the target's masked-image latents and mask as extra input
    channels, as Flux Fill) and real text encoders: its inputs check refuses prompt embeddings without a task
    prompt, and encodes any task prompt. The combined pipeline runs the generation, then an SDEdit upsampling."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        pipe = pipeline(**_flux_components(16 + 16 + 256) | clip_t5_text_encoders(), resolution=SIZE)
        for inner in (getattr(pipe, name, None) for name in ("generation_pipe", "upsampling_pipe")):
            if inner is not None:
                inner.set_progress_bar_config(disable=True)  # the combined pipeline's setting does not reach them
        grid = [[pil_image(0), pil_image(1)], [pil_image(2), None]]  # an in-context example, then the query
        return pipe, {"task_prompt": "depth to image", "content_prompt": "a lake", "image": grid,
                      "max_sequence_length": 16, "guidance_scale": 5.0, **extra}  # fmt: skip

    return build


def _chroma(pipeline: type, **extra: Any) -> Build:
    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32,
            approximator_layers=1,
        )  # fmt: skip
        transformer.register_to_config(guidance_embeds=False)  # ChromaInpaintPipeline reads it (not in the model)
        pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4), text_encoder=None,
                        tokenizer=None, transformer=transformer)  # fmt: skip
        mask = torch.ones(1, 8, dtype=torch.bool)
        return pipe, {"prompt_embeds": randn(1, 8, 32), "negative_prompt_embeds": randn(1, 8, 32, seed=1),
                      "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone(),
                      "guidance_scale": 4.0, "height": SIZE, "width": SIZE, **extra}  # fmt: skip

    return build


def _flux2(pipeline: type = Flux2Pipeline, reference: bool = False, **extra: Any) -> Build:
    """A Flux2-family pipeline; Klein's transformer has no guidance embedding (it runs true CFG, or, Klein KV, no
    guidance at all)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=pipeline is Flux2Pipeline,
        )  # fmt: skip
        vae = AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=2, sample_size=SIZE)  # fmt: skip
        pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        transformer=transformer)  # fmt: skip
        guidance = (
            {"guidance_scale": 4.0} if "guidance_scale" in inspect.signature(pipeline.__call__).parameters else {}
        )
        inputs = {"prompt_embeds": randn(1, 8, 32), **guidance, "height": SIZE, "width": SIZE, **extra}
        return pipe, {**inputs, "image": pil_image(size=64)} if reference else inputs  # its smallest image

    return build


CASES: tuple[Case, ...] = (
    Case("flux", "FluxPipeline", tiny("flux"), "guidance-distilled, one branch"),
    Case(
        "flux-true-cfg",
        "FluxPipeline",
        _flux(FluxPipeline, **_flux_inputs(negative=True)),
        "true CFG: two calls per step",
    ),
    Case(
        "flux-img2img", "FluxImg2ImgPipeline", _flux(FluxImg2ImgPipeline, **IMG2IMG | {"strength": 1.0}), "strength 1"
    ),
    Case(
        "flux-img2img-0.6",
        "FluxImg2ImgPipeline",
        _flux(FluxImg2ImgPipeline, **IMG2IMG),
        "strength 0.6: N - b steps over sigmas[b:]",
    ),
    Case("flux-inpaint", "FluxInpaintPipeline", _flux(FluxInpaintPipeline, **INPAINT), "strength 0.6"),
    Case(
        "flux-fill",
        "FluxFillPipeline",
        _flux(FluxFillPipeline, 16 + 16 + 256, image=tensor_image(), mask_image=inpaint_mask()),
        "masked image and mask as extra input channels",
    ),
    Case(
        "flux-kontext",
        "FluxKontextPipeline",
        _flux(FluxKontextPipeline, **KONTEXT),
        "reference-image tokens after the latent tokens",
    ),
    Case(
        "flux-kontext-inpaint",
        "FluxKontextInpaintPipeline",
        _flux(FluxKontextInpaintPipeline, **KONTEXT, mask_image=inpaint_mask(), strength=0.6),
        "reference-image tokens; inpainting at strength 0.6",
    ),
    Case(
        "visualcloze",
        "VisualClozeGenerationPipeline",
        _visualcloze(),
        "Flux Fill-like: the query's masked grid as extra input channels; text encoders run",
    ),
    Case(
        "visualcloze-upsampling",
        "VisualClozePipeline",
        _visualcloze(VisualClozePipeline, upsampling_height=SIZE, upsampling_width=SIZE),
        "two loops per call (the generation, then an SDEdit upsampling at its default strength 1), each a generation "
        "at the budget",
        loops=2,
    ),
    Case(
        "flux-control",
        "FluxControlPipeline",
        _flux(FluxControlPipeline, 32, control_image=tensor_image(1)),
        "control image latents as extra input channels",
    ),
    Case(
        "flux-control-img2img",
        "FluxControlImg2ImgPipeline",
        _flux(FluxControlImg2ImgPipeline, 32, control_image=tensor_image(1), **IMG2IMG),
        "control channels; strength 0.6",
    ),
    Case(
        "flux-control-inpaint",
        "FluxControlInpaintPipeline",
        _flux(FluxControlInpaintPipeline, 32, control_image=tensor_image(1), **INPAINT),
        "control channels; inpainting at strength 0.6",
    ),
    Case(
        "flux-controlnet",
        "FluxControlNetPipeline",
        _flux(FluxControlNetPipeline, controlnet=True, **CONTROL),
        "ControlNet: runs on computed steps only",
    ),
    Case(
        "flux-controlnet-img2img",
        "FluxControlNetImg2ImgPipeline",
        _flux(FluxControlNetImg2ImgPipeline, controlnet=True, **CONTROL, **IMG2IMG),
        "ControlNet; strength 0.6",
    ),
    Case(
        "flux-controlnet-inpaint",
        "FluxControlNetInpaintPipeline",
        _flux(FluxControlNetInpaintPipeline, controlnet=True, **CONTROL, **INPAINT),
        "ControlNet; inpainting at strength 0.6",
    ),
    Case("chroma", "ChromaPipeline", _chroma(ChromaPipeline), "CFG in two calls"),
    Case("chroma-img2img", "ChromaImg2ImgPipeline", _chroma(ChromaImg2ImgPipeline, **IMG2IMG), "strength 0.6"),
    Case(
        "chroma-inpaint",
        "ChromaInpaintPipeline",
        _chroma(ChromaInpaintPipeline, **INPAINT),
        "strength 0.6; the transformer's config given `guidance_embeds`, which the pipeline reads",
    ),
    Case("flux2", "Flux2Pipeline", _flux2(), "text-to-image"),
    Case(
        "flux2-klein",
        "Flux2KleinPipeline",
        _flux2(Flux2KleinPipeline, negative_prompt_embeds=randn(1, 8, 32, seed=1)),
        "true CFG: two calls per step",
    ),
    Case(
        "flux2-klein-inpaint",
        "Flux2KleinInpaintPipeline",
        _flux2(
            Flux2KleinInpaintPipeline,
            image=pil_image(),
            mask_image=inpaint_mask(),
            strength=0.6,
            negative_prompt_embeds=randn(1, 8, 32, seed=1),
        ),
        "true CFG; inpainting at strength 0.6",
    ),
    Case("flux2-reference", "Flux2Pipeline", _flux2(reference=True), "reference-image tokens after the latent tokens"),
    Case(
        "flux2-klein-kv",
        "Flux2KleinKVPipeline",
        _flux2(Flux2KleinKVPipeline, reference=True),
        "reference-image K/V extracted on step 0 (always computed) and reused by later calls",
    ),
)
"""The Flux-family cases."""
