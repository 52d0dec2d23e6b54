"""Qwen-Image-family cases: Qwen-Image and its img2img, inpainting, ControlNet, Edit and Layered variants."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
)
from transformers import Qwen2_5_VLForConditionalGeneration

from tests.matrix.common import (
    CONTROL,
    SIZE,
    Build,
    Case,
    inpaint_mask,
    pil_image,
    qwen_components,
    qwen_inputs,
    qwen_transformer,
    qwen_vl_text_encoder,
    tensor_image,
)


def _qwen(pipeline: type, controlnet: int | None = None, **extra: Any) -> Build:
    """A Qwen-Image-family pipeline; with ``controlnet`` (its extra condition channels: 4 for the packed inpainting
    mask), a Qwen-Image ControlNet of the transformer's size."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        components = qwen_components()
        if controlnet is not None:
            torch.manual_seed(0)
            components["controlnet"] = QwenImageControlNetModel(
                patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
                extra_condition_channels=controlnet,
            )  # fmt: skip
        return pipeline(**components), {**qwen_inputs(), **extra}

    return build


def _qwen_layered() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Qwen-Image-Layered at 640 px, the smaller of the two resolutions it allows (it resizes its image to that area),
    on the 16x VAE (40 x 40 latents: 400 tokens a frame; 1 layer, so the composite, the layer and the image: 1200
    tokens), with a one-layer Qwen2.5-VL text encoder: it reads the encoder's dtype even with prompt embeddings,
    and captions the image with it when the prompt is empty, so the prompts are given and encoded."""
    text_encoder, tokenizer = qwen_vl_text_encoder(1, 16, Qwen2_5_VLForConditionalGeneration)
    components = qwen_components(downsamples=4, text_encoder=text_encoder, tokenizer=tokenizer, processor=None)
    components["transformer"] = qwen_transformer(use_additional_t_cond=True, use_layer3d_rope=True)
    return QwenImageLayeredPipeline(**components), {"image": pil_image(), "prompt": "a cat", "negative_prompt": "bad",
                                                    "true_cfg_scale": 4.0, "layers": 1, "resolution": 640}  # fmt: skip


def _qwen_edit(pipeline: type, images: int, **extra: Any) -> Build:
    """Without CFG, and with a 16x VAE: these pipelines encode every reference image at 1024 x 1024."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        pipe = pipeline(**qwen_components(downsamples=4, processor=None))
        image = [pil_image(seed) for seed in range(images)] if images > 1 else pil_image()
        inputs = {k: v for k, v in qwen_inputs().items() if not k.startswith("negative")} | {"true_cfg_scale": 1.0}
        return pipe, {**inputs, "image": image, "height": 2 * SIZE, "width": 2 * SIZE, **extra}

    return build


CASES: tuple[Case, ...] = (
    Case("qwen-image", "QwenImagePipeline", _qwen(QwenImagePipeline), "true CFG with norm rescale"),
    Case(
        "qwen-image-img2img",
        "QwenImageImg2ImgPipeline",
        _qwen(QwenImageImg2ImgPipeline, image=tensor_image(), strength=0.6),
        "strength 0.6",
    ),
    Case(
        "qwen-image-inpaint",
        "QwenImageInpaintPipeline",
        _qwen(QwenImageInpaintPipeline, image=tensor_image(), mask_image=inpaint_mask(), strength=0.6),
        "strength 0.6",
    ),
    Case(
        "qwen-image-controlnet",
        "QwenImageControlNetPipeline",
        _qwen(QwenImageControlNetPipeline, 0, **CONTROL),
        "ControlNet: runs on computed steps only",
    ),
    Case(
        "qwen-image-controlnet-inpaint",
        "QwenImageControlNetInpaintPipeline",
        _qwen(QwenImageControlNetInpaintPipeline, 4, **CONTROL, control_mask=inpaint_mask()),
        "ControlNet inpainting",
    ),
    Case("qwen-image-edit", "QwenImageEditPipeline", _qwen_edit(QwenImageEditPipeline, 1), "reference-image tokens"),
    Case(
        "qwen-image-edit-plus",
        "QwenImageEditPlusPipeline",
        _qwen_edit(QwenImageEditPlusPipeline, 1),
        "reference-image tokens",
    ),
    Case(
        "qwen-image-edit-inpaint",
        "QwenImageEditInpaintPipeline",
        _qwen_edit(QwenImageEditInpaintPipeline, 1, mask_image=inpaint_mask(), strength=0.6),
        "reference-image tokens, inpainting at the default strength 0.6",
    ),
    Case(
        "qwen-image-layered",
        "QwenImageLayeredPipeline",
        _qwen_layered,
        "the composite and 1 layer as latent frames, the image's latents as a frame of context tokens; CFG in two "
        'calls; its Qwen2.5-VL text encoder runs; decoded output compared (`output_type="latent"` fails in '
        "diffusers 0.42.1: it returns an unassigned `images`)",
        output_type="pt",
    ),
)
"""The Qwen-Image-family cases."""
