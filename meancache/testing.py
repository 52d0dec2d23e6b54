"""Tiny real diffusers pipelines (random weights, CPU-fast) for tests, the demo and benchmarks.

Each pipeline is the real diffusers class with its real transformer, VAE and Euler scheduler built from
small configs; prompts enter as precomputed embeddings, so no tokenizer or text encoder is needed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

PipelineKind = Literal["flux", "qwen-image", "hunyuan-video", "sd3"]
PIPELINE_KINDS: tuple[PipelineKind, ...] = ("flux", "qwen-image", "hunyuan-video", "sd3")


def tiny_pipeline(kind: PipelineKind, seed: int = 0, width: int = 16) -> DiffusionPipeline:
    """A randomly initialised pipeline of ``kind``; ``width`` scales the transformer's attention heads."""
    torch.manual_seed(seed)
    if kind == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=width,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, width - 8],
            guidance_embeds=True,
        )  # fmt: skip
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        )  # fmt: skip
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )  # fmt: skip
    if kind == "qwen-image":
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=width,
            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, width - 12),
        )  # fmt: skip
        vae = AutoencoderKLQwenImage(
            base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )  # fmt: skip
        return QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            transformer=transformer,
        )  # fmt: skip
    if kind == "hunyuan-video":
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=width, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, width - 6),
        )  # fmt: skip
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True,
        )  # fmt: skip
        return HunyuanVideoPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )  # fmt: skip
    if kind == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=width // 2,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
            out_channels=4,
        )  # fmt: skip
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        )  # fmt: skip
        return StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer,
        )  # fmt: skip
    raise ValueError(f"unknown pipeline kind {kind!r}; known: {list(PIPELINE_KINDS)}")


def tiny_inputs(kind: PipelineKind, batch_size: int = 1, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Pipeline call arguments for ``kind``: prompt embeddings for ``batch_size`` prompts and the image size.

    Qwen-Image gets a negative prompt, so it runs true CFG (two transformer calls per step); SD3 runs CFG
    with both branches batched into one call.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if kind == "flux":
        return {"prompt_embeds": randn(batch_size, 8, 32), "pooled_prompt_embeds": randn(batch_size, 32),
                "height": size, "width": size}  # fmt: skip
    if kind == "qwen-image":
        mask = torch.ones(batch_size, 7, dtype=torch.long)
        return {
            "prompt_embeds": randn(batch_size, 7, 16), "prompt_embeds_mask": mask,
            "negative_prompt_embeds": randn(batch_size, 7, 16), "negative_prompt_embeds_mask": mask.clone(),
            "true_cfg_scale": 4.0, "height": size, "width": size,
        }  # fmt: skip
    if kind == "hunyuan-video":
        return {
            "prompt_embeds": randn(batch_size, 6, 16), "pooled_prompt_embeds": randn(batch_size, 8),
            "prompt_attention_mask": torch.ones(batch_size, 6, dtype=torch.long), "height": size // 2,
            "width": size // 2, "num_frames": 5,
        }  # fmt: skip
    if kind == "sd3":
        return {
            "prompt_embeds": randn(batch_size, 7, 32), "pooled_prompt_embeds": randn(batch_size, 64),
            "negative_prompt_embeds": randn(batch_size, 7, 32), "negative_pooled_prompt_embeds": randn(batch_size, 64),
            "guidance_scale": 5.0, "height": size, "width": size,
        }  # fmt: skip
    raise ValueError(f"unknown pipeline kind {kind!r}; known: {list(PIPELINE_KINDS)}")


def generate_latents(pipe: DiffusionPipeline, inputs: dict[str, Any], num_inference_steps: int, seed: int = 0,
                     **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Run ``pipe`` and return its final latents (no VAE decode)."""
    out = pipe(**inputs, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
               output_type="latent", return_dict=False, **kwargs)  # fmt: skip
    return out[0]


def tiny_flux_pipeline_with_text_encoders(seed: int = 0) -> FluxPipeline:
    """:func:`tiny_pipeline` ``("flux")`` with tiny real tokenizers and text encoders, so it takes text
    prompts and round-trips through ``save_pretrained`` / ``from_pretrained`` like a real checkpoint.

    The CLIP tokenizer knows single bytes only (no merges); the T5 tokenizer knows a handful of words."""
    base = tiny_pipeline("flux", seed=seed)
    torch.manual_seed(seed)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    clip_vocab = {
        t: i for i, t in enumerate([*symbols, *(c + "</w>" for c in symbols), "<|startoftext|>", "<|endoftext|>"])
    }
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    known_words = ["a", "photo", "of", "cat", "dog", "red", "blue"]
    words = ["<pad>", "</s>", "<unk>", "\u2581", *("\u2581" + w for w in known_words)]
    t5_tokenizer = T5TokenizerFast(vocab=[(w, -1.0) for w in words], extra_ids=0, model_max_length=512)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=77, bos_token_id=clip_vocab["<|startoftext|>"],
        eos_token_id=clip_vocab["<|endoftext|>"], pad_token_id=1,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    return FluxPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
        tokenizer_2=t5_tokenizer, transformer=base.transformer,
    )  # fmt: skip
