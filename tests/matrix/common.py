"""What the family modules share: :class:`Case`, the tiny inputs (images, masks, prompt embeddings) and the
VAEs, text encoders and tokenizers that pipelines of several families are built on."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2TokenizerFast,
    Qwen3VLModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from meancache.testing import tiny_inputs, tiny_pipeline

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


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed))


def tensor_image(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """A ``(1, 3, size, size)`` image in [0, 1]."""
    return torch.rand(1, 3, size, size, generator=generator(seed))


def pil_image(seed: int = 0, size: int = SIZE) -> PIL.Image.Image:
    return PIL.Image.fromarray((tensor_image(seed, size)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))


def inpaint_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 1.0
    return mask


def masked_embeds(length: int = 6, width: int = 16) -> dict[str, Any]:
    """Prompt and negative-prompt embeddings with their (all-ones) attention masks."""
    mask = torch.ones(1, length, dtype=torch.long)
    return {"prompt_embeds": randn(1, length, width), "negative_prompt_embeds": randn(1, length, width, seed=1),
            "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone()}  # fmt: skip


def kl_vae(latent_channels: int) -> AutoencoderKL:
    """A one-level AutoencoderKL (scale factor 1: latents as large as the image; pipelines assume 8 from their
    ``block_out_channels``, so they are built on a 3-level one)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=2, sample_size=SIZE, shift_factor=0.0, scaling_factor=1.0,
    )  # fmt: skip


IMG2IMG: dict[str, Any] = {"image": tensor_image(), "strength": 0.6}
INPAINT: dict[str, Any] = {**IMG2IMG, "mask_image": inpaint_mask()}
CONTROL: dict[str, Any] = {"control_image": tensor_image(1), "controlnet_conditioning_scale": 0.5}


CHARS = [chr(code) for code in range(33, 127)]
"""The printable ASCII characters: the vocabularies of the character-level tokenizers."""


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer (built from its vocabulary: nothing is downloaded)."""
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0),
                              *((c, -1.0) for c in CHARS)], extra_ids=0)  # fmt: skip


def clip_t5_text_encoders() -> dict[str, Any]:
    """Flux's two text encoders, one layer each and 32 wide (the tiny Flux transformer's widths), with character-level
    tokenizers (built from configs and vocabularies: nothing is downloaded), for the pipelines that take no prompt
    embeddings."""
    clip_vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *CHARS,
                                                      *(c + "</w>" for c in CHARS)])}  # fmt: skip
    tokenizer_2 = t5_tokenizer()
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


def qwen_transformer(**extra: Any) -> QwenImageTransformer2DModel:
    """A one-block Qwen-Image transformer, with the config keys ``extra`` (Qwen-Image-Layered's)."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), **extra,
    )  # fmt: skip


def qwen_components(downsamples: int = 3, **extra: Any) -> dict[str, Any]:
    """Qwen-Image's components; its VAE downsamples ``downsamples`` times (8x for 3)."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1] * (downsamples + 1), num_res_blocks=1,
        temperal_downsample=[False] * downsamples,
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": None, "tokenizer": None,
            "transformer": qwen_transformer(), **extra}  # fmt: skip


def qwen_inputs() -> dict[str, Any]:
    mask = torch.ones(1, 7, dtype=torch.long)
    return {"prompt_embeds": randn(1, 7, 16), "prompt_embeds_mask": mask,
            "negative_prompt_embeds": randn(1, 7, 16, seed=1), "negative_prompt_embeds_mask": mask.clone(),
            "true_cfg_scale": 4.0, "height": SIZE, "width": SIZE}  # fmt: skip


def tiny(kind: str) -> Build:
    return lambda: (tiny_pipeline(kind), tiny_inputs(kind))  # type: ignore[arg-type]


def accepted(pipeline: type, components: dict[str, Any]) -> dict[str, Any]:
    """The components ``pipeline`` takes (variants of a family take different optional encoders)."""
    parameters = inspect.signature(pipeline.__init__).parameters
    return {name: component for name, component in components.items() if name in parameters}


def wan_vae(channels: int = 4, patch: bool = False) -> AutoencoderKLWan:
    """A Wan VAE on ``channels`` latent channels (8x spatial, 4x temporal); with ``patch``, Wan 2.2's layout: pixels
    patchified 2x2 before a residual encoder (16x spatial)."""
    torch.manual_seed(0)
    layout = {"base_dim": 4, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
              "is_residual": True} if patch else {"base_dim": 3}  # fmt: skip
    return AutoencoderKLWan(z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * channels,
                            latents_std=[1.0] * channels, **layout)  # fmt: skip


def randomise_zero_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its zero-initialised parameters (final layers and modulations that start at 0, so the tiny
    model would predict 0 everywhere) drawn at random."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return model


def byte_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level tokenizer without merges whose chat template is the message text (built from its vocabulary:
    nothing is downloaded)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*symbols, "<|endoftext|>", "<|im_end|>"])}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    return tokenizer


def qwen_vl_text_encoder(layers: int, width: int = 8, model: type = Qwen3VLModel) -> tuple[Any, Any]:
    """A tiny Qwen-VL ``model`` (Qwen3-VL, or Qwen2.5-VL) of ``layers`` decoder layers of ``width`` (heads of 4;
    built from a config: nothing is downloaded) and :func:`byte_tokenizer`."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = model.config_class(
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": width,
                     "num_hidden_layers": layers, "num_attention_heads": width // 4, "num_key_value_heads": 1,
                     "head_dim": 4, "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 0]}},
        vision_config={"depth": 1, "hidden_size": width, "intermediate_size": width, "num_heads": 2,
                       "out_hidden_size": width},
    )  # fmt: skip
    return model(config).eval(), tokenizer
