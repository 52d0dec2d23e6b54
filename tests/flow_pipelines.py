"""Which diffusers pipeline classes are flow-matching ones: computed from the installed diffusers, so the coverage
matrix (``tests/matrix/``) is measured against a list, not a hand count.

A pipeline class counts when the annotation of its ``scheduler`` argument names

1. a flow scheduler: diffusers' ``FlowMatch*`` and ``FlowMap*`` schedulers and the rectified-flow ``*RFScheduler``
   (alone or in a union, e.g. Bria's ``FlowMatchEulerDiscreteScheduler | KarrasDiffusionSchedulers``); or
2. only multistep solvers with a flow mode (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``), and its
   transformer class is also driven by a pipeline of rule 1, so its checkpoints are flow models configured with flow
   sigmas (Sana, Sana Sprint, Sana Video, Cosmos 2.5).

Rule 2 misses flow models whose transformer no rule-1 pipeline uses and that declare only a solver (SkyReels-V2,
Wan-Animate, Cosmos3 Omni: UniPC with flow sigmas in their checkpoints): from the code alone they cannot be told
from an epsilon model declaring the same solver (PixArt-alpha).
"""

from __future__ import annotations

import inspect
import re
from functools import cache

import diffusers
from diffusers import DiffusionPipeline

FLOW_SOLVERS = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"})
"""Multistep solvers that also run flow models (``use_flow_sigmas``, ``prediction_type="flow_prediction"``)."""


def _annotation_names(annotation: object) -> set[str]:
    """The class names an annotation mentions (a class, a union, or a string under ``from __future__``)."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return {name.rsplit(".", 1)[-1] for name in re.findall(r"[\w.]+", text)}


def _is_flow_scheduler(name: str) -> bool:
    return name.startswith(("FlowMatch", "FlowMap")) or name.endswith("RFScheduler")


@cache
def flow_pipeline_classes() -> frozenset[str]:
    """The names of every pipeline class exported by the installed diffusers that is a flow-matching one (above)."""
    schedulers: dict[str, set[str]] = {}
    transformers: dict[str, set[str]] = {}
    for name in dir(diffusers):
        try:
            cls = getattr(diffusers, name)
        except (ImportError, AttributeError):  # an optional dependency is missing
            continue
        if not (inspect.isclass(cls) and issubclass(cls, DiffusionPipeline)) or cls is DiffusionPipeline:
            continue
        parameters = inspect.signature(cls.__init__).parameters
        if "scheduler" not in parameters:
            continue
        schedulers[name] = {n for n in _annotation_names(parameters["scheduler"].annotation) if "Scheduler" in n}
        transformers[name] = {
            n
            for key, parameter in parameters.items()
            if key.startswith("transformer")
            for n in _annotation_names(parameter.annotation)
            if hasattr(diffusers, n)
        }
    flow = {name for name, names in schedulers.items() if any(map(_is_flow_scheduler, names))}
    flow_transformers = set().union(*(transformers[name] for name in flow))
    solvers = {name for name, names in schedulers.items() if names and names <= FLOW_SOLVERS}
    return frozenset(flow | {name for name in solvers if transformers[name] & flow_transformers})
