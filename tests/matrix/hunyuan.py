"""Hunyuan-family cases: HunyuanVideo (image-to-video, SkyReels, FramePack), HunyuanVideo 1.5 and HunyuanImage."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanImagePipeline,
    HunyuanImageRefinerPipeline,
    HunyuanImageTransformer2DModel,
    HunyuanSkyreelsImageToVideoPipeline,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoFramepackTransformer3DModel,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from meancache.testing import tiny_inputs, tiny_pipeline
from tests.matrix.common import Build, Case, accepted, pil_image, randn, tiny


def _hunyuan_image() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=(4, 4),
    )  # fmt: skip
    guider = AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2)
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=None, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                guider=guider)  # fmt: skip
    mask, mask_2 = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    return pipe, {"prompt_embeds": randn(1, 6, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "prompt_embeds_2": randn(1, 4, 8, seed=2), "prompt_embeds_mask_2": mask_2,
                  "negative_prompt_embeds_2": randn(1, 4, 8, seed=3), "negative_prompt_embeds_mask_2": mask_2.clone(),
                  "distilled_guidance_scale": None, "height": 128, "width": 128}  # fmt: skip


def _hunyuan_video15(pipeline: type = HunyuanVideo15Pipeline, **extra: Any) -> Build:
    """A HunyuanVideo 1.5-family pipeline; image-to-video (an ``image`` in ``extra``) gets a one-layer SigLIP image
    encoder, and every request is resized to the transformer's ``target_size`` (64 pixels here)."""
    image = "image" in extra

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
            task_type="i2v" if image else "t2v", target_size=64,
        )  # fmt: skip
        vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
        encoders = {"image_encoder": _siglip_vision(8), "feature_extractor": SiglipImageProcessor(
            size={"height": 32, "width": 32})} if image else {}  # fmt: skip
        pipe = pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
                        guider=ClassifierFreeGuidance(guidance_scale=4.0), **encoders)  # fmt: skip
        mask, mask_2 = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
        size = {} if image else {"height": 64, "width": 64}
        return pipe, {"prompt_embeds": randn(1, 6, 16), "prompt_embeds_mask": mask,
                      "negative_prompt_embeds": randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                      "prompt_embeds_2": randn(1, 4, 8, seed=2), "prompt_embeds_mask_2": mask_2,
                      "negative_prompt_embeds_2": randn(1, 4, 8, seed=3),
                      "negative_prompt_embeds_mask_2": mask_2.clone(), "num_frames": 5, **size, **extra}  # fmt: skip

    return build


def _siglip_vision(width: int) -> SiglipVisionModel:
    """A one-layer SigLIP image encoder (built from a config: nothing is downloaded)."""
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(
        hidden_size=width, num_hidden_layers=1, num_attention_heads=2, image_size=32, intermediate_size=16,
        patch_size=8,
    )).eval()  # fmt: skip


def _hunyuan_video_i2v(pipeline: type, in_channels: int, **extra: Any) -> Build:
    """A HunyuanVideo image-to-video pipeline: the tiny HunyuanVideo pipeline's VAE and a transformer of its size
    taking ``in_channels`` (the image latents, and a mask, as extra channels; or, ``image_condition_type=
    "token_replace"``, as the first frame) and the transformer's config ``extra`` keys; no true CFG (no negative
    prompt: one call per step). FramePack gets its own transformer (2x2 patches: its history embedder's) and a
    one-layer SigLIP image encoder."""
    keys = ("image_condition_type", "guidance_embeds", "has_image_proj", "image_proj_dim", "has_clean_x_embedder")
    config = {k: extra.pop(k) for k in keys if k in extra}
    framepack = pipeline is HunyuanVideoFramepackPipeline

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        components = tiny_pipeline("hunyuan-video").components
        torch.manual_seed(0)
        sizes = {**components["transformer"].config, "in_channels": in_channels, **config}
        if framepack:
            sizes = {k: v for k, v in sizes.items() if k != "image_condition_type"} | {"patch_size": 2}
            components |= {"image_encoder": _siglip_vision(8),
                           "feature_extractor": SiglipImageProcessor(size={"height": 32, "width": 32})}  # fmt: skip
        model = HunyuanVideoFramepackTransformer3DModel if framepack else HunyuanVideoTransformer3DModel
        components["transformer"] = model(**sizes)
        pipe = pipeline(**accepted(pipeline, {**components, "image_processor": None}))
        return pipe, {**tiny_inputs("hunyuan-video"), "image": pil_image(), **extra}

    return build


def _hunyuan_image_refiner() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """HunyuanImage's refiner: the image to refine enters as latents (a frame of the transformer's 3D patches),
    concatenated to the noisy latents as extra input channels; guidance-distilled, with its stateful guider."""
    torch.manual_seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1, 1), text_embed_dim=16, text_embed_2_dim=None, rope_axes_dim=(2, 2, 4),
        guidance_embeds=True,
    )  # fmt: skip
    guider = AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2)
    pipe = HunyuanImageRefinerPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=None,
                                       text_encoder=None, tokenizer=None, transformer=transformer,
                                       guider=guider)  # fmt: skip
    mask = torch.ones(1, 6, dtype=torch.long)
    return pipe, {"prompt_embeds": randn(1, 6, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "image": randn(1, 4, 1, 4, 4, seed=2), "height": 64, "width": 64}  # fmt: skip


CASES: tuple[Case, ...] = (
    Case("hunyuan-video", "HunyuanVideoPipeline", tiny("hunyuan-video"), "video"),
    Case(
        "hunyuan-video-i2v",
        "HunyuanVideoImageToVideoPipeline",
        _hunyuan_video_i2v(HunyuanVideoImageToVideoPipeline, 4 + 4 + 1, image_condition_type="latent_concat"),
        "image latents and mask as extra input channels (`latent_concat`)",
    ),
    Case(
        "hunyuan-video-i2v-token-replace",
        "HunyuanVideoImageToVideoPipeline",
        _hunyuan_video_i2v(HunyuanVideoImageToVideoPipeline, 4, image_condition_type="token_replace"),
        "the image's latents replace the first frame; the scheduler steps the others (`token_replace`)",
    ),
    Case(
        "hunyuan-video-framepack",
        "HunyuanVideoFramepackPipeline",
        _hunyuan_video_i2v(
            HunyuanVideoFramepackPipeline,
            4,
            has_image_proj=True,
            image_proj_dim=8,
            has_clean_x_embedder=True,
            height=64,
            width=64,
            num_frames=9,
            latent_window_size=2,
        ),
        "two video sections, one denoising loop each over the same steps; clean and history latents as context "
        "tokens; SigLIP image embeddings",
        loops=2,
    ),
    Case(
        "hunyuan-skyreels-i2v",
        "HunyuanSkyreelsImageToVideoPipeline",
        _hunyuan_video_i2v(HunyuanSkyreelsImageToVideoPipeline, 4 + 4, guidance_embeds=False),
        "image latents as extra input channels",
    ),
    Case("hunyuan-image", "HunyuanImagePipeline", _hunyuan_image, "stateful guider (AdaptiveProjectedMixGuidance)"),
    Case(
        "hunyuan-image-refiner",
        "HunyuanImageRefinerPipeline",
        _hunyuan_image_refiner,
        "image latents as extra input channels; guidance-distilled; stateful guider",
    ),
    Case("hunyuan-video-1.5", "HunyuanVideo15Pipeline", _hunyuan_video15(), "video, guider (ClassifierFreeGuidance)"),
    Case(
        "hunyuan-video-1.5-i2v",
        "HunyuanVideo15ImageToVideoPipeline",
        _hunyuan_video15(HunyuanVideo15ImageToVideoPipeline, image=pil_image(size=64)),
        "image latents as extra input channels, SigLIP image embeddings; guider",
    ),
)
"""The Hunyuan-family cases."""
