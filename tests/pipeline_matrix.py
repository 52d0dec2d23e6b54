"""The coverage matrix: every diffusers flow-matching pipeline MeanCache is verified on, built tiny.

Each :class:`Case` builds a real diffusers pipeline with random weights from small configs (no hub, no text
encoders: prompts enter as precomputed embeddings) and the call arguments of one generation.
``tests/test_pipeline_matrix.py`` runs every case; docs/pipelines.md's table of verified pipelines is
:func:`verified_table` (a test checks they agree). Against the flow-matching pipeline classes computed from the
installed diffusers (``tests/flow_pipelines.py``), every class is a case, a :class:`Refusal` checked on a tiny
instance, or in :data:`NOT_COVERED` with its reason; docs/pipelines.md's :func:`coverage_text` says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import PIL.Image
import torch
from diffusers import (
    AceStepConditionEncoder,
    AceStepPipeline,
    AceStepTransformer1DModel,
    AdaptiveProjectedMixGuidance,
    AnyFlowFARPipeline,
    AnyFlowFARTransformer3DModel,
    AnyFlowPipeline,
    AnyFlowTransformer3DModel,
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLMagvit,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    AutoencoderOobleck,
    AutoencoderSAME,
    BriaFibo2Pipeline,
    BriaFibo2Transformer2DModel,
    BriaFiboEditPipeline,
    BriaFiboPipeline,
    BriaFiboTransformer2DModel,
    BriaPipeline,
    BriaTransformer2DModel,
    ChromaImg2ImgPipeline,
    ChromaInpaintPipeline,
    ChromaPipeline,
    ChromaTransformer2DModel,
    ChronoEditPipeline,
    ChronoEditTransformer3DModel,
    ClassifierFreeGuidance,
    CogView4ControlPipeline,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DreamLiteMobilePipeline,
    DreamLitePipeline,
    DreamLiteUNetModel,
    EasyAnimateInpaintPipeline,
    EasyAnimatePipeline,
    EasyAnimateTransformer3DModel,
    ErnieImagePipeline,
    ErnieImageTransformer2DModel,
    FlowMapEulerDiscreteScheduler,
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
    GlmImagePipeline,
    GlmImageTransformer2DModel,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
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
    Kandinsky6TI2VAPipeline,
    Kandinsky6Transformer3DModel,
    Krea2Pipeline,
    Krea2Transformer2DModel,
    LongCatAudioDiTPipeline,
    LongCatAudioDiTTransformer,
    LongCatAudioDiTVae,
    LongCatImagePipeline,
    LongCatImageTransformer2DModel,
    LTX2ConditionPipeline,
    LTX2DFRPipeline,
    LTX2DFRTemporalRefinePipeline,
    LTX2HDRPipeline,
    LTX2ImageToVideoPipeline,
    LTX2InContextPipeline,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
    LTXConditionPipeline,
    LTXEulerAncestralRFScheduler,
    LTXI2VLongMultiPromptPipeline,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    LucyEditPipeline,
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
    QwenImageTransformer2DModel,
    SanaControlNetModel,
    SanaControlNetPipeline,
    SanaImageToVideoPipeline,
    SanaPAGPipeline,
    SanaPipeline,
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    SanaTransformer2DModel,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
    SanaWMLTX2Refiner,
    SanaWMLTX2RefinerTransformer3DModel,
    SanaWMPipeline,
    SanaWMTransformer3DModel,
    SCMScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableAudio3AudioToAudioPipeline,
    StableAudio3DiTModel,
    StableAudio3DurationEmbedder,
    StableAudio3InpaintPipeline,
    StableAudio3Pipeline,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    VisualClozeGenerationPipeline,
    VisualClozePipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
    WanVideoToVideoPipeline,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImageOmniPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GemmaTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3Model,
    Qwen3VLModel,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from meancache.testing import tiny_inputs, tiny_pipeline
from tests.flow_pipelines import flow_pipeline_classes

Build = Callable[[], tuple[DiffusionPipeline, dict[str, Any]]]
"""A fresh tiny pipeline and the keyword arguments of one generation (no steps, generator or output type)."""

Call = Callable[[DiffusionPipeline, dict[str, Any]], Any]
"""Runs a pipeline with the keyword arguments of one generation and the test's ``num_inference_steps``,
``generator`` and ``output_type``, and returns its output."""


def _call(pipe: DiffusionPipeline, kwargs: dict[str, Any]) -> Any:
    return pipe(**kwargs, return_dict=False)[0]


SIZE = 32
"""Image side in pixels (16 latent tokens for the 8x VAEs)."""


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a pipeline class and a way of calling it."""

    name: str
    pipeline: str
    """The diffusers pipeline class."""
    build: Build
    """A fresh tiny pipeline and the keyword arguments of one generation (no steps, generator or output type)."""
    notes: str
    loops: int = 1
    """Denoising loops per call, all over the same steps (VisualCloze's generation and upsampling, FramePack's video
    sections): each is a generation of its own to MeanCache, and its summary is the last one's."""
    first_use_declined: str | None = None
    """Why ``MeanCacheConfig(budget=B)`` does not calibrate this case on first use (its first step does not show the
    guidance, or its sigmas do not fall), or None: it does."""
    output_type: str = "latent"
    """What the call returns, and the test compares: the final latents, or (``"pt"``) the decoded images, for a
    pipeline without a working latent output (decoding is deterministic: bit-identical latents decode to
    bit-identical images)."""
    call: Call = _call
    """How the test calls the pipeline (SanaWM's refiner takes its steps as sigmas)."""


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed))


def _image(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """A ``(1, 3, size, size)`` image in [0, 1]."""
    return torch.rand(1, 3, size, size, generator=_g(seed))


def _pil_image(seed: int = 0, size: int = SIZE) -> PIL.Image.Image:
    return PIL.Image.fromarray((_image(seed, size)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 1.0
    return mask


def _masked_embeds(length: int = 6, width: int = 16) -> dict[str, Any]:
    """Prompt and negative-prompt embeddings with their (all-ones) attention masks."""
    mask = torch.ones(1, length, dtype=torch.long)
    return {"prompt_embeds": _randn(1, length, width), "negative_prompt_embeds": _randn(1, length, width, seed=1),
            "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone()}  # fmt: skip


def _kl_vae(latent_channels: int) -> AutoencoderKL:
    """A one-level AutoencoderKL (scale factor 1: latents as large as the image; pipelines assume 8 from their
    ``block_out_channels``, so they are built on a 3-level one)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=2, sample_size=SIZE, shift_factor=0.0, scaling_factor=1.0,
    )  # fmt: skip


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
    inputs = {"prompt_embeds": _randn(1, 8, 32), "pooled_prompt_embeds": _randn(1, 32, seed=1),
              "height": SIZE, "width": SIZE}  # fmt: skip
    if negative:
        inputs |= {"negative_prompt_embeds": _randn(1, 8, 32, seed=2),
                   "negative_pooled_prompt_embeds": _randn(1, 32, seed=3), "true_cfg_scale": 3.0}  # fmt: skip
    return inputs


def _flux_components(in_channels: int = 16) -> dict[str, Any]:
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": _kl_vae(4), "text_encoder": None,
            "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
            "transformer": _flux_transformer(in_channels)}  # fmt: skip


IMG2IMG: dict[str, Any] = {"image": _image(), "strength": 0.6}
INPAINT: dict[str, Any] = {**IMG2IMG, "mask_image": _mask()}
CONTROL: dict[str, Any] = {"control_image": _image(1), "controlnet_conditioning_scale": 0.5}
KONTEXT: dict[str, Any] = {"image": _image(), "max_area": SIZE * SIZE, "_auto_resize": False}


def _flux(pipeline: type, in_channels: int = 16, controlnet: bool = False, **extra: Any) -> Build:
    """A Flux-family pipeline on the tiny Flux components: ``in_channels`` of the transformer (Flux Control appends
    the control image's latent channels), with a ControlNet of the same size if ``controlnet``."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        components = _flux_components(in_channels)
        if controlnet:
            components["controlnet"] = _flux_transformer(model=FluxControlNetModel)
        return pipeline(**components), {**_flux_inputs(), **extra}

    return build


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
    components = _qwen_components()
    pipe = NucleusMoEImagePipeline(transformer=transformer, scheduler=components["scheduler"], vae=components["vae"],
                                   text_encoder=None, processor=None)  # fmt: skip
    return pipe, {**{k: v for k, v in _qwen_inputs().items() if k != "true_cfg_scale"}, "guidance_scale": 4.0}


CHARS = [chr(code) for code in range(33, 127)]
"""The printable ASCII characters: the vocabularies of the character-level tokenizers."""


def _t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer (built from its vocabulary: nothing is downloaded)."""
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0),
                              *((c, -1.0) for c in CHARS)], extra_ids=0)  # fmt: skip


def _clip_t5_text_encoders() -> dict[str, Any]:
    """Flux's two text encoders, one layer each and 32 wide (the tiny Flux transformer's widths), with character-level
    tokenizers (built from configs and vocabularies: nothing is downloaded), for the pipelines that take no prompt
    embeddings."""
    clip_vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *CHARS,
                                                      *(c + "</w>" for c in CHARS)])}  # fmt: skip
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()  # fmt: skip
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
    )).eval()  # fmt: skip
    return {"text_encoder": text_encoder, "tokenizer": CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77),
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}  # fmt: skip


def _visualcloze(pipeline: type = VisualClozeGenerationPipeline, **extra: Any) -> Build:
    """A VisualCloze pipeline on the tiny Flux components (the target's masked-image latents and mask as extra input
    channels, as Flux Fill) and real text encoders: its inputs check refuses prompt embeddings without a task
    prompt, and encodes any task prompt. The combined pipeline runs the generation, then an SDEdit upsampling."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        pipe = pipeline(**_flux_components(16 + 16 + 256) | _clip_t5_text_encoders(), resolution=SIZE)
        for inner in (getattr(pipe, name, None) for name in ("generation_pipe", "upsampling_pipe")):
            if inner is not None:
                inner.set_progress_bar_config(disable=True)  # the combined pipeline's setting does not reach them
        grid = [[_pil_image(0), _pil_image(1)], [_pil_image(2), None]]  # an in-context example, then the query
        return pipe, {"task_prompt": "depth to image", "content_prompt": "a lake", "image": grid,
                      "max_sequence_length": 16, "guidance_scale": 5.0, **extra}  # fmt: skip

    return build


def _qwen_transformer(**extra: Any) -> QwenImageTransformer2DModel:
    """A one-block Qwen-Image transformer, with the config keys ``extra`` (Qwen-Image-Layered's)."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), **extra,
    )  # fmt: skip


def _qwen_components(downsamples: int = 3, **extra: Any) -> dict[str, Any]:
    """Qwen-Image's components; its VAE downsamples ``downsamples`` times (8x for 3)."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1] * (downsamples + 1), num_res_blocks=1,
        temperal_downsample=[False] * downsamples,
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": None, "tokenizer": None,
            "transformer": _qwen_transformer(), **extra}  # fmt: skip


def _qwen_inputs() -> dict[str, Any]:
    mask = torch.ones(1, 7, dtype=torch.long)
    return {"prompt_embeds": _randn(1, 7, 16), "prompt_embeds_mask": mask,
            "negative_prompt_embeds": _randn(1, 7, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
            "true_cfg_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _kind(kind: str) -> Build:
    return lambda: (tiny_pipeline(kind), tiny_inputs(kind))  # type: ignore[arg-type]


def _accepted(pipeline: type, components: dict[str, Any]) -> dict[str, Any]:
    """The components ``pipeline`` takes (variants of a family take different optional encoders)."""
    parameters = inspect.signature(pipeline.__init__).parameters
    return {name: component for name, component in components.items() if name in parameters}


def _sd3(pipeline: type, controlnet: int | None = None, **extra: Any) -> Build:
    """An SD3-family pipeline: a one-block SD3 transformer on 16 latent channels (what the inpainting pipeline
    requires) and the 8x VAE; with ``controlnet`` (its extra conditioning channels: 1 for the inpainting mask), an
    SD3 ControlNet of the transformer's size."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        sizes = {"sample_size": SIZE // 8, "patch_size": 1, "in_channels": 16, "num_layers": 1,
                 "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                 "caption_projection_dim": 16, "pooled_projection_dim": 32, "out_channels": 16}  # fmt: skip
        torch.manual_seed(0)
        components = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": _kl_vae(16),
                      "transformer": SD3Transformer2DModel(**sizes), "pag_applied_layers": ["transformer_blocks.0"],
                      **dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                       "tokenizer_3"])}  # fmt: skip
        if controlnet is not None:
            torch.manual_seed(0)
            components["controlnet"] = SD3ControlNetModel(**sizes, extra_conditioning_channels=controlnet)
        inputs = {"prompt_embeds": _randn(1, 7, 32), "pooled_prompt_embeds": _randn(1, 32, seed=1),
                  "negative_prompt_embeds": _randn(1, 7, 32, seed=2),
                  "negative_pooled_prompt_embeds": _randn(1, 32, seed=3), "guidance_scale": 5.0, "height": SIZE,
                  "width": SIZE}  # fmt: skip
        return pipeline(**_accepted(pipeline, components)), {**inputs, **extra}

    return build


def _qwen(pipeline: type, controlnet: int | None = None, **extra: Any) -> Build:
    """A Qwen-Image-family pipeline; with ``controlnet`` (its extra condition channels: 4 for the packed inpainting
    mask), a Qwen-Image ControlNet of the transformer's size."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        components = _qwen_components()
        if controlnet is not None:
            torch.manual_seed(0)
            components["controlnet"] = QwenImageControlNetModel(
                patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
                extra_condition_channels=controlnet,
            )  # fmt: skip
        return pipeline(**components), {**_qwen_inputs(), **extra}

    return build


def _qwen_layered() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Qwen-Image-Layered at 640 px, the smaller of the two resolutions it allows (it resizes its image to that area),
    on the 16x VAE (40 x 40 latents: 400 tokens a frame; 1 layer, so the composite, the layer and the image: 1200
    tokens), with a one-layer Qwen2.5-VL text encoder: it reads the encoder's dtype even with prompt embeddings,
    and captions the image with it when the prompt is empty, so the prompts are given and encoded."""
    text_encoder, tokenizer = _qwen_vl_text_encoder(1, 16, Qwen2_5_VLForConditionalGeneration)
    components = _qwen_components(downsamples=4, text_encoder=text_encoder, tokenizer=tokenizer, processor=None)
    components["transformer"] = _qwen_transformer(use_additional_t_cond=True, use_layer3d_rope=True)
    return QwenImageLayeredPipeline(**components), {"image": _pil_image(), "prompt": "a cat", "negative_prompt": "bad",
                                                    "true_cfg_scale": 4.0, "layers": 1, "resolution": 640}  # fmt: skip


def _qwen_edit(pipeline: type, images: int, **extra: Any) -> Build:
    """Without CFG, and with a 16x VAE: these pipelines encode every reference image at 1024 x 1024."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        pipe = pipeline(**_qwen_components(downsamples=4, processor=None))
        image = [_pil_image(seed) for seed in range(images)] if images > 1 else _pil_image()
        inputs = {k: v for k, v in _qwen_inputs().items() if not k.startswith("negative")} | {"true_cfg_scale": 1.0}
        return pipe, {**inputs, "image": image, "height": 2 * SIZE, "width": 2 * SIZE, **extra}

    return build


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
        components = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": _kl_vae(4), "text_encoder": None,
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
                return _randn(length, 16, seed=seed)
            return [_randn(length + k, 16, seed=seed + 100 * k) for k in range(images + 2 if images else 1)]

        inputs: dict[str, Any] = {"prompt_embeds": [embeds(5 + i, i) for i in range(batch)],
                                  "guidance_scale": 4.0 if cfg else 0.0, "height": SIZE, "width": SIZE}  # fmt: skip
        if cfg:
            inputs["negative_prompt_embeds"] = [embeds(3 + i, 10 + i) for i in range(batch)]
        return pipeline(**components), {**inputs, **extra}

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
        pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4), text_encoder=None,
                        tokenizer=None, transformer=transformer)  # fmt: skip
        mask = torch.ones(1, 8, dtype=torch.bool)
        return pipe, {"prompt_embeds": _randn(1, 8, 32), "negative_prompt_embeds": _randn(1, 8, 32, seed=1),
                      "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone(),
                      "guidance_scale": 4.0, "height": SIZE, "width": SIZE, **extra}  # fmt: skip

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
        pipe = pipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
        return pipe, {"prompt_embeds": _randn(1, 16, 32), "negative_prompt_embeds": _randn(1, 16, 32, seed=1),
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
        pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4),
                               text_encoder=None, tokenizer=None)  # fmt: skip
        return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "cfg_trunc_ratio": cfg_trunc_ratio, "height": SIZE,
                      "width": SIZE}  # fmt: skip

    return build


def _ltx(pipeline: type = LTXPipeline, **extra: Any) -> Build:
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
        return pipe, {**_masked_embeds(), "guidance_scale": 3.0, "height": size, "width": size, "num_frames": 9,
                      **extra}  # fmt: skip

    return build


def _wan_transformer(seed: int, model: type = WanTransformer3DModel, in_channels: int = 4, **extra: Any) -> Any:
    torch.manual_seed(seed)
    return model(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=16, num_layers=1, rope_max_seq_len=32, **extra,
    )  # fmt: skip


def _wan(pipeline: type = WanPipeline, experts: int = 1, transformer: Any = None, **extra: Any) -> Build:
    """A Wan-family pipeline on 4 latent channels; its Wan VAE only when an image or video is encoded."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        second = {"transformer_2": _wan_transformer(1), "boundary_ratio": 0.875} if experts == 2 else {}
        vae = _wan_vae() if any(key in extra for key in ("image", "video")) else None
        components = {"tokenizer": None, "text_encoder": None, "vae": vae, "image_encoder": _clip_vision(8),
                      "image_processor": CLIPImageProcessor(crop_size=32, size=32),
                      "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
                      "transformer": transformer() if transformer else _wan_transformer(0), **second}  # fmt: skip
        return pipeline(**_accepted(pipeline, components)), {
            "prompt_embeds": _randn(1, 6, 16), "negative_prompt_embeds": _randn(1, 6, 16, seed=1),
            "guidance_scale": 4.0, "height": 32, "width": 32, **extra,
        }  # fmt: skip

    return build


def _wan_vae(channels: int = 4, patch: bool = False) -> AutoencoderKLWan:
    """A Wan VAE on ``channels`` latent channels (8x spatial, 4x temporal); with ``patch``, Wan 2.2's layout: pixels
    patchified 2x2 before a residual encoder (16x spatial)."""
    torch.manual_seed(0)
    layout = {"base_dim": 4, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
              "is_residual": True} if patch else {"base_dim": 3}  # fmt: skip
    return AutoencoderKLWan(z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * channels,
                            latents_std=[1.0] * channels, **layout)  # fmt: skip


def _randomise_zero_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its zero-initialised parameters (final layers and modulations that start at 0, so the tiny
    model would predict 0 everywhere) drawn at random."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return model


def _clip_vision(width: int) -> CLIPVisionModelWithProjection:
    """A one-layer CLIP image encoder (built from a config: nothing is downloaded)."""
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, projection_dim=width, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=8,
    )).eval()  # fmt: skip


def _frames(count: int = 5, mode: str = "RGB") -> list[PIL.Image.Image]:
    return [_pil_image(seed).convert(mode) for seed in range(count)]


FLOW_DPM_SOLVER = {"flow_shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                   "algorithm_type": "dpmsolver++", "solver_order": 2}  # fmt: skip
"""Sana's default scheduler: the flow DPM-Solver++."""


def _sana(pipeline: type = SanaPipeline, dpm_solver: bool = True, controlnet: bool = False, **extra: Any) -> Build:
    """A Sana-family pipeline with its default scheduler, the flow DPM-Solver++, or with a
    FlowMatchEulerDiscreteScheduler; with a Sana ControlNet of the transformer's size if ``controlnet``."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        sizes = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                 "num_layers": 1, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
                 "cross_attention_dim": 16, "caption_channels": 16, "sample_size": 4}  # fmt: skip
        torch.manual_seed(0)
        scheduler = (DPMSolverMultistepScheduler(**FLOW_DPM_SOLVER) if dpm_solver
                     else FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
        components = {"tokenizer": None, "text_encoder": None, "vae": _dc_vae() if controlnet else None,
                      "transformer": SanaTransformer2DModel(**sizes), "scheduler": scheduler,
                      "pag_applied_layers": ["transformer_blocks.0"]}  # fmt: skip
        if controlnet:
            torch.manual_seed(0)
            components["controlnet"] = SanaControlNetModel(**sizes)
        return pipeline(**_accepted(pipeline, components)), {
            **_masked_embeds(), "negative_prompt": None, "guidance_scale": 4.0, "height": 128, "width": 128,
            "use_resolution_binning": False, **extra,
        }  # fmt: skip

    return build


def _dc_vae() -> AutoencoderDC:
    """A six-level DC-AE of residual blocks only (32x, as Sana's): the ControlNet pipeline encodes its control
    image."""
    torch.manual_seed(0)
    levels = 6
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",) * levels,
        decoder_block_types=("ResBlock",) * levels, encoder_block_out_channels=(4,) * levels,
        decoder_block_out_channels=(4,) * levels, encoder_qkv_multiscales=((),) * levels,
        decoder_qkv_multiscales=((),) * levels, encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels, downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )  # fmt: skip


def _sana_video(pipeline: type = SanaVideoPipeline, **extra: Any) -> Build:
    """A Sana-Video-family pipeline; a Wan VAE when an image is encoded (image-to-video)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = SanaVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=4, patch_size=(1, 2, 2),
        )  # fmt: skip
        pipe = pipeline(tokenizer=None, text_encoder=None, vae=_wan_vae() if "image" in extra else None,
                        transformer=transformer, scheduler=DPMSolverMultistepScheduler(**FLOW_DPM_SOLVER))  # fmt: skip
        return pipe, {**_masked_embeds(), "negative_prompt": None, "guidance_scale": 4.0, "height": 32, "width": 32,
                      "frames": 5, "use_resolution_binning": False, **extra}  # fmt: skip

    return build


def _bria() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4],
    )  # fmt: skip
    pipe = BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4),
                        text_encoder=None, tokenizer=None)  # fmt: skip
    return pipe, {"prompt_embeds": _randn(1, 8, 32), "negative_prompt_embeds": _randn(1, 8, 32, seed=1),
                  "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _mochi() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=6,
    )  # fmt: skip
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)  # fmt: skip
    return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "height": 32, "width": 32, "num_frames": 7}  # fmt: skip


def _auraflow() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=SIZE // 8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )  # fmt: skip
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _lumina() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = LuminaNextDiT2DModel(
        sample_size=SIZE // 8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, learn_sigma=True, cross_attention_dim=16,
    )  # fmt: skip
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4),
                          text_encoder=None, tokenizer=None)  # fmt: skip
    return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


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
    return pipe, {"prompt_embeds_t5": _randn(1, 6, 8), "prompt_embeds_llama3": _randn(2, 1, 5, 4, seed=1),
                  "pooled_prompt_embeds": _randn(1, 8, seed=2), "negative_prompt_embeds_t5": _randn(1, 6, 8, seed=3),
                  "negative_prompt_embeds_llama3": _randn(2, 1, 5, 4, seed=4),
                  "negative_pooled_prompt_embeds": _randn(1, 8, seed=5), "guidance_scale": 4.0, "height": SIZE,
                  "width": SIZE}  # fmt: skip


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
        inputs = {"prompt_embeds": _randn(1, 8, 32), **guidance, "height": SIZE, "width": SIZE, **extra}
        return pipe, {**inputs, "image": _pil_image(size=64)} if reference else inputs  # its smallest image

    return build


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
    return pipe, {"prompt_embeds": _randn(1, 6, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": _randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "prompt_embeds_2": _randn(1, 4, 8, seed=2), "prompt_embeds_mask_2": mask_2,
                  "negative_prompt_embeds_2": _randn(1, 4, 8, seed=3), "negative_prompt_embeds_mask_2": mask_2.clone(),
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
        return pipe, {"prompt_embeds": _randn(1, 6, 16), "prompt_embeds_mask": mask,
                      "negative_prompt_embeds": _randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                      "prompt_embeds_2": _randn(1, 4, 8, seed=2), "prompt_embeds_mask_2": mask_2,
                      "negative_prompt_embeds_2": _randn(1, 4, 8, seed=3),
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
        pipe = pipeline(**_accepted(pipeline, {**components, "image_processor": None}))
        return pipe, {**tiny_inputs("hunyuan-video"), "image": _pil_image(), **extra}

    return build


def _ovis() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4), text_encoder=None,
                             tokenizer=None, transformer=transformer)  # fmt: skip
    return pipe, {"prompt_embeds": _randn(1, 8, 32), "negative_prompt_embeds": _randn(1, 8, 32, seed=1),
                  "negative_prompt": None, "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _ernie_image() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=32, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    vae = AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                             norm_num_groups=2, sample_size=SIZE)  # fmt: skip
    pipe = ErnieImagePipeline(transformer=_randomise_zero_parameters(transformer), vae=vae, text_encoder=None,
                              tokenizer=None, scheduler=FlowMatchEulerDiscreteScheduler(), pe=None,
                              pe_tokenizer=None)  # fmt: skip
    return pipe, {"prompt_embeds": [_randn(8, 32)], "negative_prompt_embeds": [_randn(6, 32, seed=1)],
                  "guidance_scale": 4.0, "use_pe": False, "height": SIZE, "width": SIZE}  # fmt: skip


def _krea2() -> tuple[DiffusionPipeline, dict[str, Any]]:
    torch.manual_seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_qwen_components()["vae"],
                         text_encoder=None, tokenizer=None, transformer=transformer)  # fmt: skip
    mask = torch.ones(1, 7, dtype=torch.bool)
    return pipe, {"prompt_embeds": _randn(1, 7, 2, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": _randn(1, 7, 2, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
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
        vae = tiny_pipeline("hunyuan-video").vae if video else _kl_vae(4)
        pipe = pipeline(transformer=_randomise_zero_parameters(transformer), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))  # fmt: skip
        size = {"height": SIZE, "width": SIZE} if video else {"height": 640, "width": 1408}
        prompt = {"prompt_embeds_qwen": _randn(1, 6, 16), "prompt_embeds_clip": _randn(1, 8),
                  "prompt_cu_seqlens": torch.tensor([0, 6], dtype=torch.int32), **size}  # fmt: skip
        if pipeline is Kandinsky5I2VPipeline:
            return pipe, {**prompt, "image": _pil_image(), "guidance_scale": 1.0, "num_frames": 17}
        negative = {"negative_prompt_embeds_qwen": _randn(1, 6, 16, seed=1),
                    "negative_prompt_embeds_clip": _randn(1, 8, seed=1),
                    "negative_prompt_cu_seqlens": torch.tensor([0, 6], dtype=torch.int32)}  # fmt: skip
        extra = {"num_frames": 5} if video else {"image": _pil_image()} if image else {}
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
    video = torch.rand(1, 5, 3, SIZE, 3 * SIZE // 2, generator=_g())  # (batch, frames, channels, height, width)
    return pipe, {"video": video, "resolution_scale": 2}


def _sana_wm_refiner() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """SanaWM's LTX-2 refiner without a VAE (it returns the refined latents), with a one-layer Gemma-3 text encoder
    and a character-level tokenizer (built from a config and a vocabulary: nothing is downloaded; it takes no prompt
    embeddings) and LTX-2's text connectors: a 7-frame stage-1 latent is its sink frame and two autoregressive blocks
    of 3 frames, each refined in a loop of its own (new timesteps each)."""
    tokenizer = GemmaTokenizer(vocab={token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                                                           "\u2581", *CHARS])}, merges=[])  # fmt: skip
    torch.manual_seed(0)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 4},
        vision_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        mm_tokens_per_image=4,
    )).eval()  # fmt: skip
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False,
        rope_type="split",
    )  # fmt: skip
    torch.manual_seed(0)
    transformer = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=16, rope_double_precision=False,
        rope_type="split",
    )  # fmt: skip
    pipe = SanaWMLTX2Refiner(transformer=transformer, connectors=connectors, tokenizer=tokenizer,
                             text_encoder=text_encoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                             text_max_sequence_length=8)  # fmt: skip
    return pipe, {"sana_latent": _randn(1, 4, 7, 4, 4), "prompt": "a cat", "fps": 24.0}


def _sana_wm_refiner_call(pipe: DiffusionPipeline, kwargs: dict[str, Any]) -> Any:
    """SanaWM's refiner takes its steps as descending sigmas ending at 0 (here from 0.9, its distilled schedule's
    start) and returns its output itself."""
    steps = kwargs["num_inference_steps"]
    sigmas = tuple(torch.linspace(0.9, 0.0, steps + 1).tolist())
    return pipe(**{k: v for k, v in kwargs.items() if k != "num_inference_steps"}, sigmas=sigmas)


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
        vae = {} if pixel else {"vae": _kl_vae(4)}
        pipe = pipeline(transformer=_randomise_zero_parameters(transformer),
                        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                        default_sample_size=SIZE, **vae)  # fmt: skip
        return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "use_resolution_binning": False, "height": SIZE,
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
        return pipe, {**_masked_embeds(), "guidance_scale": 4.0, "height": SIZE, "width": SIZE, "num_frames": 5,
                      **extra}  # fmt: skip

    return build


def _video(channels: int = 3, frames: int = 5) -> torch.Tensor:
    """A ``(1, channels, frames, SIZE, SIZE)`` video in [0, 1]."""
    return torch.rand(1, channels, frames, SIZE, SIZE, generator=_g())


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
    return pipe, {"prompt_embeds": _randn(1, 6, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": _randn(1, 6, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "image": _randn(1, 4, 1, 4, 4, seed=2), "height": 64, "width": 64}  # fmt: skip


def _byte_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level tokenizer without merges whose chat template is the message text (built from its vocabulary:
    nothing is downloaded)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*symbols, "<|endoftext|>", "<|im_end|>"])}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    return tokenizer


def _qwen_vl_text_encoder(layers: int, width: int = 8, model: type = Qwen3VLModel) -> tuple[Any, Any]:
    """A tiny Qwen-VL ``model`` (Qwen3-VL, or Qwen2.5-VL) of ``layers`` decoder layers of ``width`` (heads of 4;
    built from a config: nothing is downloaded) and :func:`_byte_tokenizer`."""
    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = model.config_class(
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": width,
                     "num_hidden_layers": layers, "num_attention_heads": width // 4, "num_key_value_heads": 1,
                     "head_dim": 4, "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 0]}},
        vision_config={"depth": 1, "hidden_size": width, "intermediate_size": width, "num_heads": 2,
                       "out_hidden_size": width},
    )  # fmt: skip
    return model(config).eval(), tokenizer


def _bria_fibo(pipeline: type = BriaFiboPipeline, **extra: Any) -> Build:
    """A Bria FIBO-family pipeline on a Wan VAE of 16 latent channels, with its SmolLM3 text encoder (two layers;
    SmolLM3's vocabulary size, as the pipeline hard-codes its begin-of-text id) and :func:`_byte_tokenizer`: it
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
        pipe = pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_wan_vae(16),
                        text_encoder=text_encoder, tokenizer=_byte_tokenizer())  # fmt: skip
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
    pipe = BriaFibo2Pipeline(transformer=_randomise_zero_parameters(transformer),
                             scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             processor=None)  # fmt: skip
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, {"prompt_embeds": _randn(1, 2, 7, 16), "prompt_embeds_mask": mask,
                  "negative_prompt_embeds": _randn(1, 2, 7, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
                  "guidance_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def _joyimage_edit() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """JoyImage Edit: its image processor buckets every request to about a megapixel, so it gets a 16x Wan VAE
    (64 x 64 latents: 1024 tokens for the target and as many for the reference image)."""
    torch.manual_seed(0)
    transformer = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
        rope_dim_list=[4, 6, 6],
    )  # fmt: skip
    pipe = JoyImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_wan_vae(patch=True),
                                text_encoder=None, tokenizer=None, transformer=_randomise_zero_parameters(transformer),
                                processor=None)  # fmt: skip
    inputs = {k: v for k, v in _qwen_inputs().items() if k not in ("true_cfg_scale", "height", "width")}
    return pipe, {**inputs, "guidance_scale": 4.0, "image": _pil_image()}


def _ideogram4() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Ideogram4: a conditional and an unconditional transformer (its CFG branch's own model), and a Qwen3-VL text
    encoder whose 36 layers' hidden states it taps (it takes no prompt embeddings)."""
    text_encoder, tokenizer = _qwen_vl_text_encoder(36)

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


def _ace_step() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """ACE-Step 1.5 (music): a one-layer 1-D transformer on ``(batch, frames, 4)`` latents, its condition encoder
    (lyrics, timbre and text in one sequence) and a one-layer Qwen3 text encoder with :func:`_byte_tokenizer` (it
    takes no prompt embeddings); an Oobleck VAE of 4 latent frames a second (the loop reads its rate)."""
    sizes = {"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 8, "rope_theta": 10000.0, "sliding_window": 16}  # fmt: skip
    torch.manual_seed(0)
    transformer = AceStepTransformer1DModel(num_hidden_layers=1, in_channels=4 * 3, audio_acoustic_hidden_dim=4,
                                            **sizes)  # fmt: skip
    torch.manual_seed(0)
    condition_encoder = AceStepConditionEncoder(text_hidden_dim=8, timbre_hidden_dim=4,
                                                num_lyric_encoder_hidden_layers=1,
                                                num_timbre_encoder_hidden_layers=1, **sizes)  # fmt: skip
    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4,
    )).eval()  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderOobleck(encoder_hidden_size=4, downsampling_ratios=[1, 2], channel_multiples=[1, 1],
                             decoder_channels=2, decoder_input_channels=4, sampling_rate=8)  # fmt: skip
    pipe = AceStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition_encoder,
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0))  # fmt: skip
    return pipe, {"prompt": "piano", "lyrics": "la la", "audio_duration": 4.0, "guidance_scale": 4.0,
                  "max_text_length": 32, "max_lyric_length": 16}  # fmt: skip


def _stable_audio3(pipeline: type = StableAudio3Pipeline, **extra: Any) -> Build:
    """A Stable Audio 3-family pipeline on ``(batch, 4, frames)`` latents: a one-block DiT, a one-block SAME VAE
    (4x: 4 latent frames a second at 16 Hz; the audio-to-audio and inpainting pipelines encode their audio) and the
    duration embedder; prompts enter as embeddings. The scheduler is the base checkpoint's Euler one (the distilled
    checkpoint's ``stochastic_sampling`` is refused at enable)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = StableAudio3DiTModel(
            io_channels=4, embed_dim=16, depth=1, num_heads=2, cond_token_dim=8, global_cond_dim=8,
            local_add_cond_dim=4 + 1, timestep_features_dim=8, ff_mult=1.0, num_memory_tokens=2,
            use_differential_attention=False,
        )  # fmt: skip
        torch.manual_seed(0)
        vae = AutoencoderSAME(
            patch_size=2, encoder_channels=4, encoder_c_mults=(1,), encoder_strides=(2,),
            encoder_transformer_depths=(1,), latent_dim=4, use_differential_attention=False, dim_heads=4, ff_mult=1,
            sampling_rate=16,
        )  # fmt: skip
        torch.manual_seed(0)
        pipe = pipeline(vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
                        duration_embedder=StableAudio3DurationEmbedder(output_dim=8, fourier_dim=8),
                        scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
        return pipe, {"prompt_embeds": _randn(1, 5, 8), "duration": 4.0, **extra}

    return build


def _audio(seconds: float = 4.0, rate: int = 16) -> torch.Tensor:
    """A ``(1, 2, samples)`` stereo waveform in [-1, 1]."""
    return torch.rand(1, 2, int(seconds * rate), generator=_g()) * 2 - 1


def _longcat_audio() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LongCat-AudioDiT: a one-block 1-D transformer on ``(batch, frames, 4)`` latents (its zero-initialised layers
    drawn at random) and a one-layer UMT5 text encoder with :func:`_t5_tokenizer` (it takes no prompt embeddings); its
    VAE of 4 latent frames a second (the loop reads its rate); its own scheduler, with inverted sigmas (0 up to 1)."""
    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                                               vocab_size=len(tokenizer))).eval()  # fmt: skip
    torch.manual_seed(0)
    transformer = _randomise_zero_parameters(LongCatAudioDiTTransformer(
        dit_dim=16, dit_depth=1, dit_heads=2, dit_text_dim=8, latent_dim=4, text_conv=False, ff_mult=1.0,
    ))  # fmt: skip
    torch.manual_seed(0)
    vae = LongCatAudioDiTVae(channels=2, c_mults=[1, 1], strides=[4], latent_dim=4, encoder_latent_dim=8,
                             downsampling_ratio=4, sample_rate=16)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True)
    pipe = LongCatAudioDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                   scheduler=scheduler)  # fmt: skip
    return pipe, {"prompt": "waves", "negative_prompt": "noise", "audio_duration_s": 4.0, "guidance_scale": 4.0}


def _longcat_image() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LongCat-Image: a one-double-block, one-single-block transformer on the 8x VAE's 16 latent channels, with its
    Qwen2.5-VL text encoder (one layer, 16 wide) and :func:`_byte_tokenizer`: its ``prompt_embeds`` path fails in
    diffusers 0.42.1 (``len(prompt)`` with no prompt), so the prompts are given and encoded, padded to its 512 tokens.
    No prompt rewriting: that generates with the encoder through its Qwen2-VL processor (None here)."""
    text_encoder, tokenizer = _qwen_vl_text_encoder(1, 16, Qwen2_5_VLForConditionalGeneration)
    torch.manual_seed(0)
    transformer = LongCatImageTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[0, 4, 4],
    )  # fmt: skip
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(16), text_encoder=text_encoder,
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
        vae = _kl_vae(4)
        vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                    use_dynamic_shifting=True, time_shift_type="linear")  # fmt: skip
        pipe = GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None,
                                vae=vae, transformer=transformer, scheduler=scheduler)  # fmt: skip
        tokens = (SIZE // 16) ** 2
        return pipe, {"prompt_embeds": _randn(1, 6, 16), "negative_prompt_embeds": _randn(1, 6, 16, seed=1),
                      "prior_token_ids": torch.randint(0, 32, (1, tokens), generator=_g()), "guidance_scale": 4.0,
                      "height": SIZE, "width": SIZE, **extra}  # fmt: skip

    return build


CASES: tuple[Case, ...] = (
    Case("flux", "FluxPipeline", _kind("flux"), "guidance-distilled, one branch"),
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
        _flux(FluxFillPipeline, 16 + 16 + 256, image=_image(), mask_image=_mask()),
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
        _flux(FluxKontextInpaintPipeline, **KONTEXT, mask_image=_mask(), strength=0.6),
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
        _flux(FluxControlPipeline, 32, control_image=_image(1)),
        "control image latents as extra input channels",
    ),
    Case(
        "flux-control-img2img",
        "FluxControlImg2ImgPipeline",
        _flux(FluxControlImg2ImgPipeline, 32, control_image=_image(1), **IMG2IMG),
        "control channels; strength 0.6",
    ),
    Case(
        "flux-control-inpaint",
        "FluxControlInpaintPipeline",
        _flux(FluxControlInpaintPipeline, 32, control_image=_image(1), **INPAINT),
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
    Case("qwen-image", "QwenImagePipeline", _qwen(QwenImagePipeline), "true CFG with norm rescale"),
    Case("nucleus-moe-image", "NucleusMoEImagePipeline", _nucleus_moe, "mixture-of-experts blocks; CFG"),
    Case(
        "qwen-image-img2img",
        "QwenImageImg2ImgPipeline",
        _qwen(QwenImageImg2ImgPipeline, image=_image(), strength=0.6),
        "strength 0.6",
    ),
    Case(
        "qwen-image-inpaint",
        "QwenImageInpaintPipeline",
        _qwen(QwenImageInpaintPipeline, image=_image(), mask_image=_mask(), strength=0.6),
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
        _qwen(QwenImageControlNetInpaintPipeline, 4, **CONTROL, control_mask=_mask()),
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
        _qwen_edit(QwenImageEditInpaintPipeline, 1, mask_image=_mask(), strength=0.6),
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
        _z_image(ZImageOmniPipeline, image=_pil_image(size=64)),
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
        _z_image(ZImageControlNetInpaintPipeline, controlnet=9, **CONTROL, image=_image(), mask_image=_mask()),
        "ControlNet inpainting",
    ),
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
        _sd3(StableDiffusion3ControlNetInpaintingPipeline, 1, **CONTROL, control_mask=_mask()),
        "ControlNet with a mask channel",
    ),
    Case("hunyuan-video", "HunyuanVideoPipeline", _kind("hunyuan-video"), "video"),
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
    Case(
        "hunyuan-skyreels-i2v",
        "HunyuanSkyreelsImageToVideoPipeline",
        _hunyuan_video_i2v(HunyuanSkyreelsImageToVideoPipeline, 4 + 4, guidance_embeds=False),
        "image latents as extra input channels",
    ),
    Case("chroma", "ChromaPipeline", _chroma(ChromaPipeline), "CFG in two calls"),
    Case("chroma-img2img", "ChromaImg2ImgPipeline", _chroma(ChromaImg2ImgPipeline, **IMG2IMG), "strength 0.6"),
    Case(
        "chroma-inpaint",
        "ChromaInpaintPipeline",
        _chroma(ChromaInpaintPipeline, **INPAINT),
        "strength 0.6; the transformer's config given `guidance_embeds`, which the pipeline reads",
    ),
    Case("cogview4", "CogView4Pipeline", _cogview4(), "CFG in two calls"),
    Case(
        "cogview4-control",
        "CogView4ControlPipeline",
        _cogview4(CogView4ControlPipeline, 8, control_image=_image(1)),
        "control image latents as extra input channels",
    ),
    Case("lumina2", "Lumina2Pipeline", _lumina2(1.0), "CFG in two calls"),
    Case("lumina2-cfg-trunc", "Lumina2Pipeline", _lumina2(0.5), "truncated CFG: one branch after half the steps"),
    Case("ltx", "LTXPipeline", _ltx(), "video, CFG batched"),
    Case(
        "ltx-i2v",
        "LTXImageToVideoPipeline",
        _ltx(LTXImageToVideoPipeline, image=_pil_image()),
        "the first frame is the image's latents; the scheduler steps the others",
        first_use_declined="its transformer returns packed tokens the loop unpacks to step the frames after the image",
    ),
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
            transformer=lambda: _wan_transformer(0, in_channels=4 + 4 + 4, image_dim=8),
            image=_pil_image(),
            num_frames=5,
        ),
        "image latents and mask as extra input channels; CLIP image embeddings",
    ),
    Case(
        "wan-vace",
        "WanVACEPipeline",
        _wan(
            WanVACEPipeline,
            transformer=lambda: _wan_transformer(
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
            transformer=lambda: _wan_transformer(0, ChronoEditTransformer3DModel, in_channels=4 + 4 + 4, image_dim=8),
            image=_pil_image(),
            num_frames=5,
        ),
        "Wan-based image editing: image latents and mask as extra input channels; CLIP image embeddings",
    ),
    Case(
        "lucy-edit",
        "LucyEditPipeline",
        _wan(
            LucyEditPipeline, transformer=lambda: _wan_transformer(0, in_channels=4 + 4), video=_frames(), num_frames=5
        ),
        "Wan-based video editing: the input video's latents as extra input channels",
    ),
    Case(
        "wan-v2v",
        "WanVideoToVideoPipeline",
        _wan(WanVideoToVideoPipeline, video=_frames(), strength=0.6),
        "strength 0.6",
    ),
    Case("sana", "SanaPipeline", _sana(), "CFG batched; its default flow DPM-Solver++"),
    Case("sana-euler", "SanaPipeline", _sana(dpm_solver=False), "with a FlowMatchEulerDiscreteScheduler"),
    Case(
        "sana-pag",
        "SanaPAGPipeline",
        _sana(SanaPAGPipeline, pag_scale=3.0),
        "perturbed-attention guidance: three branches batched; flow DPM-Solver++",
    ),
    Case(
        "sana-controlnet",
        "SanaControlNetPipeline",
        _sana(SanaControlNetPipeline, controlnet=True, **{**CONTROL, "control_image": _image(1, size=128)}),
        "ControlNet: runs on computed steps only (the control image sets the size: 128 px, 4 x 4 latents); flow "
        "DPM-Solver++",
    ),
    Case("sana-video", "SanaVideoPipeline", _sana_video(), "video, CFG batched; flow DPM-Solver++"),
    Case(
        "sana-i2v",
        "SanaImageToVideoPipeline",
        _sana_video(SanaImageToVideoPipeline, image=_pil_image()),
        "the first frame is the image's latents; the scheduler steps the others; flow DPM-Solver++",
    ),
    Case(
        "sana-wm-refiner",
        "SanaWMLTX2Refiner",
        _sana_wm_refiner,
        "two loops per call, one per autoregressive block (each a generation at the budget), their steps given as "
        "sigmas; its K/V captures (the sink's before the blocks, each block's after it) run outside the steps; its "
        "Gemma-3 text encoder runs",
        loops=2,
        call=_sana_wm_refiner_call,
        first_use_declined="its transformer returns packed tokens the loop unpacks",
    ),
    Case("mochi", "MochiPipeline", _mochi, "video, CFG batched"),
    Case("bria", "BriaPipeline", _bria, "CFG batched"),
    Case("bria-fibo", "BriaFiboPipeline", _bria_fibo(), "CFG batched; every text-encoder layer feeds the blocks"),
    Case(
        "bria-fibo-edit",
        "BriaFiboEditPipeline",
        _bria_fibo(
            BriaFiboEditPipeline,
            prompt='{"edit_instruction": "make it red"}',
            image=_pil_image(),
            mask=_pil_image(1).convert("L"),
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
    Case("flux2", "Flux2Pipeline", _flux2(), "text-to-image"),
    Case(
        "flux2-klein",
        "Flux2KleinPipeline",
        _flux2(Flux2KleinPipeline, negative_prompt_embeds=_randn(1, 8, 32, seed=1)),
        "true CFG: two calls per step",
    ),
    Case(
        "flux2-klein-inpaint",
        "Flux2KleinInpaintPipeline",
        _flux2(
            Flux2KleinInpaintPipeline,
            image=_pil_image(),
            mask_image=_mask(),
            strength=0.6,
            negative_prompt_embeds=_randn(1, 8, 32, seed=1),
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
    Case("hunyuan-image", "HunyuanImagePipeline", _hunyuan_image, "stateful guider (AdaptiveProjectedMixGuidance)"),
    Case(
        "hunyuan-image-refiner",
        "HunyuanImageRefinerPipeline",
        _hunyuan_image_refiner,
        "image latents as extra input channels; guidance-distilled; stateful guider",
    ),
    Case("easyanimate", "EasyAnimatePipeline", _easyanimate(), "video, CFG batched"),
    Case(
        "easyanimate-inpaint",
        "EasyAnimateInpaintPipeline",
        _easyanimate(EasyAnimateInpaintPipeline, 4 + 4 + 4, video=_video(), mask_video=_video(1), strength=0.6),
        "mask and masked-video latents as extra input channels; strength 0.6",
    ),
    Case("hunyuan-video-1.5", "HunyuanVideo15Pipeline", _hunyuan_video15(), "video, guider (ClassifierFreeGuidance)"),
    Case(
        "hunyuan-video-1.5-i2v",
        "HunyuanVideo15ImageToVideoPipeline",
        _hunyuan_video15(HunyuanVideo15ImageToVideoPipeline, image=_pil_image(size=64)),
        "image latents as extra input channels, SigLIP image embeddings; guider",
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
            image=[_pil_image()],
            prior_token_image_ids=[torch.randint(0, 32, ((SIZE // 16) ** 2,), generator=_g(1))],
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
        "ace-step",
        "AceStepPipeline",
        _ace_step,
        "audio (1-D latents); CFG batched, APG guidance with momentum",
        first_use_declined="adaptive projected guidance with momentum",
    ),
    Case(
        "stable-audio3",
        "StableAudio3Pipeline",
        _stable_audio3(guidance_scale=4.0, negative_prompt_embeds=_randn(1, 5, 8, seed=1)),
        "audio (1-D latents); CFG batched; its log-SNR sigmas",
    ),
    Case(
        "stable-audio3-a2a",
        "StableAudio3AudioToAudioPipeline",
        _stable_audio3(StableAudio3AudioToAudioPipeline, audio=_audio(), init_noise_level=0.6),
        "audio-to-audio at noise level 0.6 (its first step raises sigma: 0.6, then 0.92, as the reference); no CFG",
        first_use_declined="its first step raises sigma",
    ),
    Case(
        "stable-audio3-inpaint",
        "StableAudio3InpaintPipeline",
        _stable_audio3(StableAudio3InpaintPipeline, audio=_audio(), mask_start_seconds=1.0, mask_end_seconds=3.0),
        "mask and masked audio latents as local conditioning; no CFG",
    ),
    Case(
        "longcat-audio",
        "LongCatAudioDiTPipeline",
        _longcat_audio,
        "audio (1-D latents); CFG in two calls; inverted sigmas (its scheduler's `invert_sigmas`)",
        first_use_declined="its sigmas count up from 0 to 1",
    ),
    Case(
        "longcat-image",
        "LongCatImagePipeline",
        _longcat_image,
        "CFG in two calls with norm rescale; its Qwen2.5-VL text encoder runs, prompts padded to 512 tokens",
    ),
)
"""Every case the matrix test runs."""


@dataclass(frozen=True)
class Refusal:
    """A pipeline class ``enable_mean_cache`` refuses, with a tiny instance to check the refusal on."""

    pipeline: str
    build: Build
    error: str
    """A regular expression the error message matches (after ``cannot drive <pipeline>``)."""
    notes: str


def _sana_sprint(pipeline: type = SanaSprintPipeline, **extra: Any) -> Build:
    """A Sana Sprint pipeline (text-to-image or, with an ``image`` in ``extra``, image-to-image) on the tiny Sana
    components, with its checkpoints' scheduler, the ``SCMScheduler``."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        pipe, inputs = _sana(pipeline, **extra)()
        pipe.register_modules(scheduler=SCMScheduler())
        return pipe, inputs

    return build


def _ltx_long_multi_prompt() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LTX-Video's long multi-prompt pipeline: one loop per temporal window, with its T5 text encoder (it encodes
    each window's prompt segment itself)."""
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=32,
    )  # fmt: skip
    encoders = _clip_t5_text_encoders()
    pipe = LTXI2VLongMultiPromptPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                         text_encoder=encoders["text_encoder_2"], tokenizer=encoders["tokenizer_2"],
                                         transformer=transformer)  # fmt: skip
    return pipe, {"prompt": "a cat | a dog", "negative_prompt": "bad", "guidance_scale": 3.0, "height": 64,
                  "width": 64, "num_frames": 17, "temporal_tile_size": 12, "temporal_overlap": 4,
                  "max_sequence_length": 8}  # fmt: skip


def _anyflow(pipeline: type) -> Build:
    """An AnyFlow pipeline (``AnyFlowFARPipeline``: its frame-autoregressive variant) with its flow-map sampler, the
    ``FlowMapEulerDiscreteScheduler``, and an AnyFlow transformer of the tiny Wan transformer's size; no generation
    arguments (refused at enable time)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        model = AnyFlowFARTransformer3DModel if pipeline is AnyFlowFARPipeline else AnyFlowTransformer3DModel
        pipe = pipeline(tokenizer=None, text_encoder=None, transformer=_wan_transformer(0, model), vae=None,
                        scheduler=FlowMapEulerDiscreteScheduler())  # fmt: skip
        return pipe, {}

    return build


def _dreamlite(pipeline: type) -> Build:
    """A DreamLite pipeline on a three-level DreamLite UNet (8 channels, one layer per block); no generation arguments
    (refused at enable time)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        unet = DreamLiteUNetModel(
            sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
            norm_num_groups=2, cross_attention_dim=16, attention_head_dim=4, num_kv_heads=1,
        )  # fmt: skip
        pipe = pipeline(text_encoder=None, tokenizer=None, processor=None, vae=None, unet=unet,
                        scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
        return pipe, {}

    return build


def _kandinsky6_ti2va() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Kandinsky 6's text/image-to-video-and-audio pipeline on a one-block Kandinsky 6 transformer with its audio
    stream (no audio VAE or vocoder: the refusal reads the class, not the call); no generation arguments (refused at
    enable time)."""
    torch.manual_seed(0)
    transformer = Kandinsky6Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), in_audio_dim=4,
        out_audio_dim=4,
    )  # fmt: skip
    pipe = Kandinsky6TI2VAPipeline(transformer=transformer, vae=None, text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None,
                                   scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    return pipe, {}


def _ltx2(pipeline: type, scheduler: type = FlowMatchEulerDiscreteScheduler) -> Build:
    """An LTX-2-family pipeline with its ``scheduler`` on a one-layer LTX-2 audio-video transformer; no generation
    arguments (refused at enable time)."""

    def build() -> tuple[DiffusionPipeline, dict[str, Any]]:
        torch.manual_seed(0)
        transformer = LTX2VideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
            audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
            audio_cross_attention_dim=16, num_layers=1, caption_channels=16,
        )  # fmt: skip
        components = {
            "scheduler": scheduler(),
            "transformer": transformer,
            "temporal_latent_upsampler": None,
            **dict.fromkeys(["vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "vocoder"]),
        }
        return pipeline(**_accepted(pipeline, components)), {}

    return build


def _sana_wm() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """SANA-WM (camera-controlled world model) on a one-layer SANA-WM transformer; no generation arguments (refused at
    enable time)."""
    torch.manual_seed(0)
    transformer = SanaWMTransformer3DModel(
        in_channels=4, num_layers=1, hidden_size=16, num_attention_heads=2, linear_head_dim=8,
        chunk_plucker_post_attn_blocks=1, caption_channels=16, image_size=32, mixed_precision="fp32",
    )  # fmt: skip
    pipe = SanaWMPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                          scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    return pipe, {}


_AUDIO_LOOP = (
    "refused at enable: its loop steps a second (audio) latent stream with a deep copy of the scheduler, which would "
    "carry a copy of MeanCache's hooks"
)
_AUDIO_LOOP_ERROR = "a second latent stream .* with a copy of the scheduler"
_FLOW_MAP = (
    "refused at enable: its `FlowMapEulerDiscreteScheduler` (a flow-map sampler: the model predicts the average "
    "velocity to the step's target time, not the instantaneous velocity MeanCache's estimate is built from)"
)
_NO_TRANSFORMER = "refused at enable: a UNet (`DreamLiteUNetModel`), no `transformer` module to skip"


REFUSED: tuple[Refusal, ...] = (
    Refusal("LTXConditionPipeline", _ltx(LTXConditionPipeline), "per_token_timesteps",
            "refused at enable: its loop steps with `per_token_timesteps` (each token from its own sigma)"),
    Refusal("LTXI2VLongMultiPromptPipeline", _ltx_long_multi_prompt, r"timesteps\[:-1\]",
            "refused at enable: its loop leaves the scheduler's last step out (`timesteps[:-1]`), so the last step "
            "of MeanCache's plan would never run (its budget one computed step short, silently)"),
    Refusal("SanaSprintPipeline", _sana_sprint(), "with its SCMScheduler",
            "refused at enable: its `SCMScheduler` (sCM consistency sampling) is not a flow-matching Euler or "
            "DPM-Solver++ step"),
    Refusal("SanaSprintImg2ImgPipeline", _sana_sprint(SanaSprintImg2ImgPipeline, image=_pil_image()),
            "with its SCMScheduler", "refused at enable: its `SCMScheduler`, as Sana Sprint"),
    Refusal("SanaWMPipeline", _sana_wm, "per_token_timesteps",
            "refused at enable: its loop steps with `per_token_timesteps` (the first latent frame pinned at sigma 0)"),
    Refusal("AnyFlowPipeline", _anyflow(AnyFlowPipeline), "with its FlowMapEulerDiscreteScheduler", _FLOW_MAP),
    Refusal("AnyFlowFARPipeline", _anyflow(AnyFlowFARPipeline), "with its FlowMapEulerDiscreteScheduler", _FLOW_MAP),
    Refusal("DreamLitePipeline", _dreamlite(DreamLitePipeline), "no `transformer` module", _NO_TRANSFORMER),
    Refusal("DreamLiteMobilePipeline", _dreamlite(DreamLiteMobilePipeline), "no `transformer` module",
            _NO_TRANSFORMER),
    Refusal("Kandinsky6TI2VAPipeline", _kandinsky6_ti2va, _AUDIO_LOOP_ERROR,
            f"{_AUDIO_LOOP} (with `sample_audio=True`, its default; a video-only call, `sample_audio=False`, is "
            "refused too: the check reads the class's source)"),
    *(Refusal(pipeline.__name__, _ltx2(pipeline), _AUDIO_LOOP_ERROR, _AUDIO_LOOP)
      for pipeline in (LTX2Pipeline, LTX2ImageToVideoPipeline, LTX2ConditionPipeline, LTX2InContextPipeline,
                       LTX2DFRPipeline)),
    Refusal("LTX2HDRPipeline", _ltx2(LTX2HDRPipeline), _AUDIO_LOOP_ERROR,
            f"{_AUDIO_LOOP} (without an `audio_scheduler` component; with one it makes no copy, and its audio, stepped "
            "with zero velocity, is discarded, but it is refused too: the check reads the class's source)"),
    Refusal("LTX2DFRTemporalRefinePipeline", _ltx2(LTX2DFRTemporalRefinePipeline, LTXEulerAncestralRFScheduler),
            _AUDIO_LOOP_ERROR, f"{_AUDIO_LOOP}; its `LTXEulerAncestralRFScheduler` (ancestral: stochastic) would be "
            "refused next"),
)  # fmt: skip
"""Pipelines refused at enable time, each checked on a tiny instance."""

_COSMOS = (
    "refuses to run without its safety checker (`CosmosSafetyChecker`, from the `cosmos_guardrail` package, which "
    "loads guard models from the hub; None is refused by the pipeline): a stand-in would replace a component the "
    "pipeline does not allow to be absent"
)
_COSMOS2_5 = (
    "refused at enable with its default `UniPCMultistepScheduler`; with a FlowMatchEulerDiscreteScheduler, it "
    f"{_COSMOS} (its constructor makes one when given None, an ImportError without `cosmos_guardrail`)"
)
NOT_COVERED: dict[str, str] = {
    "JoyImageEditPlusPipeline": "with prompt embeddings and reference images it fails in diffusers 0.42.1 itself "
    "(`len(prompt)` with no prompt, and its inputs check refuses both), so it needs its Qwen3-VL processor, whose "
    "video processor needs torchvision (not installed here)",
    "Cosmos2TextToImagePipeline": _COSMOS,
    "Cosmos2VideoToWorldPipeline": _COSMOS,
    "Cosmos2_5_PredictBasePipeline": _COSMOS2_5,
    "Cosmos2_5_TransferPipeline": _COSMOS2_5,
    "EasyAnimateControlPipeline": "fails in diffusers 0.42.1 itself on every call (it passes `text_encoder_index` to "
    "its own `encode_prompt`, which does not take it)",
    "LongCatImageEditPipeline": "its `prompt_embeds` path fails in diffusers 0.42.1 itself (`len(prompt)` with no "
    "prompt), so it needs its Qwen2-VL processor (its image processor feeds the image to the text encoder), which "
    "its constructor reads (None is refused); that processor cannot be built here even without a video processor: "
    "transformers 5.24 checks its `video_processor` argument, None included, against `VideoProcessorMixin`, which it "
    "exports only with torchvision (not installed here); it also resizes every request to about a megapixel",
    "OmniGenPipeline": "its multimodal processor builds torchvision transforms in its constructor (torchvision is "
    "not installed here)",
    "QwenImage21Pipeline": "its constructor tokenizes through a Qwen3-VL processor, whose video processor needs "
    "torchvision (not installed here); not built in the matrix yet",
}
"""Flow-matching pipeline classes (``tests/flow_pipelines.py``) neither in :data:`CASES` nor in :data:`REFUSED`,
and why."""


def verified_table() -> str:
    """The table of verified pipelines in docs/pipelines.md (Markdown), one row per case."""
    rows = ["| Pipeline | Case | Notes |", "| --- | --- | --- |"]
    rows += [f"| `{case.pipeline}` | {case.name} | {case.notes}{_first_use_note(case)} |" for case in CASES]
    return "\n".join(rows)


def _first_use_note(case: Case) -> str:
    if case.first_use_declined is None:
        return ""
    return f"; not calibrated on first use ({case.first_use_declined}): uniform steps unless given a schedule"


def coverage_text() -> str:
    """docs/pipelines.md's coverage statement against the computed list, and the table of the classes not verified."""
    flow = flow_pipeline_classes()
    verified = {case.pipeline for case in CASES}
    text = (
        f"Verified: {len(verified)} of the {len(flow)} flow-matching pipeline classes of the installed diffusers "
        f"({diffusers.__version__}), as computed by `tests/flow_pipelines.py`; {len(REFUSED)} more are checked to be "
        f"refused at enable time. The other {len(NOT_COVERED)}, and why:\n\n"
    )
    rows = ["| Pipeline | Status |", "| --- | --- |"]
    rows += [f"| `{refusal.pipeline}` | {refusal.notes} (tested) |" for refusal in REFUSED]
    rows += [f"| `{name}` | {why} |" for name, why in sorted(NOT_COVERED.items())]
    return text + "\n".join(rows)


PIPELINES_PAGE = Path(__file__).parents[1] / "docs" / "pipelines.md"
"""The docs page that holds :func:`verified_table` and :func:`coverage_text`."""


def write_pipelines_page(path: Path = PIPELINES_PAGE) -> None:
    """Replace the page's table of verified pipelines with :func:`verified_table` and its coverage statement and
    table with :func:`coverage_text` (``python -m tests.pipeline_matrix`` after changing the matrix): each part
    runs from its first line to the blank line after its table."""
    text = path.read_text()
    for generated, first, table in (
        (verified_table(), "| Pipeline | Case | Notes |", "| Pipeline | Case | Notes |"),
        (coverage_text(), "Verified: ", "| Pipeline | Status |"),
    ):
        begin = text.index(first)
        end = text.find("\n\n", text.index(table, begin))
        text = text[:begin] + generated + (text[end:] if end >= 0 else "\n")
    path.write_text(text)


if __name__ == "__main__":
    write_pipelines_page()
