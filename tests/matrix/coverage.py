"""The pipelines refused at enable time (each checked on a tiny instance), the flow-matching classes not covered, and
the writer of docs/pipelines.md's tables from them and the cases: ``python -m tests.matrix.coverage``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AnyFlowFARPipeline,
    AnyFlowFARTransformer3DModel,
    AnyFlowPipeline,
    AnyFlowTransformer3DModel,
    DiffusionPipeline,
    DreamLiteMobilePipeline,
    DreamLitePipeline,
    DreamLiteUNetModel,
    FlowMapEulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Kandinsky6TI2VAPipeline,
    Kandinsky6Transformer3DModel,
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
    LTXVideoTransformer3DModel,
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    SanaWMPipeline,
    SanaWMTransformer3DModel,
    SCMScheduler,
)

from tests.flow_pipelines import flow_pipeline_classes
from tests.matrix import CASES
from tests.matrix.common import Build, Case, accepted, clip_t5_text_encoders, pil_image
from tests.matrix.ltx import ltx_video
from tests.matrix.sana import sana_image
from tests.matrix.wan import wan_transformer


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
        pipe, inputs = sana_image(pipeline, **extra)()
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
    encoders = clip_t5_text_encoders()
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
        pipe = pipeline(tokenizer=None, text_encoder=None, transformer=wan_transformer(0, model), vae=None,
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
        return pipeline(**accepted(pipeline, components)), {}

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
    Refusal("LTXConditionPipeline", ltx_video(LTXConditionPipeline), "per_token_timesteps",
            "refused at enable: its loop steps with `per_token_timesteps` (each token from its own sigma)"),
    Refusal("LTXI2VLongMultiPromptPipeline", _ltx_long_multi_prompt, r"timesteps\[:-1\]",
            "refused at enable: its loop leaves the scheduler's last step out (`timesteps[:-1]`), so the last step "
            "of MeanCache's plan would never run (its budget one computed step short, silently)"),
    Refusal("SanaSprintPipeline", _sana_sprint(), "with its SCMScheduler",
            "refused at enable: its `SCMScheduler` (sCM consistency sampling) is not a flow-matching Euler or "
            "DPM-Solver++ step"),
    Refusal("SanaSprintImg2ImgPipeline", _sana_sprint(SanaSprintImg2ImgPipeline, image=pil_image()),
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


PIPELINES_PAGE = Path(__file__).parents[2] / "docs" / "pipelines.md"
"""The docs page that holds :func:`verified_table` and :func:`coverage_text`."""


def write_pipelines_page(path: Path = PIPELINES_PAGE) -> None:
    """Replace the page's table of verified pipelines with :func:`verified_table` and its coverage statement and
    table with :func:`coverage_text` (``python -m tests.matrix.coverage`` after changing the matrix): each part
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
