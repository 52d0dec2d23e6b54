"""How each bundled digits model is built, conditioned and turned into its real diffusers pipeline.

A recipe names the architecture (a small ``FluxTransformer2DModel``, ``QwenImageTransformer2DModel`` or
``HunyuanVideoTransformer3DModel`` with its own VAE class), its training data (images or videos), how they
become the packed, normalised latents its pipeline denoises, how the
transformer is called in training exactly as the pipeline calls it at inference, and which pipeline
arguments generate a class. Conditioning enters through the pipeline's own prompt-embedding inputs:
class ``c`` is a learned ``prompt_embeds[c]`` (plus ``pooled_prompt_embeds[c]`` for Flux); index 10 is the
"no class" embedding, trained with label dropout.

* ``digits-flux``: like FLUX.1-dev, a single branch with the guidance *embedding* (3.5).
* ``digits-qwen``: like Qwen-Image, true classifier-free guidance (scale 4, the pipeline's norm-rescaled
  combination; the negative prompt is the "no class" embedding), so two transformer calls per step.
* ``digits-video``: like HunyuanVideo, the guidance embedding (6.0), a causal 3D VAE with 4x temporal
  compression, 9-frame videos of a digit sliding across the frame; sampled with the pipeline's true CFG (scale 3,
  the negative prompt is the "no class" embedding), so two transformer calls per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
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
)

from meancache.models.digits import FRAMES, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, digits_dataset, moving_digits_dataset

TEXT_TOKENS = 4
TEXT_DIM = 64
VAE_SCALE_FACTOR = 2  # both VAEs downsample by 2 ...
TOKEN_SIDE = IMAGE_SIZE // (2 * VAE_SCALE_FACTOR)  # ... then the pipelines pack 2x2 patches: 8x8 tokens


class DigitsRecipe(ABC):
    """One bundled model's architecture, training data, latent layout, conditioning and pipeline. The samples
    are images ``(N, 1, 32, 32)`` in [-1, 1], or for a video model (``frames > 1``) videos
    ``(N, 1, frames, 32, 32)``."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    embedding_shapes: ClassVar[dict[str, tuple[int, ...]]]  # per class; saved in class_embeddings.safetensors
    frames: ClassVar[int] = 1
    # Training: steps and batch size of the VAE, then of the transformer (``python -m meancache.models.train``).
    vae_steps: ClassVar[int] = 400
    vae_batch: ClassVar[int] = 64
    transformer_steps: ClassVar[int] = 2500
    transformer_batch: ClassVar[int] = 96

    def dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples and their labels (the digit)."""
        return digits_dataset()

    def postprocess(self, pipe: DiffusionPipeline, decoded: torch.Tensor) -> np.ndarray:
        """What the pipeline returns with ``output_type="np"`` for the output of :meth:`decode`, one channel:
        images ``(N, 32, 32)`` in [0, 1] (a video model: ``(N, frames, 32, 32)``)."""
        return pipe.image_processor.postprocess(decoded, output_type="np")[..., 0]

    @abstractmethod
    def build_vae(self) -> torch.nn.Module: ...

    @abstractmethod
    def build_transformer(self) -> torch.nn.Module: ...

    @abstractmethod
    def vae_input(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples of :meth:`dataset` in the layout the VAE encodes."""

    @abstractmethod
    def fit_latent_statistics(self, vae: torch.nn.Module, latents: torch.Tensor) -> None:
        """Store in the VAE config the statistics the pipeline uses to (de)normalise ``latents``."""

    @abstractmethod
    def pack(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the normalised token sequences ``(N, tokens, channels)`` the pipeline denoises."""

    @abstractmethod
    def decode(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pack` and the VAE decode, as the pipeline does after its last step: packed
        latents -> samples in [-1, 1] (before the pipeline's post-processing)."""

    @abstractmethod
    def velocity(
        self, transformer: torch.nn.Module, z: torch.Tensor, sigma: torch.Tensor, embeddings: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's ``dz/dsigma`` for packed latents ``z`` at noise levels ``sigma`` (one per sample),
        called as the pipeline calls it (single branch: the class embeddings in ``embeddings``)."""

    @abstractmethod
    def pipeline(self, vae: torch.nn.Module, transformer: torch.nn.Module) -> DiffusionPipeline: ...

    @abstractmethod
    def inputs(self, embeddings: dict[str, torch.Tensor], classes: torch.Tensor) -> dict[str, Any]:
        """Pipeline arguments generating one 32x32 image (or video) per entry of ``classes``."""


class FluxDigits(DigitsRecipe):
    """``FluxPipeline``: 1 double- and 3 single-stream blocks, guidance embedding, 64 image tokens."""

    name = "digits-flux"
    pipeline_class = FluxPipeline
    embedding_shapes: ClassVar[dict[str, tuple[int, ...]]] = {
        "prompt_embeds": (TEXT_TOKENS, TEXT_DIM),
        "pooled_prompt_embeds": (TEXT_DIM,),
    }
    guidance = 3.5

    def build_vae(self) -> AutoencoderKL:
        return AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
        )  # fmt: skip

    def build_transformer(self) -> FluxTransformer2DModel:
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
            axes_dims_rope=[8, 12, 12],
        )  # fmt: skip

    def vae_input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def fit_latent_statistics(self, vae: AutoencoderKL, latents: torch.Tensor) -> None:
        """One shift and scale for all channels (``z = (latent - shift) * scale``), as FLUX's VAE has."""
        vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())

    def pack(self, vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        z = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return FluxPipeline._pack_latents(z, *z.shape)

    def decode(self, vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
        latents = FluxPipeline._unpack_latents(z, IMAGE_SIZE, IMAGE_SIZE, VAE_SCALE_FACTOR)
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    def velocity(
        self, transformer: FluxTransformer2DModel, z: torch.Tensor, sigma: torch.Tensor,
        embeddings: dict[str, torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        img_ids = FluxPipeline._prepare_latent_image_ids(1, TOKEN_SIDE, TOKEN_SIDE, z.device, z.dtype)
        return transformer(
            hidden_states=z, timestep=sigma, guidance=torch.full_like(sigma, self.guidance),
            pooled_projections=embeddings["pooled_prompt_embeds"], encoder_hidden_states=embeddings["prompt_embeds"],
            txt_ids=torch.zeros(TEXT_TOKENS, 3), img_ids=img_ids, return_dict=False,
        )[0]  # fmt: skip

    def pipeline(self, vae: AutoencoderKL, transformer: FluxTransformer2DModel) -> FluxPipeline:
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )  # fmt: skip

    def inputs(self, embeddings: dict[str, torch.Tensor], classes: torch.Tensor) -> dict[str, Any]:
        return {
            "prompt_embeds": embeddings["prompt_embeds"][classes],
            "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"][classes],
            "guidance_scale": self.guidance, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
        }  # fmt: skip


class QwenImageDigits(DigitsRecipe):
    """``QwenImagePipeline``: 3 dual-stream blocks, no guidance embedding, true CFG, 64 image tokens."""

    name = "digits-qwen"
    pipeline_class = QwenImagePipeline
    embedding_shapes: ClassVar[dict[str, tuple[int, ...]]] = {"prompt_embeds": (TEXT_TOKENS, TEXT_DIM)}
    true_cfg_scale = 4.0

    def build_vae(self) -> AutoencoderKLQwenImage:
        return AutoencoderKLQwenImage(
            base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False], input_channels=1,
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )  # fmt: skip

    def build_transformer(self) -> QwenImageTransformer2DModel:
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
        )  # fmt: skip

    def vae_input(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :, None]  # one frame: (N, C, T=1, H, W)

    def fit_latent_statistics(self, vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> None:
        """Per-channel mean and standard deviation (``z = (latent - mean) / std``), as Qwen-Image's VAE has."""
        dims = [d for d in range(latents.ndim) if d != 1]
        vae.register_to_config(latents_mean=latents.mean(dims).tolist(), latents_std=latents.std(dims).tolist())

    def pack(self, vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        mean, std = torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)
        z = ((latents - mean) / std)[:, :, 0]
        return QwenImagePipeline._pack_latents(z, *z.shape)

    def decode(self, vae: AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        mean, std = torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)
        latents = QwenImagePipeline._unpack_latents(z, IMAGE_SIZE, IMAGE_SIZE, VAE_SCALE_FACTOR).to(vae.dtype)
        return vae.decode(latents * std.to(latents) + mean.to(latents), return_dict=False)[0][:, :, 0]

    def velocity(
        self, transformer: QwenImageTransformer2DModel, z: torch.Tensor, sigma: torch.Tensor,
        embeddings: dict[str, torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        return transformer(
            hidden_states=z, timestep=sigma, encoder_hidden_states=embeddings["prompt_embeds"],
            img_shapes=[[(1, TOKEN_SIDE, TOKEN_SIDE)]] * len(z), return_dict=False,
        )[0]  # fmt: skip

    def pipeline(self, vae: AutoencoderKLQwenImage, transformer: QwenImageTransformer2DModel) -> QwenImagePipeline:
        return QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            transformer=transformer,
        )  # fmt: skip

    def inputs(self, embeddings: dict[str, torch.Tensor], classes: torch.Tensor) -> dict[str, Any]:
        prompt = embeddings["prompt_embeds"][classes]
        mask = torch.ones(prompt.shape[:2], dtype=torch.long)
        return {
            "prompt_embeds": prompt, "prompt_embeds_mask": mask,
            "negative_prompt_embeds": embeddings["prompt_embeds"][torch.full_like(classes, NULL_CLASS)],
            "negative_prompt_embeds_mask": mask, "true_cfg_scale": self.true_cfg_scale,
            "height": IMAGE_SIZE, "width": IMAGE_SIZE,
        }  # fmt: skip


class HunyuanVideoDigits(DigitsRecipe):
    """``HunyuanVideoPipeline``: 1 double- and 3 single-stream blocks after a 1-block token refiner, guidance
    embedding; a causal 3D VAE takes 9 frames of 32x32 to 3 x 16 x 16 latents (4x in time, 2x in space), which
    the transformer patches 2x2: 192 video tokens."""

    name = "digits-video"
    pipeline_class = HunyuanVideoPipeline
    embedding_shapes: ClassVar[dict[str, tuple[int, ...]]] = {
        "prompt_embeds": (TEXT_TOKENS, TEXT_DIM),
        "pooled_prompt_embeds": (TEXT_DIM,),
    }
    frames = FRAMES
    guidance = 6.0  # HunyuanVideoPipeline's default
    true_cfg_scale = 3.0
    """Sampling also runs the pipeline's true CFG against the "no class" embedding: without it the requested digit
    is read in 49 % of frames, with it 73 % (scales 2 / 3 / 4: 72 / 73 / 73 %; digits 0-9 x seeds 0-2, 50 steps:
    ``benchmarks/bench_models.py``)."""
    vae_steps = 1000
    vae_batch = 16
    transformer_steps = 12000
    transformer_batch = 32

    def dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        return moving_digits_dataset()

    def postprocess(self, pipe: HunyuanVideoPipeline, decoded: torch.Tensor) -> np.ndarray:
        return pipe.video_processor.postprocess_video(decoded, output_type="np")[..., 0]

    def build_vae(self) -> AutoencoderKLHunyuanVideo:
        return AutoencoderKLHunyuanVideo(
            in_channels=1, out_channels=1, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
            norm_num_groups=8, spatial_compression_ratio=2, temporal_compression_ratio=4,
            mid_block_add_attention=False,
        )  # fmt: skip

    def build_transformer(self) -> HunyuanVideoTransformer3DModel:
        return HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
            num_single_layers=3, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, rope_axes_dim=(8, 12, 12),
        )  # fmt: skip

    def vae_input(self, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def fit_latent_statistics(self, vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor) -> None:
        """The pipeline only divides latents by ``scaling_factor``, so the per-channel mean is folded into the
        VAE's 1x1 convolutions (the encoder's ``quant_conv`` subtracts it, ``post_quant_conv`` adds it back: the
        VAE's round trip is unchanged) and ``scaling_factor`` whitens what remains."""
        dims = [d for d in range(latents.ndim) if d != 1]
        mean = latents.mean(dims)
        with torch.no_grad():
            vae.quant_conv.bias[: len(mean)] -= mean
            vae.post_quant_conv.bias += vae.post_quant_conv.weight.flatten(1) @ mean
        vae.register_to_config(scaling_factor=1.0 / (latents - mean.view(-1, 1, 1, 1)).std().item())

    def pack(self, vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor) -> torch.Tensor:
        return latents * vae.config.scaling_factor

    def decode(self, vae: AutoencoderKLHunyuanVideo, z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    def velocity(
        self, transformer: HunyuanVideoTransformer3DModel, z: torch.Tensor, sigma: torch.Tensor,
        embeddings: dict[str, torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        prompt = embeddings["prompt_embeds"]
        return transformer(
            hidden_states=z, timestep=sigma * 1000, encoder_hidden_states=prompt,
            encoder_attention_mask=torch.ones(prompt.shape[:2]), pooled_projections=embeddings["pooled_prompt_embeds"],
            guidance=torch.full_like(sigma, self.guidance * 1000), return_dict=False,
        )[0]  # fmt: skip

    def pipeline(
        self, vae: AutoencoderKLHunyuanVideo, transformer: HunyuanVideoTransformer3DModel
    ) -> HunyuanVideoPipeline:
        return HunyuanVideoPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )  # fmt: skip

    def inputs(self, embeddings: dict[str, torch.Tensor], classes: torch.Tensor) -> dict[str, Any]:
        prompt = embeddings["prompt_embeds"][classes]
        mask = torch.ones(prompt.shape[:2], dtype=torch.long)
        null = torch.full_like(classes, NULL_CLASS)
        return {
            "prompt_embeds": prompt, "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"][classes],
            "prompt_attention_mask": mask, "guidance_scale": self.guidance,
            "negative_prompt_embeds": embeddings["prompt_embeds"][null],
            "negative_pooled_prompt_embeds": embeddings["pooled_prompt_embeds"][null],
            "negative_prompt_attention_mask": mask, "true_cfg_scale": self.true_cfg_scale,
            "height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_frames": self.frames,
        }  # fmt: skip


RECIPES: dict[str, DigitsRecipe] = {
    recipe.name: recipe for recipe in (FluxDigits(), QwenImageDigits(), HunyuanVideoDigits())
}
EMBEDDING_ROWS = NUM_CLASSES + 1  # digits 0-9 and the "no class" embedding
