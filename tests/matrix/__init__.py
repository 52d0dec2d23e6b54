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

CASES: tuple[Case, ...] = (
    *flux.CASES,
    *qwen.CASES,
    *sd3.CASES,
    *wan.CASES,
    *hunyuan.CASES,
    *ltx.CASES,
    *sana.CASES,
    *audio.CASES,
    *other.CASES,
)
"""Every case the matrix test runs, family by family (docs/pipelines.md's table lists them in this order)."""
