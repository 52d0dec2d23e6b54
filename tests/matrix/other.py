"""Cases of the pipeline families with a few cases each (Z-Image, CogView4, Lumina, Kandinsky, Bria, PRX, GLM-Image,
...)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKLFlux2,
    AutoencoderKLMagvit,
    BriaFibo2Pipeline,
    BriaFibo2Transformer2DModel,
    BriaFiboEditPipeline,
    BriaFiboPipeline,
    BriaFiboTransformer2DModel,
    BriaPipeline,
    BriaTransformer2DModel,
    CogView4ControlPipeline,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    DiffusionPipeline,
    EasyAnimateInpaintPipeline,
    EasyAnimatePipeline,
    EasyAnimateTransformer3DModel,
    ErnieImagePipeline,
    ErnieImageTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    GlmImagePipeline,
    GlmImageTransformer2DModel,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    Ideogram4Pipeline,
    Ideogram4Transformer2DModel,
    JoyImageEditPipeline,
    JoyImageEditTransformer3DModel,
    Kandinsky5I2IPipeline,
    Kandinsky5I2VPipeline,
    Kandinsky5T2IPipeline,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
    Kandinsky6SRPipeline,
    Kandinsky6SRTransformer3DModel,
    Kandinsky6SRVAE,
    Krea2Pipeline,
    Krea2Transformer2DModel,
    LongCatImagePipeline,
    LongCatImageTransformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    LuminaNextDiT2DModel,
    LuminaPipeline,
    MochiPipeline,
    MochiTransformer3DModel,
    NucleusMoEImagePipeline,
    NucleusMoEImageTransformer2DModel,
    OvisImagePipeline,
    OvisImageTransformer2DModel,
    PRXPipeline,
    PRXPixelPipeline,
    PRXTransformer2DModel,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImageOmniPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from meancache.testing import tiny_pipeline
from tests.matrix.common import (
    CONTROL,
    IMG2IMG,
    INPAINT,
    SIZE,
    Build,
    Case,
    byte_tokenizer,
    generator,
    inpaint_mask,
    kl_vae,
    masked_embeds,
    pil_image,
    qwen_components,
    qwen_inputs,
    qwen_vl_text_encoder,
    randn,
    randomise_zero_parameters,
    tensor_image,
    wan_vae,
)


def _nucleus_moe() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Nucleus-MoE Image on Qwen-Image's VAE: a dense block, then a mixture-of-experts block (8 experts, each
    choosing a quarter of the tokens)."""
    torch.manual_seed(0)
    transformer = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), num_experts=8, moe_intermediate_dim=16, capacity_factors=2.0,
        dense_moe_strategy="leave_first_block_dense", mlp_ratio=6.0,  # the dense MLP's width rounds down to 128s
    )  # fmt: skip
    with torch.no_grad():  # the experts' weights are initialised with torch.empty
        for name, parameter in transformer.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                parameter.normal_(0.0, 0.1)
    components = qwen_components()
    pipe = NucleusMoEImagePipeline(transformer=transformer, scheduler=components["scheduler"], vae=components["vae"],
                                   text_encoder=None, processor=None)  # fmt: skip
    return pipe, {**{k: v for k, v in qwen_inputs().items() if k != "true_cfg_scale"}, "guidance_scale": 4.0}


def _z_image(pipeline: type, cfg: bool = True, batch: int = 1, controlnet: int | None = None, **extra: Any) -> Build:
    """A Z-Image-family pipeline; with ``controlnet`` (its control input channels: 4 for the control image's latents,
    9 with the inpainting mask and masked image), a one-layer Z-Image ControlNet. Z-Image Omni gets the
    transformer's SigLIP branch, a one-layer SigLIP2 image encoder and a bfloat16 VAE (it encodes its condition
    images in bfloat16), and each prompt as segments around its images (one more than the images)."""
    omni = pipeline is ZImageOmniPipeline

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        sizes = {"all_patch_size": (2,), "all_f_patch_size": (1,), "dim": 32, "n_refiner_layers": 1, "n_heads": 2,
                 "n_kv_heads": 2}  # fmt: skip
        transformer = ZImageTransformer2DModel(
            **sizes, in_channels=4, n_layers=1, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 16, 16],
            siglip_feat_dim=8 if omni else None,
        )  # fmt: skip
        with torch.no_grad():  # initialised with torch.empty
            for pad in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
                if isinstance(token := getattr(transformer, pad, None), torch.nn.Parameter):
                    token.fill_(1.0)
        components = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": kl_vae(4), "text_encoder": None,
                      "tokenizer": None, "transformer": transformer}  # fmt: skip
        if controlnet is not None:
            torch.manual_seed(0)
            components["controlnet"] = ZImageControlNetModel(
                **sizes, control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=controlnet
            )
        if omni:
            torch.manual_seed(0)
            components |= {"vae": components["vae"].to(torch.bfloat16), "siglip": Siglip2VisionModel(
                Siglip2VisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                    patch_size=8, num_patches=16)).eval(),
                           "siglip_processor": Siglip2ImageProcessor(patch_size=8, max_num_patches=16)}  # fmt: skip
        images = len(extra["image"]) if isinstance(extra.get("image"), list) else int("image" in extra)

        def embeds(length: int, seed: int) -> Any:
            if not omni:
                return randn(length, 16, seed=seed)
            return [randn(length + k, 16, seed=seed + 100 * k) for k in range(images + 2 if images else 1)]

        inputs: dict[str, Any] = {"prompt_embeds": [embeds(5 + i, i) for i in range(batch)],
                                  "guidance_scale": 4.0 if cfg else 0.0, "height": SIZE, "width": SIZE}  # fmt: skip
        if cfg:
            inputs["negative_prompt_embeds"] = [embeds(3 + i, 10 + i) for i in range(batch)]
        return pipeline(**components), {**inputs, **extra}

    return build


def _cogview4(pipeline: type = CogView4Pipeline, in_channels: int = 4, **extra: Any) -> Build:
    """A CogView4-family pipeline; ``in_channels`` of the transformer (the control pipeline appends the control
    image's latent channels)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = CogView4Transformer2DModel(
            patch_size=2, in_channels=in_channels, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, text_embed_dim=32, time_embed_dim=8, condition_dim=4, rope_axes_dim=(4, 4),
        )  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                    use_dynamic_shifting=True, time_shift_type="linear")  # fmt: skip
        pipe = pipeline(tokenizer=None, text_encoder=None, vae=kl_vae(4), transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
        return pipe, {"prompt_embeds": randn(1, 16, 32), "negative_prompt_embeds": randn(1, 16, 32, seed=1),
                      "guidance_scale": 4.0, "height": SIZE, "width": SIZE, **extra}  # fmt: skip

    return build


def _lumina2(cfg_trunc_ratio: float) -> Build:
    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = Lumina2Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1,
            num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(64, 16, 16),
            cap_feat_dim=16,
        )  # fmt: skip
        pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4),
                               text_encoder=None, tokenizer=None)  # fmt: skip
        return pipe, {**masked_embeds(), "guidance_scale": 4.0, "cfg_trunc_ratio": cfg_trunc_ratio, "height": SIZE,
                      "width": SIZE}  # fmt: skip

    return build


def _bria() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4],
    )  # fmt: skip
    pipe = BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4),
                        text_encoder=None, tokenizer=None)  # fmt: skip
    return pipe, {"prompt_embeds": randn(1, 8, 32), "negative_prompt_embeds": randn(1, 8, 32, seed=1),
                  "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _mochi() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=6,
    )  # fmt: skip
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)  # fmt: skip
    return pipe, {**masked_embeds(), "guidance_scale": 4.0, "height": 32, "width": 32, "num_frames": 7}  # fmt: skip


def _auraflow() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=SIZE // 8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )  # fmt: skip
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=kl_vae(4), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    return pipe, {**masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _lumina() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = LuminaNextDiT2DModel(
        sample_size=SIZE // 8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, learn_sigma=True, cross_attention_dim=16,
    )  # fmt: skip
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4),
                          text_encoder=None, tokenizer=None)  # fmt: skip
    return pipe, {**masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _hidream() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(2, 2, 4), max_resolution=(32, 32), llama_layers=[0, 1], force_inference_output=True,
    )  # fmt: skip
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3", "text_encoder_4", "tokenizer_4"])  # fmt: skip
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                transformer=transformer, **none)  # fmt: skip
    pipe.default_sample_size = SIZE // 8  # HiDream rescales every request to this area (default 1024 x 1024)
    return pipe, {"prompt_embeds_t5": randn(1, 6, 8), "prompt_embeds_llama3": randn(2, 1, 5, 4, seed=1),
                  "pooled_prompt_embeds": randn(1, 8, seed=2), "negative_prompt_embeds_t5": randn(1, 6, 8, seed=3),
                  "negative_prompt_embeds_llama3": randn(2, 1, 5, 4, seed=4),
                  "negative_pooled_prompt_embeds": randn(1, 8, seed=5), "guidance_scale": 4.0, "height": SIZE,
                  "width": SIZE}  # fmt: skip


def _ovis() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4), text_encoder=None,
                             tokenizer=None, transformer=transformer)  # fmt: skip
    return pipe, {"prompt_embeds": randn(1, 8, 32), "negative_prompt_embeds": randn(1, 8, 32, seed=1),
                  "negative_prompt": None, "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _ernie_image() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=32, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    vae = AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                             norm_num_groups=2, sample_size=SIZE)  # fmt: skip
    pipe = ErnieImagePipeline(transformer=randomise_zero_parameters(transformer), vae=vae, text_encoder=None,
                              tokenizer=None, scheduler=FlowMatchEulerDiscreteScheduler(), pe=None,
                              pe_tokenizer=None)  # fmt: skip
    return pipe, {"prompt_embeds": [randn(8, 32)], "negative_prompt_embeds": [randn(6, 32, seed=1)],
                  "guidance_scale": 4.0, "use_pe": False, "height": SIZE, "width": SIZE}  # fmt: skip


def _krea2() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=qwen_components()["vae"],
                         text_encoder=None, tokenizer=None, transformer=transformer)  # fmt: skip
    mask = torch.ones(1, 7, dtype=torch.bool)
    return pipe, {"prompt_embeds": randn(1, 7, 2, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": randn(1, 7, 2, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _kandinsky5(pipeline: type) -> Build:
    """A Kandinsky 5 pipeline. Video, on the tiny HunyuanVideo VAE: image-to-video without CFG (one call per step),
    17 frames (it renormalises the first 4 latent frames by the statistics of the next ones: NaN with fewer than 5);
    text-to-video with CFG in two calls a step, 5 frames. Image, on the tiny AutoencoderKL, with CFG in two calls a
    step: at 640 x 1408, the smallest of the trained resolutions it resizes every request to (80 x 176 latents:
    3520 tokens); image-to-image encodes its image at that size."""
    image = pipeline in (Kandinsky5I2VPipeline, Kandinsky5I2IPipeline)
    video = pipeline in (Kandinsky5I2VPipeline, Kandinsky5T2VPipeline)

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = Kandinsky5Transformer3DModel(
            in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
            model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=image,
        )  # fmt: skip
        vae = tiny_pipeline("hunyuan-video").vae if video else kl_vae(4)
        pipe = pipeline(transformer=randomise_zero_parameters(transformer), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))  # fmt: skip
        size = {"height": SIZE, "width": SIZE} if video else {"height": 640, "width": 1408}
        prompt = {"prompt_embeds_qwen": randn(1, 6, 16), "prompt_embeds_clip": randn(1, 8),
                  "prompt_cu_seqlens": torch.tensor([0, 6], dtype=torch.int32), **size}  # fmt: skip
        if pipeline is Kandinsky5I2VPipeline:
            return pipe, {**prompt, "image": pil_image(), "guidance_scale": 1.0, "num_frames": 17}
        negative = {"negative_prompt_embeds_qwen": randn(1, 6, 16, seed=1),
                    "negative_prompt_embeds_clip": randn(1, 8, seed=1),
                    "negative_prompt_cu_seqlens": torch.tensor([0, 6], dtype=torch.int32)}  # fmt: skip
        extra = {"num_frames": 5} if video else {"image": pil_image()} if image else {}
        return pipe, {**prompt, **negative, "guidance_scale": 4.0, **extra}

    return build


def _kandinsky6_sr() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Kandinsky 6 video super-resolution (2x) on a tiny K-VAE (8x spatial, 4x temporal) and a transformer trained,
    per its config, on 64 x 64 tiles (8 x 8 latents: NABLA attention's smallest token grid): a 5-frame 32 x 48 video
    is cut into two overlapping 32 x 32 tiles, each denoised in a loop of its own (new timesteps each) and decoded.
    It takes a FlowMatchEulerDiscreteScheduler or, in its distilled checkpoints, a PiflowScheduler (refused at
    enable)."""
    torch.manual_seed(0)
    transformer = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32, ff_dim=32, num_visual_blocks=1,
        axes_dims=(4, 6, 6), tile_sizes=((64, 64),),
    )  # fmt: skip
    torch.manual_seed(0)
    vae = Kandinsky6SRVAE(latent_channels=4, encoder_block_out_channels=(4,) * 4,
                          decoder_block_out_channels=(4,) * 4, layers_per_block=1)  # fmt: skip
    pipe = Kandinsky6SRPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler())
    video = torch.rand(1, 5, 3, SIZE, 3 * SIZE // 2, generator=generator())  # (batch, frames, channels, height, width)
    return pipe, {"video": video, "resolution_scale": 2}


def _prx(pipeline: type = PRXPipeline) -> Build:
    """A PRX-family pipeline: on the 8x VAE's latents, or PRX Pixel's on the RGB pixels themselves (4x4 patches; its
    transformer predicts the clean image, which the loop turns into a velocity)."""
    pixel = pipeline is PRXPixelPipeline

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = PRXTransformer2DModel(
            in_channels=3 if pixel else 4, patch_size=4 if pixel else 2, context_in_dim=16, hidden_size=32,
            mlp_ratio=2.0, num_heads=2, depth=1, axes_dim=[8, 8],
        )  # fmt: skip
        vae = {} if pixel else {"vae": kl_vae(4)}
        pipe = pipeline(transformer=randomise_zero_parameters(transformer),
                        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                        default_sample_size=SIZE, **vae)  # fmt: skip
        return pipe, {**masked_embeds(), "guidance_scale": 4.0, "use_resolution_binning": False, "height": SIZE,
                      "width": SIZE}  # fmt: skip

    return build


def _easyanimate(pipeline: type = EasyAnimatePipeline, in_channels: int = 4, **extra: Any) -> Build:
    """An EasyAnimate-family pipeline on a tiny MagVIT VAE (8x spatial, 4x temporal; the loop reads its latent
    channels); ``in_channels`` of the transformer (inpainting appends the mask's and the masked video's latents)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        vae = AutoencoderKLMagvit(
            down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
            up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3, block_out_channels=(8,) * 4,
            latent_channels=4, layers_per_block=1, norm_num_groups=2, spatial_group_norm=False,
        )  # fmt: skip
        torch.manual_seed(0)
        transformer = EasyAnimateTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4, time_embed_dim=2,
            text_embed_dim=16, num_layers=1, sample_width=16, sample_height=16, patch_size=2,
            resize_inpaint_mask_directly=False,  # True reads `cache_mag_vae`, which AutoencoderKLMagvit lacks
        )  # fmt: skip
        pipe = pipeline(vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
        return pipe, {**masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE, "num_frames": 5,
                      **extra}  # fmt: skip

    return build


def _video(channels: int = 3, frames: int = 5) -> torch.Tensor:
    """A ``(1, channels, frames, SIZE, SIZE)`` video in [0, 1]."""
    return torch.rand(1, channels, frames, SIZE, SIZE, generator=generator())


def _bria_fibo(pipeline: type = BriaFiboPipeline, **extra: Any) -> Build:
    """A Bria FIBO-family pipeline on a Wan VAE of 16 latent channels, with its SmolLM3 text encoder (two layers;
    SmolLM3's vocabulary size, as the pipeline hard-codes its begin-of-text id) and :func:`byte_tokenizer`: it
    takes no prompt embeddings, and feeds every text-encoder layer's hidden states to the transformer's blocks."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = BriaFiboTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
            axes_dims_rope=[0, 4, 4],
        )  # fmt: skip
        torch.manual_seed(0)
        text_encoder = SmolLM3ForCausalLM(SmolLM3Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        )).eval()  # fmt: skip
        pipe = pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=wan_vae(16),
                        text_encoder=text_encoder, tokenizer=byte_tokenizer())  # fmt: skip
        return pipe, {"prompt": "{'text': 'a cat'}", "negative_prompt": "bad", "guidance_scale": 5.0, "height": SIZE,
                      "width": SIZE, "max_sequence_length": 16, **extra}  # fmt: skip

    return build


def _bria_fibo2() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Bria FIBO 2.0 on the Flux2 VAE: its prompt embeddings are groups of text-encoder layers (the first for its
    perceiver's gist tokens, one per injection layer after it)."""
    torch.manual_seed(0)
    transformer = BriaFibo2Transformer2DModel(
        in_channels=16, patch_size=1, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(8, 4, 4), axes_lens=(64, 16, 16),
    )  # fmt: skip
    vae = AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                             norm_num_groups=2, sample_size=SIZE)  # fmt: skip
    pipe = BriaFibo2Pipeline(transformer=randomise_zero_parameters(transformer),
                             scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             processor=None)  # fmt: skip
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, {"prompt_embeds": randn(1, 2, 7, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": randn(1, 2, 7, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _joyimage_edit() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """JoyImage Edit: its image processor buckets every request to about a megapixel, so it gets a 16x Wan VAE
    (64 x 64 latents: 1024 tokens for the target and as many for the reference image)."""
    torch.manual_seed(0)
    transformer = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
        rope_dim_list=[4, 6, 6],
    )  # fmt: skip
    pipe = JoyImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=wan_vae(patch=True),
                                text_encoder=None, tokenizer=None, transformer=randomise_zero_parameters(transformer),
                                processor=None)  # fmt: skip
    inputs = {k: v for k, v in qwen_inputs().items() if k not in ("true_cfg_scale", "height", "width")}
    return pipe, {**inputs, "guidance_scale": 4.0, "image": pil_image()}


def _ideogram4() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Ideogram4: a conditional and an unconditional transformer (its CFG branch's own model), and a Qwen3-VL text
    encoder whose 36 layers' hidden states it taps (it takes no prompt embeddings)."""
    text_encoder, tokenizer = qwen_vl_text_encoder(36)

    def transformer(seed: int) -> Ideogram4Transformer2DModel:
        torch.manual_seed(seed)
        return Ideogram4Transformer2DModel(
            in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2, intermediate_size=16,
            adaln_dim=16, llm_features_dim=13 * 8, mrope_section=(2, 1, 1),
        )  # fmt: skip

    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer(0),
                             unconditional_transformer=transformer(1))  # fmt: skip
    return pipe, {"prompt": "a cat", "guidance_scale": 4.0, "guidance_schedule": None, "max_sequence_length": 8,
                  "height": SIZE, "width": SIZE}  # fmt: skip


def _longcat_image() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LongCat-Image: a one-double-block, one-single-block transformer on the 8x VAE's 16 latent channels, with its
    Qwen2.5-VL text encoder (one layer, 16 wide) and :func:`byte_tokenizer`: its ``prompt_embeds`` path fails in
    diffusers 0.42.1 (``len(prompt)`` with no prompt), so the prompts are given and encoded, padded to its 512 tokens.
    No prompt rewriting: that generates with the encoder through its Qwen2-VL processor (None here)."""
    text_encoder, tokenizer = qwen_vl_text_encoder(1, 16, Qwen2_5_VLForConditionalGeneration)
    torch.manual_seed(0)
    transformer = LongCatImageTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[0, 4, 4],
    )  # fmt: skip
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(16), text_encoder=text_encoder,
                                tokenizer=tokenizer, text_processor=None, transformer=transformer)  # fmt: skip
    return pipe, {"prompt": "a cat", "negative_prompt": "bad", "guidance_scale": 4.0, "height": SIZE, "width": SIZE,
                  "enable_prompt_rewrite": False}  # fmt: skip


def _glm_image(**extra: Any) -> Build:
    """GLM-Image's diffusion stage: a one-layer transformer on the 8x VAE's latents (its latent statistics: the
    image-to-image path reads them), given the prior tokens its autoregressive vision-language stage would generate
    (``prior_token_ids``, one per latent patch; codebook of 32) and the prompt's glyph embeddings, so neither that
    stage nor the text encoder is built."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = GlmImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            text_embed_dim=16, time_embed_dim=8, condition_dim=4, prior_vq_quantizer_codebook_size=32,
        )  # fmt: skip
        vae = kl_vae(4)
        vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                    use_dynamic_shifting=True, time_shift_type="linear")  # fmt: skip
        pipe = GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None,
                                vae=vae, transformer=transformer, scheduler=scheduler)  # fmt: skip
        tokens = (SIZE // 16) ** 2
        return pipe, {"prompt_embeds": randn(1, 6, 16), "negative_prompt_embeds": randn(1, 6, 16, seed=1),
                      "prior_token_ids": torch.randint(0, 32, (1, tokens), generator=generator()),
                      "guidance_scale": 4.0, "height": SIZE, "width": SIZE, **extra}  # fmt: skip

    return build


CASES: tuple[Case, ...] = (
    Case("nucleus-moe-image", "NucleusMoEImagePipeline", _nucleus_moe, "mixture-of-experts blocks; CFG"),
    Case(
        "joyimage-edit",
        "JoyImageEditPipeline",
        _joyimage_edit,
        "the reference image's latents as an extra item the scheduler steps and the loop resets; CFG in two calls",
        first_use_declined="the tiny model's two branches differ by 1e-3",
    ),
    Case(
        "z-image",
        "ZImagePipeline",
        _z_image(ZImagePipeline, batch=2),
        "lists of per-sample latents; CFG doubles the list",
    ),
    Case("z-image-no-cfg", "ZImagePipeline", _z_image(ZImagePipeline, cfg=False), "guidance_scale 0: one branch"),
    Case(
        "z-image-omni",
        "ZImageOmniPipeline",
        _z_image(ZImageOmniPipeline, image=pil_image(size=64)),
        "nested lists (per sample: condition-image latents, then the latents) by keyword; SigLIP image features",
    ),
    Case("z-image-omni-t2i", "ZImageOmniPipeline", _z_image(ZImageOmniPipeline), "no condition image"),
    Case("z-image-img2img", "ZImageImg2ImgPipeline", _z_image(ZImageImg2ImgPipeline, **IMG2IMG), "strength 0.6"),
    Case("z-image-inpaint", "ZImageInpaintPipeline", _z_image(ZImageInpaintPipeline, **INPAINT), "strength 0.6"),
    Case(
        "z-image-controlnet",
        "ZImageControlNetPipeline",
        _z_image(ZImageControlNetPipeline, controlnet=4, **CONTROL),
        "ControlNet: runs on computed steps only",
    ),
    Case(
        "z-image-controlnet-inpaint",
        "ZImageControlNetInpaintPipeline",
        _z_image(
            ZImageControlNetInpaintPipeline, controlnet=9, **CONTROL, image=tensor_image(), mask_image=inpaint_mask()
        ),
        "ControlNet inpainting",
    ),
    Case("kandinsky5-t2v", "Kandinsky5T2VPipeline", _kandinsky5(Kandinsky5T2VPipeline), "CFG in two calls a step"),
    Case(
        "kandinsky5-i2v",
        "Kandinsky5I2VPipeline",
        _kandinsky5(Kandinsky5I2VPipeline),
        "the image's latents as the first frame and visual condition channels; the scheduler steps the other frames "
        "in place",
    ),
    Case(
        "kandinsky5-t2i",
        "Kandinsky5T2IPipeline",
        _kandinsky5(Kandinsky5T2IPipeline),
        "CFG in two calls a step; at 640 x 1408, its smallest trained resolution (3520 tokens)",
    ),
    Case(
        "kandinsky5-i2i",
        "Kandinsky5I2IPipeline",
        _kandinsky5(Kandinsky5I2IPipeline),
        "the image's latents as visual condition channels; the scheduler steps the latent channels in place; CFG in "
        "two calls a step, at 640 x 1408",
    ),
    Case(
        "kandinsky6-sr",
        "Kandinsky6SRPipeline",
        _kandinsky6_sr,
        "two loops per call, one per tile (each a generation at the budget), from the tile's noised low-resolution "
        "latents; no text; decoded output compared (it always decodes)",
        loops=2,
        output_type="pt",
    ),
    Case("cogview4", "CogView4Pipeline", _cogview4(), "CFG in two calls"),
    Case(
        "cogview4-control",
        "CogView4ControlPipeline",
        _cogview4(CogView4ControlPipeline, 8, control_image=tensor_image(1)),
        "control image latents as extra input channels",
    ),
    Case("lumina2", "Lumina2Pipeline", _lumina2(1.0), "CFG in two calls"),
    Case("lumina2-cfg-trunc", "Lumina2Pipeline", _lumina2(0.5), "truncated CFG: one branch after half the steps"),
    Case("mochi", "MochiPipeline", _mochi, "video, CFG batched"),
    Case("bria", "BriaPipeline", _bria, "CFG batched"),
    Case("bria-fibo", "BriaFiboPipeline", _bria_fibo(), "CFG batched; every text-encoder layer feeds the blocks"),
    Case(
        "bria-fibo-edit",
        "BriaFiboEditPipeline",
        _bria_fibo(
            BriaFiboEditPipeline,
            prompt='{"edit_instruction": "make it red"}',
            image=pil_image(),
            mask=pil_image(1).convert("L"),
            _auto_resize=False,
        ),
        "reference-image tokens; mask",
    ),
    Case("bria-fibo2", "BriaFibo2Pipeline", _bria_fibo2, "CFG in two calls; layer groups of prompt embeddings"),
    Case("auraflow", "AuraFlowPipeline", _auraflow, "CFG batched"),
    Case(
        "lumina",
        "LuminaPipeline",
        _lumina,
        "Lumina-Next, CFG batched",
        first_use_declined="its CFG combines the first three channels only",
    ),
    Case("hidream", "HiDreamImagePipeline", _hidream, "CFG batched"),
    Case("easyanimate", "EasyAnimatePipeline", _easyanimate(), "video, CFG batched"),
    Case(
        "easyanimate-inpaint",
        "EasyAnimateInpaintPipeline",
        _easyanimate(EasyAnimateInpaintPipeline, 4 + 4 + 4, video=_video(), mask_video=_video(1), strength=0.6),
        "mask and masked-video latents as extra input channels; strength 0.6",
    ),
    Case("ovis-image", "OvisImagePipeline", _ovis, "CFG in two calls"),
    Case("prx", "PRXPipeline", _prx(), "CFG batched"),
    Case(
        "prx-pixel",
        "PRXPixelPipeline",
        _prx(PRXPixelPipeline),
        "pixel space, x-prediction turned into a velocity; CFG batched",
        first_use_declined="the loop turns a clean-image prediction into a velocity",
    ),
    Case("glm-image", "GlmImagePipeline", _glm_image(), "CFG in two calls; prior tokens given (its AR stage's output)"),
    Case(
        "glm-image-edit",
        "GlmImagePipeline",
        _glm_image(
            image=[pil_image()],
            prior_token_image_ids=[torch.randint(0, 32, ((SIZE // 16) ** 2,), generator=generator(1))],
            source_image_grid_thw=[torch.tensor([[1, SIZE // 16, SIZE // 16]])],
        ),
        "condition image's K/V written by a transformer call before the loop, read by the conditional branch",
    ),
    Case("ernie-image", "ErnieImagePipeline", _ernie_image, "CFG batched; variable-length prompt embeddings"),
    Case("krea2", "Krea2Pipeline", _krea2, "CFG in two calls; per-layer prompt embeddings"),
    Case(
        "ideogram4",
        "Ideogram4Pipeline",
        _ideogram4,
        "CFG branch on its own model (`unconditional_transformer`): both models run on computed steps only",
    ),
    Case(
        "longcat-image",
        "LongCatImagePipeline",
        _longcat_image,
        "CFG in two calls with norm rescale; its Qwen2.5-VL text encoder runs, prompts padded to 512 tokens",
    ),
)
"""The other families' cases."""
