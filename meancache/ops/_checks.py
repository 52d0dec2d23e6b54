"""Input checks shared by the ops: clear errors naming the bad argument and what is allowed."""

from __future__ import annotations

import torch


def check_floating_group(named: dict[str, torch.Tensor]) -> None:
    """Every value is a floating tensor with the first one's dtype and device."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all must be on one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; all must share one dtype")
