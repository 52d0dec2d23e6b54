"""One decision for every rank of a ``torch.distributed`` job (context parallelism runs one pipeline per rank)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def decide_on_rank_zero(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0 of the default process group, sent to every rank with ``broadcast_object_list``;
    just ``decide()`` when ``torch.distributed`` is not initialised or has one rank. An exception raised on
    rank 0 is raised on every rank (no rank is left waiting)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, decide())
        except Exception as e:  # sent to the other ranks, then raised here too
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    succeeded, value = box[0]  # type: ignore[misc]
    if not succeeded:
        raise value
    return value
