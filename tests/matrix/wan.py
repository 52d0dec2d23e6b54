"""Wan-family cases: Wan (2.1 and 2.2), its image-to-video, VACE and video-to-video variants, and the Wan-based
ChronoEdit and Lucy Edit."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from diffusers import (
    ChronoEditPipeline,
    ChronoEditTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LucyEditPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
    WanVideoToVideoPipeline,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from tests.matrix.common import Build, Case, accepted, pil_image, randn, wan_vae


def wan_transformer(seed: int, model: type = WanTransformer3DModel, in_channels: int = 4, **extra: Any) -> Any:
    torch.manual_seed(seed)
    return model(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=16, num_layers=1, rope_max_seq_len=32, **extra,
    )  # fmt: skip


def _wan(pipeline: type = WanPipeline, experts: int = 1, transformer: Any = None, **extra: Any) -> Build:
    """A Wan-family pipeline on 4 latent channels; its Wan VAE only when an image or video is encoded."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        second = {"transformer_2": wan_transformer(1), "boundary_ratio": 0.875} if experts == 2 else {}
        vae = wan_vae() if any(key in extra for key in ("image", "video")) else None
        components = {"tokenizer": None, "text_encoder": None, "vae": vae, "image_encoder": _clip_vision(8),
                      "image_processor": CLIPImageProcessor(crop_size=32, size=32),
                      "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
                      "transformer": transformer() if transformer else wan_transformer(0), **second}  # fmt: skip
        return pipeline(**accepted(pipeline, components)), {
            "prompt_embeds": randn(1, 6, 16), "negative_prompt_embeds": randn(1, 6, 16, seed=1),
            "guidance_scale": 4.0, "height": 32, "width": 32, **extra,
        }  # fmt: skip

    return build


def _clip_vision(width: int) -> CLIPVisionModelWithProjection:
    """A one-layer CLIP image encoder (built from a config: nothing is downloaded)."""
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, projection_dim=width, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=8,
    )).eval()  # fmt: skip


def _frames(count: int = 5, mode: str = "RGB") -> list[PIL.Image.Image]:
    return [pil_image(seed).convert(mode) for seed in range(count)]


CASES: tuple[Case, ...] = (
    Case(
        "wan",
        "WanPipeline",
        _wan(num_frames=5),
        "video, CFG in two calls; with a FlowMatchEulerDiscreteScheduler (default: UniPC)",
    ),
    Case(
        "wan2.2",
        "WanPipeline",
        _wan(experts=2, num_frames=5),
        "two experts (transformer_2, boundary_ratio): one schedule",
    ),
    Case(
        "wan-i2v",
        "WanImageToVideoPipeline",
        _wan(
            WanImageToVideoPipeline,
            transformer=lambda: wan_transformer(0, in_channels=4 + 4 + 4, image_dim=8),
            image=pil_image(),
            num_frames=5,
        ),
        "image latents and mask as extra input channels; CLIP image embeddings",
    ),
    Case(
        "wan-vace",
        "WanVACEPipeline",
        _wan(
            WanVACEPipeline,
            transformer=lambda: wan_transformer(
                0, WanVACETransformer3DModel, vace_layers=[0], vace_in_channels=4 * 2 + 64
            ),
            video=_frames(),
            mask=_frames(mode="L"),
            num_frames=5,
        ),
        "VACE control video and mask through the VACE blocks",
    ),
    Case(
        "chrono-edit",
        "ChronoEditPipeline",
        _wan(
            ChronoEditPipeline,
            transformer=lambda: wan_transformer(0, ChronoEditTransformer3DModel, in_channels=4 + 4 + 4, image_dim=8),
            image=pil_image(),
            num_frames=5,
        ),
        "Wan-based image editing: image latents and mask as extra input channels; CLIP image embeddings",
    ),
    Case(
        "lucy-edit",
        "LucyEditPipeline",
        _wan(
            LucyEditPipeline, transformer=lambda: wan_transformer(0, in_channels=4 + 4), video=_frames(), num_frames=5
        ),
        "Wan-based video editing: the input video's latents as extra input channels",
    ),
    Case(
        "wan-v2v",
        "WanVideoToVideoPipeline",
        _wan(WanVideoToVideoPipeline, video=_frames(), strength=0.6),
        "strength 0.6",
    ),
)
"""The Wan-family cases."""
