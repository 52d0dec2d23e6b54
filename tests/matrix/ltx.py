"""LTX-Video-family cases (LTX-Video's refused pipelines and LTX-2's are in :mod:`tests.matrix.coverage`)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)

from tests.matrix.common import Build, Case, masked_embeds, pil_image


def ltx_video(pipeline: type = LTXPipeline, **extra: Any) -> Build:
    """An LTX-Video-family pipeline; its VAE (4x spatial, 4x temporal) only when an image is encoded."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
            num_layers=1, caption_channels=16,
        )  # fmt: skip
        vae, size = None, 64
        if "image" in extra:
            vae, size = AutoencoderKLLTXVideo(
                latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                spatio_temporal_scaling=(True, True, False, False),
                decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
                upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1,
            ), 32  # fmt: skip
        pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        transformer=transformer)  # fmt: skip
        return pipe, {**masked_embeds(), "guidance_scale": 3.0, "height": size, "width": size, "num_frames": 9,
                      **extra}  # fmt: skip

    return build


CASES: tuple[Case, ...] = (
    Case("ltx", "LTXPipeline", ltx_video(), "video, CFG batched"),
    Case(
        "ltx-i2v",
        "LTXImageToVideoPipeline",
        ltx_video(LTXImageToVideoPipeline, image=pil_image()),
        "the first frame is the image's latents; the scheduler steps the others",
        first_use_declined="its transformer returns packed tokens the loop unpacks to step the frames after the image",
    ),
)
"""The LTX-Video-family cases."""
