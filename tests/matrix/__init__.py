"""The coverage matrix: every diffusers flow-matching pipeline MeanCache is verified on, built tiny.

To add a pipeline case, edit exactly one family module (``flux``, ``qwen``, ``sd3``, ``wan``, ``hunyuan``, ``ltx``,
``sana``, ``audio``, or ``other`` for the families with a few cases each): its builder beside the family's
:class:`~tests.matrix.common.Case` rows, and a row in its ``CASES``. Then regenerate docs/pipelines.md's tables with
``python -m tests.matrix.coverage`` (a test fails until they agree).

Each case builds a real diffusers pipeline with random weights from small configs (no hub; prompts mostly enter as
precomputed embeddings) and the call arguments of one generation; shared helpers are in :mod:`tests.matrix.common`.
``tests/test_pipeline_matrix.py`` runs every case. :mod:`tests.matrix.coverage` holds the refused pipelines, the
classes not covered and the writer of docs/pipelines.md's tables: against the flow-matching pipeline classes computed
from the installed diffusers (``tests/flow_pipelines.py``), every class is a case, a refusal checked on a tiny
instance, or not covered with its reason.
"""

from __future__ import annotations

from tests.matrix import audio, flux, hunyuan, ltx, other, qwen, sana, sd3, wan
from tests.matrix.common import Case

JOINED = """
flux flux-true-cfg flux-img2img flux-img2img-0.6 flux-inpaint flux-fill flux-kontext flux-kontext-inpaint
visualcloze visualcloze-upsampling flux-control flux-control-img2img flux-control-inpaint flux-controlnet
flux-controlnet-img2img flux-controlnet-inpaint qwen-image nucleus-moe-image qwen-image-img2img
qwen-image-inpaint qwen-image-controlnet qwen-image-controlnet-inpaint qwen-image-edit qwen-image-edit-plus
qwen-image-edit-inpaint qwen-image-layered joyimage-edit z-image z-image-no-cfg z-image-omni z-image-omni-t2i
z-image-img2img z-image-inpaint z-image-controlnet z-image-controlnet-inpaint sd3 sd3-img2img sd3-inpaint
sd3-pag sd3-pag-img2img sd3-controlnet sd3-controlnet-inpaint hunyuan-video hunyuan-video-i2v
hunyuan-video-i2v-token-replace hunyuan-video-framepack kandinsky5-t2v kandinsky5-i2v kandinsky5-t2i
kandinsky5-i2i kandinsky6-sr hunyuan-skyreels-i2v chroma chroma-img2img chroma-inpaint cogview4 cogview4-control
lumina2 lumina2-cfg-trunc ltx ltx-i2v wan wan2.2 wan-i2v wan-vace chrono-edit lucy-edit wan-v2v sana sana-euler
sana-pag sana-controlnet sana-video sana-i2v sana-wm-refiner mochi bria bria-fibo bria-fibo-edit bria-fibo2
auraflow lumina hidream flux2 flux2-klein flux2-klein-inpaint flux2-reference flux2-klein-kv hunyuan-image
hunyuan-image-refiner easyanimate easyanimate-inpaint hunyuan-video-1.5 hunyuan-video-1.5-i2v ovis-image prx
prx-pixel glm-image glm-image-edit ernie-image krea2 ideogram4 ace-step stable-audio3 stable-audio3-a2a
stable-audio3-inpaint longcat-audio longcat-image
""".split()  # noqa: SIM905 (a list literal would take a line per name)
"""The cases of the single-file matrix this package replaced, in the order they joined it (frozen: never edited;
a name no longer in the matrix is ignored)."""


def _joined(case: Case) -> int:
    return JOINED.index(case.name) if case.name in JOINED else len(JOINED)


CASES: tuple[Case, ...] = tuple(
    sorted((*flux.CASES, *qwen.CASES, *sd3.CASES, *wan.CASES, *hunyuan.CASES, *ltx.CASES, *sana.CASES,
            *audio.CASES, *other.CASES), key=_joined)
)  # fmt: skip
"""Every case the matrix test runs, in the order they joined the matrix (docs/pipelines.md's table lists them so):
those from before the family modules by :data:`JOINED`, then the later ones in the family modules' order (``sorted``
is stable)."""
