"""Sana-family cases: Sana (PAG, ControlNet), Sana-Video (image-to-video) and SanaWM's LTX-2 refiner."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaControlNetModel,
    SanaControlNetPipeline,
    SanaImageToVideoPipeline,
    SanaPAGPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
    SanaWMLTX2Refiner,
    SanaWMLTX2RefinerTransformer3DModel,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

from tests.matrix.common import (
    CHARS,
    CONTROL,
    Build,
    Case,
    accepted,
    masked_embeds,
    pil_image,
    randn,
    tensor_image,
    wan_vae,
)

FLOW_DPM_SOLVER = {"flow_shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                   "algorithm_type": "dpmsolver++", "solver_order": 2}  # fmt: skip
"""Sana's default scheduler: the flow DPM-Solver++."""


def sana_image(pipeline: type = SanaPipeline, dpm_solver: bool = True, controlnet: bool = False, **extra: Any) -> Build:
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
        return pipeline(**accepted(pipeline, components)), {
            **masked_embeds(), "negative_prompt": None, "guidance_scale": 4.0, "height": 128, "width": 128,
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
        pipe = pipeline(tokenizer=None, text_encoder=None, vae=wan_vae() if "image" in extra else None,
                        transformer=transformer, scheduler=DPMSolverMultistepScheduler(**FLOW_DPM_SOLVER))  # fmt: skip
        return pipe, {**masked_embeds(), "negative_prompt": None, "guidance_scale": 4.0, "height": 32, "width": 32,
                      "frames": 5, "use_resolution_binning": False, **extra}  # fmt: skip

    return build


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
    return pipe, {"sana_latent": randn(1, 4, 7, 4, 4), "prompt": "a cat", "fps": 24.0}


def _sana_wm_refiner_call(pipe: DiffusionPipeline, kwargs: dict[str, Any]) -> Any:
    """SanaWM's refiner takes its steps as descending sigmas ending at 0 (here from 0.9, its distilled schedule's
    start) and returns its output itself."""
    steps = kwargs["num_inference_steps"]
    sigmas = tuple(torch.linspace(0.9, 0.0, steps + 1).tolist())
    return pipe(**{k: v for k, v in kwargs.items() if k != "num_inference_steps"}, sigmas=sigmas)


CASES: tuple[Case, ...] = (
    Case("sana", "SanaPipeline", sana_image(), "CFG batched; its default flow DPM-Solver++"),
    Case("sana-euler", "SanaPipeline", sana_image(dpm_solver=False), "with a FlowMatchEulerDiscreteScheduler"),
    Case(
        "sana-pag",
        "SanaPAGPipeline",
        sana_image(SanaPAGPipeline, pag_scale=3.0),
        "perturbed-attention guidance: three branches batched; flow DPM-Solver++",
    ),
    Case(
        "sana-controlnet",
        "SanaControlNetPipeline",
        sana_image(SanaControlNetPipeline, controlnet=True, **{**CONTROL, "control_image": tensor_image(1, size=128)}),
        "ControlNet: runs on computed steps only (the control image sets the size: 128 px, 4 x 4 latents); flow "
        "DPM-Solver++",
    ),
    Case("sana-video", "SanaVideoPipeline", _sana_video(), "video, CFG batched; flow DPM-Solver++"),
    Case(
        "sana-i2v",
        "SanaImageToVideoPipeline",
        _sana_video(SanaImageToVideoPipeline, image=pil_image()),
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
)
"""The Sana-family cases."""
