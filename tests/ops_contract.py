"""The autograd contract suite's shared parts, modelled on PyTorch's OpInfo tests: each autograd mode is a
transform ``mode(fn, inputs, directions)`` applied alike to an op and to its PyTorch reference, and a table
of modes per op (supported: exact against the reference; refused: the error it raises) that
``docs/autograd_modes.md`` must reproduce."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils._pytree import tree_leaves, tree_map

from tests.tolerance import assert_close_by_own_rounding

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "autograd_modes.md"
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}
DEVICES = ("cpu", "cuda")

Transform = Callable[[Callable[..., Any], Sequence[torch.Tensor], Sequence[torch.Tensor]], Any]


@dataclasses.dataclass(frozen=True)
class Mode:
    """One row of an op's table: ``transform`` applied to the op either matches it applied to the reference
    (``refused`` is empty) or raises ``refused = (error type, message pattern)``."""

    transform: Transform
    description: str
    refused: tuple[type[Exception], str] | tuple[()] = ()
    dtypes: tuple[torch.dtype, ...] = tuple(ATOL)
    reference_transform: Transform | None = None
    """For the reference, when it cannot run ``transform`` itself (PyTorch refuses it) but an equivalent."""


def _leaves(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in inputs]


def _cotangents(outputs: Any) -> Any:
    """Fixed random tensors shaped like the outputs (the same values for the op and the reference)."""
    return tree_map(
        lambda o: torch.randn(o.shape, generator=torch.Generator().manual_seed(o.dim()), dtype=torch.float64).to(
            o.device, o.dtype
        ),
        outputs,
    )


def _dot(outputs: Any) -> torch.Tensor:
    """``sum_i <output_i, cotangent_i>``: a scalar to differentiate."""
    return sum((o * c).sum() for o, c in zip(tree_leaves(outputs), tree_leaves(_cotangents(outputs)), strict=True))


def backward(fn, inputs, directions):
    leaves = _leaves(inputs)
    return torch.autograd.grad(_dot(fn(*leaves)), leaves, materialize_grads=True)


def double_backward(fn, inputs, directions):
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(_dot(fn(*leaves)), leaves, create_graph=True, materialize_grads=True)
    return _grad_or_zeros(_dot(grads), leaves)


def _grad_or_zeros(scalar: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradient of ``scalar``; zeros when it is a constant (a derivative of a linear map)."""
    if not scalar.requires_grad:
        return tuple(torch.zeros_like(x) for x in leaves)
    return torch.autograd.grad(scalar, leaves, materialize_grads=True)


def jvp(fn, inputs, directions):
    return torch.func.jvp(fn, tuple(inputs), tuple(directions))


def jvp_tangents(fn, inputs, directions):
    """The tangents of :func:`jvp` alone, as :func:`dual_level` gives them."""
    return tree_leaves(jvp(fn, inputs, directions)[1])


def dual_level(fn, inputs, directions):
    with fwAD.dual_level():
        outputs = fn(*(fwAD.make_dual(x, d) for x, d in zip(inputs, directions, strict=True)))
        return [_tangent(o) for o in tree_leaves(outputs)]


def jvp_of_jvp(fn, inputs, directions):
    """``torch.func.jvp`` of ``torch.func.jvp``: the inner along ``directions``, the outer along them
    flipped (a second derivative)."""
    inner = lambda *x: torch.func.jvp(fn, x, tuple(directions))[1]  # noqa: E731
    return torch.func.jvp(inner, tuple(inputs), tuple(d.flip(-1) for d in directions))


def jvp_of_vjp(fn, inputs, directions):
    """Forward-over-reverse with ``torch.func``: the tangent of a vector-Jacobian product."""
    vjp = lambda *x: (lambda out, pull: pull(_cotangents(out)))(*torch.func.vjp(fn, *x))  # noqa: E731
    return torch.func.jvp(vjp, tuple(inputs), tuple(directions))


def dual_over_backward(fn, inputs, directions):
    """Forward-over-reverse with a ``fwAD`` dual level and ``torch.autograd.grad``."""
    leaves = _leaves(inputs)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, d) for x, d in zip(leaves, directions, strict=True)]
        grads = torch.autograd.grad(_dot(fn(*duals)), leaves, create_graph=True)
        return [_tangent(g) for g in grads]


def _tangent(dual: torch.Tensor) -> torch.Tensor:
    """A dual tensor's tangent; zeros for a tensor without one (a constant)."""
    tangent = fwAD.unpack_dual(dual).tangent
    return torch.zeros_like(dual) if tangent is None else tangent


def backward_of_dual(fn, inputs, directions):
    """Reverse-over-forward with a ``fwAD`` dual level and ``torch.autograd.grad`` of the tangent."""
    leaves = _leaves(inputs)
    with fwAD.dual_level():
        outputs = fn(*(fwAD.make_dual(x, d) for x, d in zip(leaves, directions, strict=True)))
        tangents = [_tangent(o) for o in tree_leaves(outputs)]
    return _grad_or_zeros(_dot(tangents), leaves)


def vjp_of_jvp(fn, inputs, directions):
    """Reverse-over-forward with ``torch.func``: the gradient of a Jacobian-vector product."""
    tangent = lambda *x: torch.func.jvp(fn, x, tuple(directions))[1]  # noqa: E731
    out, pull = torch.func.vjp(tangent, *inputs)
    return pull(_cotangents(out))


def vmap(fn, inputs, directions):
    """``torch.func.vmap`` over a new leading dimension of the inputs (the directions stacked on them), the
    last input shared."""
    stacked = [torch.stack([x, d]) for x, d in zip(inputs[:-1], directions, strict=False)]
    in_dims = (0,) * len(stacked) + (None,)
    return torch.vmap(fn, in_dims=in_dims)(*stacked, inputs[-1])


def grad(fn, inputs, directions):
    argnums = tuple(range(len(inputs)))
    return torch.func.grad(lambda *x: _dot(fn(*x)), argnums=argnums)(*inputs)


def jacfwd(fn, inputs, directions):
    return torch.func.jacfwd(fn, argnums=tuple(range(len(inputs))))(*inputs)


def jacrev(fn, inputs, directions):
    return torch.func.jacrev(fn, argnums=tuple(range(len(inputs))))(*inputs)


def compiled(fn, inputs, directions):
    """``torch.compile(fullgraph=True)`` of a function calling the op: its outputs and their backward."""
    torch._dynamo.reset()
    leaves = _leaves(inputs)
    outputs = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    return outputs, torch.autograd.grad(_dot(outputs), leaves, materialize_grads=True)


def check_mode(
    mode: Mode,
    ours: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> float | None:
    """A supported mode: ``mode`` of ``ours`` in ``dtype`` passes :func:`judge` against the same transform of
    ``reference`` (the largest error is returned); a refused one raises the documented error (``None``).
    Inputs and directions are float64."""

    def run(transform: Transform, fn: Callable[..., Any], dtype: torch.dtype) -> Any:
        return transform(fn, [t.to(dtype) for t in inputs], [t.to(dtype) for t in directions])

    if mode.refused:
        error, message = mode.refused
        with pytest.raises(error, match=message):
            run(mode.transform, ours, dtype)
        return None
    reference_transform = mode.reference_transform or mode.transform
    return judge(run(mode.transform, ours, dtype), lambda d: run(reference_transform, reference, d), dtype)


def judge(ours: Any, reference: Callable[[torch.dtype], Any], dtype: torch.dtype) -> float:
    """Every leaf of ``ours`` (computed in ``dtype``) within flash-attention's rule of ``reference(float64)``:
    twice the error of ``reference(dtype)`` plus ``ATOL[dtype]``. Returns the largest error."""
    exact = tree_leaves(reference(torch.float64))
    lowp = exact if dtype == torch.float64 else tree_leaves(reference(dtype))
    leaves = tree_leaves(ours)
    assert len(leaves) == len(exact) > 0
    worst = 0.0
    for out, ref, low in zip(leaves, exact, lowp, strict=True):
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert_close_by_own_rounding(out, low, ref, atol=ATOL[dtype])
        worst = max(worst, (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0)
    return worst


def table(op: str, modes: dict[str, Mode]) -> str:
    """The markdown table of ``op``'s modes, as ``docs/autograd_modes.md`` holds it."""
    rows = [f"<!-- modes: {op} -->", "| Mode | Status | Checked against / error raised |", "|---|---|---|"]
    for name, mode in modes.items():
        if mode.refused:
            error, message = mode.refused
            rows.append(f"| {name} | refused | `{error.__name__}`: {mode.description} (matches `{message}`) |")
        else:
            dtypes = ", ".join(str(d).removeprefix("torch.") for d in mode.dtypes)
            rows.append(f"| {name} | supported | {mode.description} ({dtypes}) |")
    rows.append(f"<!-- /modes: {op} -->")
    return "\n".join(rows)


def documented_table(op: str) -> str:
    text = DOCS.read_text()
    start, end = f"<!-- modes: {op} -->", f"<!-- /modes: {op} -->"
    assert start in text and end in text, f"{DOCS.name} has no table for {op}"
    return text[text.index(start) : text.index(end) + len(end)]
