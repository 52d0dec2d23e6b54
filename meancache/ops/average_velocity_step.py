r"""The average-velocity step: the one place MeanCache's update math lives.

Given the current latent ``z`` at noise level ``sigma``, the velocity the previous step used ``v_last``,
and an anchor step ``r`` (its latent ``z_anchor``, velocity ``v_anchor`` and level ``sigma_anchor``):

.. math::

    \bar u = \frac{z - z_r}{\sigma - \sigma_r}, \qquad
    \widehat{JVP} = \frac{\bar u - v_r}{\sigma - \sigma_r}, \qquad
    \hat u = v_{last} + (\sigma_{next} - \sigma)\,\widehat{JVP}, \qquad
    z_{next} = z + (\sigma_{next} - \sigma)\,\hat u

One dispatcher op, ``torch.ops.meancache.average_velocity_step``, with a fused implementation per device:
C++ for CPU (``csrc/``, built by ``pip install``), Triton for CUDA (``kernels/``, registered below), and a
shape-only Meta one for ``torch.compile``. Devices without one use :func:`average_velocity_step_reference`.

Inputs share one shape, device and floating dtype; the math runs in float32 (float64 for float64 inputs)
and both outputs have the inputs' dtype. Each sigma is a Python float, a 0-d tensor, or a tensor of one
value per sample (along dim 0), so a batch can be at different noise levels; sigma tensors are read on
the host (a CUDA one costs a synchronisation).

Differentiable in the four tensors (sigmas are constants): the map is linear in them, so the forward-mode
derivative is the same op applied to the tangents (at every nesting level), and the backward pass is
``g_u' = g_u + h g_z``, ``dz = g_z + (h/d^2) g_u'``, ``dz_anchor = -(h/d^2) g_u'``,
``dv_anchor = -(h/d) g_u'``, ``dv_last = g_u'`` with ``d = sigma - sigma_anchor`` and ``h = sigma_next - sigma``
(differentiable PyTorch, so double backward is exact: zero). The dispatcher op carries the same backward
rule and a ``vmap`` rule (the mapped dimension folded into dim 0, per-sample sigmas repeated); ``out=`` is
refused under autograd and ``torch.func`` transforms. The modes and their errors are tabled in
``docs/autograd_modes.md``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy
import torch
from torch.autograd import forward_ad

from meancache.ops._checks import check_floating_group, check_no_overlap
from meancache.ops._extension import cpp_ops

SigmaLike = float | torch.Tensor
_IN_PLACE = frozenset(
    {("z_next", name) for name in ("z", "v_last", "z_anchor", "v_anchor")}
    | {("u_hat", name) for name in ("v_last", "z_anchor", "v_anchor")}
)
"""``(output, input)`` pairs the kernels may write in place (every element is read before it is written)."""


def average_velocity_step(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: SigmaLike,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(z_next, u_hat)``; see the module docstring for the equations.

    ``out=(z_next, u_hat)``: contiguous tensors of ``z``'s shape, dtype and device to write into and return
    (no new memory, so no first-touch page zeroing; not differentiable). They must not share memory with each
    other or with the inputs, except in place over exactly the same elements: ``z_next`` over any input,
    ``u_hat`` over ``v_last``, ``z_anchor`` or ``v_anchor`` (not ``z``, which the kernel reads again after
    writing ``u_hat``).

    The C++ CPU kernel enforces every one of these rules itself, so on CPU the call goes straight to it and
    the Python checks run only after a failure, to raise the precise error; every other path checks first."""
    tensors = (z, v_last, z_anchor, v_anchor)
    if out is not None:
        _check_out_call(tensors, out)
    if not _checks_itself(z):
        _check_arguments(tensors, out)
    try:
        tables = _sigma_tables(z, sigma_anchor, sigma, sigma_next)
        if out is not None:
            return _fused(*tensors, *tables, out=out)
        if _needs_autograd(tensors):
            if torch.compiler.is_compiling():  # Dynamo cannot trace a custom jvp rule; the op has the backward
                return _fused(*tensors, *tables)
            return AverageVelocityStep.apply(*tensors, *tables)
        return _fused(*tensors, *tables)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        _check_arguments(tensors, out)
        raise


def average_velocity_step_reference(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: SigmaLike,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The equations of the module docstring, term by term, in PyTorch."""
    _check_tensors(z, v_last, z_anchor, v_anchor)
    return _reference(z, v_last, z_anchor, v_anchor, *_sigma_tables(z, sigma_anchor, sigma, sigma_next))


class AverageVelocityStep(torch.autograd.Function):
    """Autograd rules of the fused op; sigmas arrive as 1-D float64 CPU tables (see :func:`_sigma_tables`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: torch.Tensor,
        v_last: torch.Tensor,
        z_anchor: torch.Tensor,
        v_anchor: torch.Tensor,
        sigma_anchor: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _fused(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        z = inputs[0]
        ctx.sigmas = inputs[4:]
        ctx.like = (z.shape, z.dtype, z.device)
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx: Any, grad_z_next: torch.Tensor, grad_u_hat: torch.Tensor) -> tuple[Any, ...]:
        dtype = grad_z_next.dtype  # the math in float32 (float64 for float64), as in the forward
        grad_z_next, grad_u_hat = (g.to(_math_dtype(dtype)) for g in (grad_z_next, grad_u_hat))
        sigma_anchor, sigma, sigma_next = (_broadcastable(t, grad_z_next) for t in ctx.sigmas)
        d, h = sigma - sigma_anchor, sigma_next - sigma
        grad_u = grad_u_hat + h * grad_z_next
        grad_z = grad_z_next + (h / (d * d)) * grad_u
        grad_z_anchor = -(h / (d * d)) * grad_u
        grad_v_anchor = -(h / d) * grad_u
        return *(g.to(dtype) for g in (grad_z, grad_u, grad_z_anchor, grad_v_anchor)), None, None, None

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.like
        tensor_tangents = [t if t is not None else torch.zeros(shape, dtype=dtype, device=device) for t in tangents[:4]]
        return AverageVelocityStep.apply(*tensor_tangents, *ctx.sigmas)


def _fused(
    *args: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel for the inputs' device (into ``out`` if given), else the PyTorch reference."""
    ops = torch.ops.meancache
    fused = args[0].device.type in _FUSED_DEVICES  # empty without the C++ extension
    if out is None:
        return ops.average_velocity_step(*args) if fused else _reference(*args)
    if fused:
        ops.average_velocity_step.out(*args, z_next=out[0], u_hat=out[1])
    else:
        for target, value in zip(out, _reference(*args), strict=True):
            target.copy_(value)
    return out


def _reference(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    sigma_anchor: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = z.dtype
    z, v_last, z_anchor, v_anchor = (t.to(_math_dtype(dtype)) for t in (z, v_last, z_anchor, v_anchor))
    sigma_anchor, sigma, sigma_next = (_broadcastable(t, z) for t in (sigma_anchor, sigma, sigma_next))
    ubar = (z - z_anchor) / (sigma - sigma_anchor)
    jvp = (ubar - v_anchor) / (sigma - sigma_anchor)
    u_hat = v_last + (sigma_next - sigma) * jvp
    z_next = z + (sigma_next - sigma) * u_hat
    return z_next.to(dtype), u_hat.to(dtype)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _broadcastable(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A sigma table shaped to broadcast against ``like`` per sample, in its dtype and on its device."""
    shape = (table.numel(),) + (1,) * (like.dim() - 1) if table.numel() > 1 else ()
    return table.reshape(shape).to(device=like.device, dtype=like.dtype)


def _checks_itself(z: torch.Tensor) -> bool:
    """Whether the call lands in the C++ CPU kernel, which checks all its arguments."""
    return type(z) is torch.Tensor and z.device.type == "cpu" and "cpu" in _FUSED_DEVICES


def _needs_autograd(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a derivative may be taken through this call: a tensor requires grad, a forward-mode dual level
    is open, a ``torch.func`` transform is active, or Dynamo is tracing (it decides that itself)."""
    return (
        (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        or forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
        or torch.compiler.is_compiling()
    )


def _check_arguments(tensors: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Raise a precise error for the first rule the tensors break (see :func:`average_velocity_step`); the
    kernel enforces the same rules."""
    _check_tensors(*tensors)
    if out is None:
        return
    _check_out(tensors[0], out)
    check_no_overlap(
        {"z_next": out[0], "u_hat": out[1]}, dict(zip(("z", "v_last", "z_anchor", "v_anchor"), tensors, strict=True)),
        _IN_PLACE,
    )  # fmt: skip


def _check_tensors(z: torch.Tensor, v_last: torch.Tensor, z_anchor: torch.Tensor, v_anchor: torch.Tensor) -> None:
    named = {"z": z, "v_last": v_last, "z_anchor": z_anchor, "v_anchor": v_anchor}
    check_floating_group(named)
    for name, t in named.items():
        if t.shape != z.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but z has shape {tuple(z.shape)}; all must match")


def _check_out_call(tensors: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The rules of ``out=`` no kernel sees: two tensors in a tuple, and no autograd."""
    if not (type(out) is tuple and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(f"out must be a tuple of two tensors (z_next, u_hat), got {type(out).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("average_velocity_step(out=...) is not differentiable; call it without out= under autograd")
    if forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "average_velocity_step(out=...) does not support forward-mode AD or torch.func transforms (jvp, grad, "
            "vmap); call it without out="
        )


def _check_out(z: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    for name, t in zip(("z_next", "u_hat"), out, strict=True):
        if t.shape != z.shape or t.dtype != z.dtype or t.device != z.device:
            raise ValueError(
                f"out {name} must match z (shape {tuple(z.shape)}, {z.dtype}, {z.device}), got shape "
                f"{tuple(t.shape)}, {t.dtype}, {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"out {name} must be contiguous")


def _sigma_tables(z: torch.Tensor, *sigmas: SigmaLike) -> tuple[torch.Tensor, ...]:
    """The three sigmas as 1-D float64 CPU tensors of one common length: 1, or the batch size.

    Python floats are validated as floats, so this traces under ``torch.compile(fullgraph=True)``; sigma
    tensors are read on the host."""
    if all(type(value) is float for value in sigmas):  # the common case, fast
        # Dynamo traces the function itself (it cannot guard on a cache: it would warn of silent incorrectness)
        tables = (_float_tables.__wrapped__ if torch.compiler.is_compiling() else _float_tables)(*sigmas)
        if tables is not None:
            return tables
    names = ("sigma_anchor", "sigma", "sigma_next")
    batch = z.shape[0] if z.dim() else 1
    values: list[list[float]] = []
    for name, value in zip(names, sigmas, strict=True):
        if type(value) is float:  # the common case first: an ABC isinstance check costs a microsecond
            values.append([value])
        elif isinstance(value, torch.Tensor):
            if value.requires_grad:
                raise ValueError(f"{name} requires grad, but sigmas are constants of the step (not differentiated)")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
            if value.dim() > 1 or value.numel() not in (1, batch):
                raise ValueError(
                    f"{name} must be a float, a 0-d tensor or a 1-D tensor of one value per sample "
                    f"({batch} for z of shape {tuple(z.shape)}), got shape {tuple(value.shape)}"
                )
            values.append(value.detach().reshape(-1).to(device="cpu", dtype=torch.float64).tolist())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # Python and numpy scalars
            values.append([float(value)])
        else:
            raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
        bad = [v for v in values[-1] if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{name} must be finite, got {bad[0]!r}")
    length = batch if any(len(v) != 1 for v in values) else 1
    if length == 0:  # an empty batch: no element reads a sigma, but the kernels need one value per table
        return tuple(torch.tensor([value], dtype=torch.float64) for value in (0.0, 1.0, 2.0))
    values = [v * length if len(v) == 1 else v for v in values]
    for sample, (anchor, current) in enumerate(zip(values[0], values[1], strict=True)):
        if anchor == current:
            raise ValueError(
                f"sigma ({current!r}) must differ from sigma_anchor: the average velocity divides by their "
                f"difference (sample {sample})"
            )
    return torch.tensor(values, dtype=torch.float64).unbind(0)


@functools.lru_cache(maxsize=1024)
def _float_tables(sigma_anchor: float, sigma: float, sigma_next: float) -> tuple[torch.Tensor, ...] | None:
    """:func:`_sigma_tables` for three valid Python floats (else ``None``), remembered: a sampler reuses a few
    dozen triples, and the tables are never written to."""
    if all(math.isfinite(value) for value in (sigma_anchor, sigma, sigma_next)) and sigma_anchor != sigma:
        return tuple(torch.from_numpy(numpy.array([value])) for value in (sigma_anchor, sigma, sigma_next))
    return None


def _vmap_rule(
    info: Any, in_dims: tuple[int | None, ...], *args: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
    """The op over a mapped dimension: moved to the front, and folded into dim 0 when the sigmas are per sample
    (each sample's sigmas repeated for every mapped entry)."""
    if any(dim is not None for dim in in_dims[4:]):
        raise ValueError("vmap over average_velocity_step's sigmas is not supported; map over the tensors only")
    size = info.batch_size
    tensors = [
        t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
        for t, d in zip(args[:4], in_dims[:4], strict=True)
    ]
    tables = args[4:]
    if tables[0].numel() == 1:
        return torch.ops.meancache.average_velocity_step(*tensors, *tables), (0, 0)
    flat = [t.flatten(0, 1) for t in tensors]
    outputs = torch.ops.meancache.average_velocity_step(*flat, *(t.repeat(size) for t in tables))
    return tuple(t.unflatten(0, (size, -1)) for t in outputs), (0, 0)


def _register() -> tuple[str, ...]:
    """Register the op's autograd and vmap rules, and the Triton kernel as its CUDA implementation; the devices
    with a fused kernel."""
    if cpp_ops() is None:
        return ()
    torch.library.register_autograd(
        "meancache::average_velocity_step",
        AverageVelocityStep.backward,
        setup_context=AverageVelocityStep.setup_context,
    )
    torch.library.register_vmap("meancache::average_velocity_step", _vmap_rule)
    try:
        from meancache.kernels.average_velocity_step import average_velocity_step_triton
    except ImportError:  # no Triton on this platform
        return ("cpu",)

    def launch(*args: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next = args
        d, h = (sigma - sigma_anchor).tolist(), (sigma_next - sigma).tolist()
        return average_velocity_step_triton(z, v_last, z_anchor, v_anchor, d, h, out=out)

    torch.library.impl("meancache::average_velocity_step", "cuda")(lambda *args: launch(*args))
    torch.library.impl("meancache::average_velocity_step.out", "cuda")(
        lambda *args, z_next, u_hat: launch(*args, out=(z_next, u_hat))
    )
    return ("cpu", "cuda")


_FUSED_DEVICES = _register()
