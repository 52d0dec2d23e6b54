r"""Attention whose forward-mode derivative costs one fused pass: ``jvp_attention`` and ``attention``.

With ``S = c Q K^T`` (``c`` the scale, ``1/sqrt(D)`` by default), ``P = softmax(S)`` over keys allowed by
the mask, and ``O = P V``, the tangent of ``O`` along ``(\dot Q, \dot K, \dot V)`` is

.. math::

    \dot S = c(\dot Q K^T + Q \dot K^T), \qquad
    \dot O = (P \odot \dot S) V + P \dot V - \operatorname{rowsum}(P \odot \dot S) \odot O

Both come out of one streaming pass that never holds an ``Sq x Sk`` matrix for all rows: PyTorch's fused
SDPA kernels have no forward-AD rule, and its math backend materialises ``S, P, dS, dP`` per layer.

One dispatcher op, ``torch.ops.meancache.jvp_attention(q, k, v, q_t, k_t, v_t, mask, scale) -> (o, o_t,
lse)`` (tangents optional; ``lse`` is the row log-sum-exp in float32, float64 for float64 inputs), with the
Triton kernel of ``kernels/jvp_attention.py`` for CUDA (bfloat16 and float16, head dim <= 128) and, on
every other device, dtype and head dim, a chunked PyTorch evaluation of the same equations: query rows in chunks
sized so each temporary holds about ``CHUNK_ELEMENTS`` scores, math in float32 (float64 for float64
inputs).

Layout ``(batch, heads, seq, head_dim)`` as in ``scaled_dot_product_attention``; query and key lengths may
differ; the mask is boolean (True = attend), ``(B, Sk)`` key padding or anything broadcastable to
``(B, H, Sq, Sk)``; rows with no allowed key give 0 (like PyTorch's math backend), so do all rows when there
are no keys (``Sk = 0``), and head dim 0 gives empty outputs, as SDPA does.

Autograd: ``o`` has an ordinary backward (chunked recomputation from the saved row log-sum-exp, the same
``O(Sq x chunk)`` memory). The tangent output is not differentiable (MeanFlow/sCM targets are
stop-gradient): when a tangent input requires grad, a backward through ``o_t`` raises instead of silently
giving zero gradient.
``vmap`` and nested forward AD are not supported.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.autograd import forward_ad as fwAD
from torch.autograd.function import once_differentiable

from meancache.ops._checks import check_floating_group

CHUNK_ELEMENTS = 1 << 21
"""Scores per temporary in the chunked PyTorch path (8 MB in float32)."""


def jvp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(o, o_t)``: the attention output and its tangent along ``(q_t, k_t, v_t)``, in one pass.

    ``o`` is differentiable in ``q, k, v``; ``o_t`` is not (see the module docstring)."""
    mask, scale = _check(q, k, v, (q_t, k_t, v_t), attn_mask, scale)
    o, o_t, _ = _JVPAttention.apply(q, k, v, q_t, k_t, v_t, mask, scale)
    return o, _refuse_grad_through(o_t, (q_t, k_t, v_t))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Drop-in ``scaled_dot_product_attention`` (no dropout, no causal flag) that works under
    ``torch.func.jvp`` and ``torch.autograd.forward_ad`` (output and tangent from one fused pass) and
    under ordinary backward."""
    tangents = tuple(fwAD.unpack_dual(t).tangent for t in (q, k, v))
    if all(t is None for t in tangents):
        mask, scale = _check(q, k, v, None, attn_mask, scale)
        return _JVPAttention.apply(q, k, v, None, None, None, mask, scale)[0]
    tangents = tuple(torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents, strict=True))
    mask, scale = _check(q, k, v, tangents, attn_mask, scale)
    return _JVPAttention.apply(q, k, v, *tangents, mask, scale)[0]


class _JVPAttention(torch.autograd.Function):
    """Forward computes ``(o, o_t, lse)`` with the fused op; ``jvp`` hands back the precomputed ``o_t``.

    The public functions pass the tangents in as plain inputs (unpacked before ``apply``), so forward, which
    always sees plain tensors, can run the kernel on them: ``jvp`` itself receives functorch wrappers under
    ``torch.func.jvp``, where no kernel could be launched."""

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_t: torch.Tensor | None,
        k_t: torch.Tensor | None,
        v_t: torch.Tensor | None,
        mask: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.meancache.jvp_attention(q, k, v, q_t, k_t, v_t, mask, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, q_t, _, _, mask, scale = inputs
        o, o_t, lse = output
        ctx.mark_non_differentiable(o_t, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(o_t)
        ctx.has_tangent = q_t is not None
        ctx.mask, ctx.scale = mask, scale

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[torch.Tensor, None, None]:
        if not ctx.has_tangent:
            raise RuntimeError(
                "meancache attention was reached by forward-mode AD without its tangents; call it through "
                "meancache.ops.attention / jvp_attention (nested forward AD is not supported)"
            )
        (o_t,) = ctx.saved_tensors
        return _refuse_grad_through(o_t, tangents[:3]), None, None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_o: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _chunked_backward(q, k, v, o, lse, grad_o.contiguous(), ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


class _TangentGradUnsupported(torch.autograd.Function):
    """Identity on the tangent output whose backward raises: a loss through ``o_t`` must not silently get
    zero gradient for the tangent inputs (second-order terms are not implemented)."""

    @staticmethod
    def forward(o_t: torch.Tensor, *tangents: torch.Tensor) -> torch.Tensor:
        return o_t.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *_: Any) -> Any:
        raise NotImplementedError(
            "gradients through the tangent of meancache attention are not supported; detach the tangent output "
            "(MeanFlow/sCM targets are stop-gradient)"
        )


def _refuse_grad_through(o_t: torch.Tensor, tangents: tuple[Any, ...]) -> torch.Tensor:
    """``o_t``, made to raise on backward when any tangent input carries a gradient."""
    needs_grad = [t for t in tangents if isinstance(t, torch.Tensor) and t.requires_grad]
    if needs_grad and torch.is_grad_enabled():
        return _TangentGradUnsupported.apply(o_t, *needs_grad)
    return o_t


@torch.library.custom_op("meancache::jvp_attention", mutates_args=())
def _jvp_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor | None,
    k_t: torch.Tensor | None,
    v_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, o_t, lse)``; without tangents ``o_t`` is an empty tensor. The chunked PyTorch implementation."""
    o, o_t, lse = _chunked(q, k, v, q_t, k_t, v_t, mask, scale)
    return o, o_t if o_t is not None else q.new_empty(0), lse


@_jvp_attention_op.register_fake
def _(q, k, v, q_t, k_t, v_t, mask, scale):
    o_t = torch.empty_like(q) if q_t is not None else q.new_empty(0)
    return torch.empty_like(q), o_t, q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _register_triton_for_cuda() -> None:
    try:
        from meancache.kernels.jvp_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, jvp_attention_triton
    except ImportError:  # no Triton on this platform: the chunked path serves every device
        return

    @_jvp_attention_op.register_kernel("cuda")
    def _(q, k, v, q_t, k_t, v_t, mask, scale):
        if q.dtype not in SUPPORTED_DTYPES or not 0 < q.shape[-1] <= MAX_HEAD_DIM or k.shape[2] == 0:
            o, o_t, lse = _chunked(q, k, v, q_t, k_t, v_t, mask, scale)
        else:
            o, o_t, lse = jvp_attention_triton(q, k, v, q_t, k_t, v_t, mask, scale)
        return o, o_t if o_t is not None else q.new_empty(0), lse


_register_triton_for_cuda()


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The row log-sum-exp is kept in the math dtype (float32, float64 for float64 inputs)."""
    return _math_dtype(dtype)


def _row_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    batch, heads, _, _ = q.shape
    return max(1, CHUNK_ELEMENTS // max(1, batch * heads * k.shape[2]))


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor | None,
    k_t: torch.Tensor | None,
    v_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The module docstring's equations over chunks of query rows (all keys per chunk)."""
    dtype, math_dtype = q.dtype, _math_dtype(q.dtype)
    k_m, v_m = k.to(math_dtype), v.to(math_dtype)
    k_mt = k_m.transpose(-1, -2)
    has_tangent = q_t is not None
    if has_tangent:
        k_tt, v_tm = k_t.to(math_dtype).transpose(-1, -2), v_t.to(math_dtype)
    if k.shape[2] == 0:  # no keys: every row is fully masked, which gives 0 (as SDPA does), lse = -inf
        o = torch.zeros(q.shape, dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_lse_dtype(dtype), device=q.device)
        return o, torch.zeros_like(o) if has_tangent else None, lse
    o = torch.empty(q.shape, dtype=dtype, device=q.device)
    o_t = torch.empty_like(o) if has_tangent else None
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(dtype), device=q.device)
    rows = _row_chunk(q, k)
    for start in range(0, q.shape[2], rows):
        chunk = slice(start, start + rows)
        q_c = q[:, :, chunk].to(math_dtype)
        s = (q_c @ k_mt) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, :, chunk], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)  # noqa: E741 (the normaliser's usual name)
        inv_l = torch.where(l > 0, 1 / l, torch.zeros_like(l))
        o_c = (p @ v_m) * inv_l
        o[:, :, chunk] = o_c.to(dtype)
        lse[:, :, chunk] = (m + torch.log(l)).squeeze(-1)
        if has_tangent:
            s_t = (q_t[:, :, chunk].to(math_dtype) @ k_mt + q_c @ k_tt) * scale
            p_st = p * s_t
            mu = p_st.sum(-1, keepdim=True) * inv_l
            o_t[:, :, chunk] = ((p_st @ v_m + p @ v_tm) * inv_l - mu * o_c).to(dtype)
    return o, o_t, lse


def _chunked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    grad_o: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients from recomputed probabilities ``P = exp(S - lse)``, chunk by chunk:
    ``dV = P^T dO``, ``dS = P (dO V^T - rowsum(dO O))``, ``dQ = c dS K``, ``dK = c dS^T Q``."""
    dtype, math_dtype = q.dtype, _math_dtype(q.dtype)
    k_m, v_m = k.to(math_dtype), v.to(math_dtype)
    delta = (grad_o.to(math_dtype) * o.to(math_dtype)).sum(-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(math_dtype).unsqueeze(-1)
    dq_chunks = []
    dk = torch.zeros_like(k_m)
    dv = torch.zeros_like(v_m)
    rows = _row_chunk(q, k)
    for start in range(0, q.shape[2], rows):
        chunk = slice(start, start + rows)
        q_c, do_c = q[:, :, chunk].to(math_dtype), grad_o[:, :, chunk].to(math_dtype)
        s = (q_c @ k_m.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, :, chunk], float("-inf"))
        p = torch.exp(s - lse[:, :, chunk])
        dv = dv + p.transpose(-1, -2) @ do_c
        d_s = p * (do_c @ v_m.transpose(-1, -2) - delta[:, :, chunk])
        dq_chunks.append((d_s @ k_m) * scale)
        dk = dk + (d_s.transpose(-1, -2) @ q_c) * scale
    return torch.cat(dq_chunks, dim=2).to(dtype), dk.to(dtype), dv.to(dtype)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tangents: tuple[torch.Tensor, ...] | None,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor | None, float]:
    """Validate the inputs; return the mask expanded to ``(B, H, Sq, Sk)`` (a view) and the scale."""
    named = {"q": q, "k": k, "v": v}
    if tangents is not None:
        named |= dict(zip(("q_t", "k_t", "v_t"), tangents, strict=True))
    check_floating_group(named)
    for name, t in named.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    (batch, heads, seq_q, head_dim), seq_k = q.shape, k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[:2] != (batch, heads):
            raise ValueError(
                f"{name} has batch x heads {tuple(t.shape[:2])} but q has {(batch, heads)}; they must match "
                "(grouped-query attention is not supported)"
            )
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has {head_dim}; they must match")
    if v.shape[2] != seq_k:
        raise ValueError(f"k has {seq_k} keys but v has {v.shape[2]} values; they must match")
    if tangents is not None:
        for name, t, primal in zip(("q_t", "k_t", "v_t"), tangents, (q, k, v), strict=True):
            if t.shape != primal.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but must match {tuple(primal.shape)}")
    if scale is None:  # with head_dim 0 the scores are all 0 whatever the scale (and the outputs empty)
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(head_dim)), got {scale!r}")
    return _expand_mask(attn_mask, batch, heads, seq_q, seq_k, q.device), float(scale)


def _expand_mask(
    mask: torch.Tensor | None, batch: int, heads: int, seq_q: int, seq_k: int, device: torch.device
) -> torch.Tensor | None:
    if mask is None:
        return None
    target = (batch, heads, seq_q, seq_k)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"attn_mask must be a boolean tensor (True = attend), got {kind}; additive masks are not supported"
        )
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {device}")
    if mask.dim() == 2 and mask.shape == (batch, seq_k):  # key padding, as diffusers passes it
        mask = mask[:, None, None, :]
    if mask.dim() == 4:
        try:
            return mask.expand(target)
        except RuntimeError:
            pass
    raise ValueError(
        f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, Sq, Sk) = {target}; "
        f"give a (batch, Sk) key-padding mask or a 4-D mask broadcastable to it"
    )
