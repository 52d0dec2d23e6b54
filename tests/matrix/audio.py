"""Audio cases (1-D latents): ACE-Step, Stable Audio 3 and LongCat-AudioDiT."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AceStepConditionEncoder,
    AceStepPipeline,
    AceStepTransformer1DModel,
    AutoencoderOobleck,
    AutoencoderSAME,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LongCatAudioDiTPipeline,
    LongCatAudioDiTTransformer,
    LongCatAudioDiTVae,
    StableAudio3AudioToAudioPipeline,
    StableAudio3DiTModel,
    StableAudio3DurationEmbedder,
    StableAudio3InpaintPipeline,
    StableAudio3Pipeline,
)
from transformers import Qwen3Config, Qwen3Model, UMT5Config, UMT5EncoderModel

from tests.matrix.common import Build, Case, byte_tokenizer, generator, randn, randomise_zero_parameters, t5_tokenizer


def _ace_step() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """ACE-Step 1.5 (music): a one-layer 1-D transformer on ``(batch, frames, 4)`` latents, its condition encoder
    (lyrics, timbre and text in one sequence) and a one-layer Qwen3 text encoder with :func:`byte_tokenizer` (it
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
    tokenizer = byte_tokenizer()
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
        return pipe, {"prompt_embeds": randn(1, 5, 8), "duration": 4.0, **extra}

    return build


def _audio(seconds: float = 4.0, rate: int = 16) -> torch.Tensor:
    """A ``(1, 2, samples)`` stereo waveform in [-1, 1]."""
    return torch.rand(1, 2, int(seconds * rate), generator=generator()) * 2 - 1


def _longcat_audio() -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LongCat-AudioDiT: a one-block 1-D transformer on ``(batch, frames, 4)`` latents (its zero-initialised layers
    drawn at random) and a one-layer UMT5 text encoder with :func:`t5_tokenizer` (it takes no prompt embeddings); its
    VAE of 4 latent frames a second (the loop reads its rate); its own scheduler, with inverted sigmas (0 up to 1)."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                                               vocab_size=len(tokenizer))).eval()  # fmt: skip
    torch.manual_seed(0)
    transformer = randomise_zero_parameters(LongCatAudioDiTTransformer(
        dit_dim=16, dit_depth=1, dit_heads=2, dit_text_dim=8, latent_dim=4, text_conv=False, ff_mult=1.0,
    ))  # fmt: skip
    torch.manual_seed(0)
    vae = LongCatAudioDiTVae(channels=2, c_mults=[1, 1], strides=[4], latent_dim=4, encoder_latent_dim=8,
                             downsampling_ratio=4, sample_rate=16)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True)
    pipe = LongCatAudioDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                   scheduler=scheduler)  # fmt: skip
    return pipe, {"prompt": "waves", "negative_prompt": "noise", "audio_duration_s": 4.0, "guidance_scale": 4.0}


CASES: tuple[Case, ...] = (
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
        _stable_audio3(guidance_scale=4.0, negative_prompt_embeds=randn(1, 5, 8, seed=1)),
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
)
"""The audio cases."""
