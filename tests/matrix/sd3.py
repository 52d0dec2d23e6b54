"""Stable Diffusion 3-family cases: SD3 and its img2img, inpainting, PAG and ControlNet variants."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
)

from tests.matrix.common import CONTROL, IMG2IMG, INPAINT, SIZE, Build, Case, accepted, inpaint_mask, kl_vae, randn


def _sd3(pipeline: type, controlnet: int | None = None, **extra: Any) -> Build:
    """An SD3-family pipeline: a one-block SD3 transformer on 16 latent channels (what the inpainting pipeline
    requires) and the 8x VAE; with ``controlnet`` (its extra conditioning channels: 1 for the inpainting mask), an
    SD3 ControlNet of the transformer's size."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        sizes = {"sample_size": SIZE // 8, "patch_size": 1, "in_channels": 16, "num_layers": 1,
                 "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                 "caption_projection_dim": 16, "pooled_projection_dim": 32, "out_channels": 16}  # fmt: skip
        torch.manual_seed(0)
        components = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": kl_vae(16),
                      "transformer": SD3Transformer2DModel(**sizes), "pag_applied_layers": ["transformer_blocks.0"],
                      **dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                       "tokenizer_3"])}  # fmt: skip
        if controlnet is not None:
            torch.manual_seed(0)
            components["controlnet"] = SD3ControlNetModel(**sizes, extra_conditioning_channels=controlnet)
        inputs = {"prompt_embeds": randn(1, 7, 32), "pooled_prompt_embeds": randn(1, 32, seed=1),
                  "negative_prompt_embeds": randn(1, 7, 32, seed=2),
                  "negative_pooled_prompt_embeds": randn(1, 32, seed=3), "guidance_scale": 5.0, "height": SIZE,
                  "width": SIZE}  # fmt: skip
        return pipeline(**accepted(pipeline, components)), {**inputs, **extra}

    return build


CASES: tuple[Case, ...] = (
    Case("sd3", "StableDiffusion3Pipeline", _sd3(StableDiffusion3Pipeline), "CFG branches batched in one call"),
    Case(
        "sd3-img2img",
        "StableDiffusion3Img2ImgPipeline",
        _sd3(StableDiffusion3Img2ImgPipeline, **IMG2IMG),
        "strength 0.6",
    ),
    Case(
        "sd3-inpaint",
        "StableDiffusion3InpaintPipeline",
        _sd3(StableDiffusion3InpaintPipeline, **INPAINT),
        "strength 0.6",
    ),
    Case(
        "sd3-pag",
        "StableDiffusion3PAGPipeline",
        _sd3(StableDiffusion3PAGPipeline, pag_scale=3.0),
        "perturbed-attention guidance: three branches batched",
    ),
    Case(
        "sd3-pag-img2img",
        "StableDiffusion3PAGImg2ImgPipeline",
        _sd3(StableDiffusion3PAGImg2ImgPipeline, pag_scale=3.0, **IMG2IMG),
        "PAG; strength 0.6",
    ),
    Case(
        "sd3-controlnet",
        "StableDiffusion3ControlNetPipeline",
        _sd3(StableDiffusion3ControlNetPipeline, 0, **CONTROL),
        "ControlNet: runs on computed steps only",
    ),
    Case(
        "sd3-controlnet-inpaint",
        "StableDiffusion3ControlNetInpaintingPipeline",
        _sd3(StableDiffusion3ControlNetInpaintingPipeline, 1, **CONTROL, control_mask=inpaint_mask()),
        "ControlNet with a mask channel",
    ),
)
"""The Stable Diffusion 3-family cases."""
