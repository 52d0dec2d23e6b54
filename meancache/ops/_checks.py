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


def check_no_overlap(
    outputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], in_place: frozenset[tuple[str, str]]
) -> None:
    """No output shares memory with another output or with an input, except an ``(output, input)`` pair listed
    in ``in_place`` that is exactly the same elements (same address, shape and strides): the in-place writes
    the kernel supports. Overlaps are judged by address ranges, so interleaved views count as overlapping.
    All tensors are on one device (checked before)."""
    tensors = {**inputs, **outputs}
    ranges = {name: _byte_range(t) for name, t in tensors.items() if t.numel()}
    names = list(outputs)
    for index, out_name in enumerate(names):
        if out_name not in ranges:
            continue
        start, end = ranges[out_name]
        for name in (*names[index + 1 :], *inputs):
            other = ranges.get(name)
            if other is None or not (start < other[1] and other[0] < end):
                continue
            if (out_name, name) in in_place and _same_elements(outputs[out_name], tensors[name]):
                continue
            kind = "output" if name in outputs else "input"
            raise ValueError(
                f"out {out_name} shares memory with the {kind} {name}; the kernel would read values it already "
                f"overwrote. Give outputs their own memory (allowed in place: {_describe(in_place, out_name)})"
            )


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses a non-empty tensor touches."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent + 1) * t.element_size()


def _same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _describe(in_place: frozenset[tuple[str, str]], output: str) -> str:
    names = sorted(name for out, name in in_place if out == output)
    return f"{output} over exactly {' or '.join(names)}" if names else f"nothing for {output}"
