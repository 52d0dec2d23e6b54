r"""Attention whose forward-mode derivative costs one fused pass: ``jvp_attention`` and ``attention``.

With ``S = c Q K^T`` (``c`` the scale, ``1/sqrt(D)`` by default), ``P = softmax(S)`` over keys allowed by
the mask, and ``O = P V``, the tangent of ``O`` along ``a = (\dot Q, \dot K, \dot V)`` is

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

Autograd (the modes and their errors are tabled in ``docs/autograd_modes.md``):

* backward of ``o`` (and of ``lse``): chunked recomputation from the saved row log-sum-exp, written in
  differentiable PyTorch, so double backward and forward-over-reverse are exact too;
* forward AD: :func:`attention` hands the current level's tangents to the fused pass and attaches ``o_t`` as
  ``o``'s tangent at that level (``fwAD.make_dual``). Tangents at any other level (``torch.func.jvp`` of
  ``torch.func.jvp``, a dual tensor given to :func:`jvp_attention`) reach the op's ``jvp`` rule, which
  differentiates ``(o, o_t, lse)`` along them in chunked PyTorch: ``\dot O`` above, ``\dot{lse} =
  \operatorname{rowsum}(P \odot \dot S)`` and, for ``o_t`` (taken along ``a``) moved along ``b`` while its
  tangent inputs move along ``e``, the second-order term

  .. math::

      \dot S_2 = c(\dot Q_a \dot K_b^T + \dot Q_b \dot K_a^T + \dot Q_e K^T + Q \dot K_e^T), \quad
      \dot P_x = P \odot (\dot S_x - \operatorname{rowsum}(P \odot \dot S_x)), \\
      \dot P_2 = \dot P_b \odot (\dot S_a - \operatorname{rowsum}(P \odot \dot S_a))
          + P \odot (\dot S_2 - \operatorname{rowsum}(\dot P_b \odot \dot S_a + P \odot \dot S_2)), \\
      \dot O_2 = \dot P_2 V + \dot P_a \dot V_b + \dot P_b \dot V_a + P \dot V_e;

* a backward through ``o_t`` is refused (``NotImplementedError``): MeanFlow/sCM targets are stop-gradient;
* ``torch.func.vmap``: the op folds the mapped dimension into the batch dimension.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.autograd import forward_ad as fwAD

from meancache.ops._checks import check_floating_group

CHUNK_ELEMENTS = 1 << 21
"""Scores per temporary in the chunked PyTorch path (8 MB in float32)."""

TANGENT_BACKWARD_REFUSED = (
    "a backward through the tangent output of meancache attention (reverse-over-forward, a second-order "
    "term) is not supported; detach the tangent (MeanFlow/sCM targets are stop-gradient), or differentiate "
    "math-backend scaled_dot_product_attention instead"
)


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

    Both are differentiable in forward mode along any tangents the six inputs carry; ``o`` also in reverse
    mode. A backward through ``o_t`` raises (see the module docstring)."""
    mask, scale = _check(q, k, v, (q_t, k_t, v_t), attn_mask, scale)
    o, o_t, _ = _apply(q, k, v, q_t, k_t, v_t, mask, scale)
    return o, o_t


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Drop-in ``scaled_dot_product_attention`` (no dropout, no causal flag) that works under
    ``torch.func.jvp`` and ``torch.autograd.forward_ad``, nested ones included, and under backward.

    The output and its tangent come from one fused pass, unless grad mode is on and an input requires grad:
    then the op's ``jvp`` rule takes the tangent (chunked PyTorch), so that a backward sees it."""
    primals, tangents = zip(*(fwAD.unpack_dual(t) for t in (q, k, v)), strict=True)
    if all(t is None for t in tangents) or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # Without tangents, or when a backward may follow (its graph must keep the tangents, for
        # forward-over-reverse): the op's own ``jvp`` rule handles this level too, unfused.
        mask, scale = _check(q, k, v, None, attn_mask, scale)
        return _apply(q, k, v, None, None, None, mask, scale)[0]
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents, strict=True))
    o, o_t = jvp_attention(*primals, *tangents, attn_mask=attn_mask, scale=scale)
    return fwAD.make_dual(o, o_t)


def _apply(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`_JVPAttention`, or under ``torch.compile`` the op itself: Dynamo cannot trace a custom ``jvp``
    rule, and the op carries the same backward rule (forward AD through the bare op raises PyTorch's "must
    implement the jvp function")."""
    if torch.compiler.is_compiling():
        return torch.ops.meancache.jvp_attention(*args)
    return _JVPAttention.apply(*args)


class _JVPAttention(torch.autograd.Function):
    """``(o, o_t, lse)`` from the fused op, with the derivative rules of the module docstring.

    ``forward`` always sees plain tensors, so it can launch the kernel; ``jvp`` and ``backward`` are
    written in PyTorch operations, so transforms at lower levels (nested ``torch.func`` calls, ``vmap``)
    see through them."""

    generate_vmap_rule = True

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
        q, k, v, q_t, k_t, v_t, mask, scale = inputs
        o, o_t, lse = output
        ctx.has_tangent = q_t is not None
        if not ctx.has_tangent:
            ctx.mark_non_differentiable(o_t)  # an empty placeholder
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, q_t, k_t, v_t)
        ctx.mask, ctx.scale = mask, scale
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        q, k, v, q_t, k_t, v_t = ctx.saved_tensors
        direction = _or_zeros(tangents[:3], (q, k, v))
        if not ctx.has_tangent:
            o_dot, _, lse_dot = _chunked_jvp(q, k, v, direction, None, None, ctx.mask, ctx.scale)
            return o_dot, None, lse_dot
        moved = _or_zeros(tangents[3:6], (q, k, v))
        return _chunked_jvp(q, k, v, direction, (q_t, k_t, v_t), moved, ctx.mask, ctx.scale)

    @staticmethod
    def backward(
        ctx: Any, grad_o: torch.Tensor | None, grad_o_t: torch.Tensor | None, grad_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if grad_o_t is not None:
            if not torch.compiler.is_compiling():
                raise NotImplementedError(TANGENT_BACKWARD_REFUSED)
            # a compiled graph hands zeros for an unused output: refuse only a nonzero one, when it runs
            torch._assert_async((grad_o_t == 0).all(), TANGENT_BACKWARD_REFUSED)
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _chunked_backward(q, k, v, o, lse, grad_o, grad_lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


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


_jvp_attention_op.register_autograd(_JVPAttention.backward, setup_context=_JVPAttention.setup_context)


@_jvp_attention_op.register_vmap
def _(info, in_dims, q, k, v, q_t, k_t, v_t, mask, scale):
    """The mapped dimension folded into the batch one: ``(N, B, ...) -> (N * B, ...)`` and back."""
    size = info.batch_size

    def fold(t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
        return t.reshape(size * t.shape[1], *t.shape[2:])

    args = (q, k, v, q_t, k_t, v_t, mask)
    o, o_t, lse = _jvp_attention_op(*(fold(t, d) for t, d in zip(args, in_dims, strict=False)), scale)
    o_t = o_t.unflatten(0, (size, -1)) if q_t is not None else o_t.new_empty(size, 0)
    return (o.unflatten(0, (size, -1)), o_t, lse.unflatten(0, (size, -1))), (0, 0, 0)


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


def _row_chunks(q: torch.Tensor, k: torch.Tensor) -> list[slice]:
    """Query-row slices holding about ``CHUNK_ELEMENTS`` scores each (all keys per chunk)."""
    batch, heads, seq_q, _ = q.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * k.shape[2]))
    return [slice(start, start + rows) for start in range(0, seq_q, rows)]


def _or_zeros(tensors: tuple[torch.Tensor | None, ...], like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros_like(x) if t is None else t for t, x in zip(tensors, like, strict=True))


def _probabilities(q_c: torch.Tensor, k_m: torch.Tensor, mask_c: torch.Tensor | None, scale: float) -> tuple[
    torch.Tensor, torch.Tensor
]:  # fmt: skip
    """``P = softmax(c Q K^T)`` over the allowed keys (rows with none give 0) and the row log-sum-exp
    (``-inf`` for those rows), in the math dtype."""
    s = (q_c @ k_m.transpose(-1, -2)) * scale
    if mask_c is not None:
        s = s.masked_fill(~mask_c, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)  # noqa: E741 (the normaliser's usual name)
    return p * torch.where(l > 0, 1 / l, torch.zeros_like(l)), (m + torch.log(l)).squeeze(-1)


def _score_tangent(
    q_c: torch.Tensor, k: torch.Tensor, q_dot_c: torch.Tensor, k_dot: torch.Tensor, scale: float
) -> torch.Tensor:
    r"""``\dot S = c(\dot Q K^T + Q \dot K^T)``."""
    return (q_dot_c @ k.transpose(-1, -2) + q_c @ k_dot.transpose(-1, -2)) * scale


def _probability_tangent(p: torch.Tensor, s_dot: torch.Tensor) -> torch.Tensor:
    r"""``\dot P = P \odot (\dot S - \operatorname{rowsum}(P \odot \dot S))``."""
    p_s = p * s_dot
    return p_s - p * p_s.sum(-1, keepdim=True)


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
    """The op's PyTorch implementation: ``(o, o_t, lse)`` over chunks of query rows (all keys per chunk)."""
    dtype, math_dtype = q.dtype, _math_dtype(q.dtype)
    has_tangent = q_t is not None
    if k.shape[2] == 0:  # no keys: every row is fully masked, which gives 0 (as SDPA does), lse = -inf
        o = torch.zeros(q.shape, dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_lse_dtype(dtype), device=q.device)
        return o, torch.zeros_like(o) if has_tangent else None, lse
    k_m, v_m = k.to(math_dtype), v.to(math_dtype)
    if has_tangent:
        k_tm, v_tm = k_t.to(math_dtype), v_t.to(math_dtype)
    o = torch.empty(q.shape, dtype=dtype, device=q.device)
    o_t = torch.empty_like(o) if has_tangent else None
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(dtype), device=q.device)
    for chunk in _row_chunks(q, k):
        q_c = q[:, :, chunk].to(math_dtype)
        p, lse[:, :, chunk] = _probabilities(q_c, k_m, None if mask is None else mask[:, :, chunk], scale)
        o_c = p @ v_m
        o[:, :, chunk] = o_c.to(dtype)
        if has_tangent:
            p_dot = _probability_tangent(p, _score_tangent(q_c, k_m, q_t[:, :, chunk].to(math_dtype), k_tm, scale))
            o_t[:, :, chunk] = (p_dot @ v_m + p @ v_tm).to(dtype)
    return o, o_t, lse


def _chunked_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    e: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""The op's ``jvp`` rule (module docstring): ``(\dot O_b, \dot O_2, \dot{lse}_b)`` for primal tangents
    ``b``, the op's tangent inputs ``a`` and their own tangents ``e`` (``\dot O_2`` is ``None`` without
    ``a``), in chunks of query rows. Written without in-place writes, so any lower-level transform sees
    through it."""
    dtype, math_dtype = q.dtype, _math_dtype(q.dtype)
    k_m, v_m = k.to(math_dtype), v.to(math_dtype)
    q_b, k_b, v_b = (t.to(math_dtype) for t in b)
    if a is not None:
        q_a, k_a, v_a = (t.to(math_dtype) for t in a)
        q_e, k_e, v_e = (t.to(math_dtype) for t in e)
    o_b, o_2, lse_b = [], [], []
    for chunk in _row_chunks(q, k) if k.shape[2] else []:
        q_c = q[:, :, chunk].to(math_dtype)
        p, _ = _probabilities(q_c, k_m, None if mask is None else mask[:, :, chunk], scale)
        s_b = _score_tangent(q_c, k_m, q_b[:, :, chunk], k_b, scale)
        p_b = _probability_tangent(p, s_b)
        o_b.append(p_b @ v_m + p @ v_b)
        lse_b.append((p * s_b).sum(-1))
        if a is None:
            continue
        s_a = _score_tangent(q_c, k_m, q_a[:, :, chunk], k_a, scale)
        s_2 = _score_tangent(q_a[:, :, chunk], k_a, q_b[:, :, chunk], k_b, scale)
        s_2 = s_2 + _score_tangent(q_c, k_m, q_e[:, :, chunk], k_e, scale)
        s_a_centred = s_a - (p * s_a).sum(-1, keepdim=True)
        p_a = p * s_a_centred
        p_2 = p_b * s_a_centred + _probability_tangent(p, s_2) - p * (p_b * s_a).sum(-1, keepdim=True)
        o_2.append(p_2 @ v_m + p_a @ v_b + p_b @ v_a + p @ v_e)
    if not o_b:  # no keys: outputs are 0 whatever the inputs, and so are their derivatives
        zero = torch.zeros(q.shape, dtype=dtype, device=q.device)
        return zero, zero if a is not None else None, torch.zeros(q.shape[:3], dtype=math_dtype, device=q.device)
    o_2_out = torch.cat(o_2, dim=2).to(dtype) if a is not None else None
    return torch.cat(o_b, dim=2).to(dtype), o_2_out, torch.cat(lse_b, dim=2)


def _chunked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    grad_o: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients from recomputed probabilities ``P = exp(S - lse)``, chunk by chunk: ``dV = P^T dO``,
    ``dS = P (dO V^T - rowsum(dO O) + d lse)``, ``dQ = c dS K``, ``dK = c dS^T Q``. Differentiable
    PyTorch without in-place writes (double backward, forward-over-reverse and ``vmap`` see through it)."""
    dtype, math_dtype = q.dtype, _math_dtype(q.dtype)
    k_m, v_m = k.to(math_dtype), v.to(math_dtype)
    grad_o = torch.zeros_like(o) if grad_o is None else grad_o.contiguous()
    row_term = -(grad_o.to(math_dtype) * o.to(math_dtype)).sum(-1, keepdim=True)
    if grad_lse is not None:
        row_term = row_term + grad_lse.to(math_dtype).unsqueeze(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(math_dtype).unsqueeze(-1)
    dq_chunks = []
    dk = torch.zeros_like(k_m)
    dv = torch.zeros_like(v_m)
    for chunk in _row_chunks(q, k):
        q_c, do_c = q[:, :, chunk].to(math_dtype), grad_o[:, :, chunk].to(math_dtype)
        s = (q_c @ k_m.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, :, chunk], float("-inf"))
        p = torch.exp(s - lse[:, :, chunk])
        dv = dv + p.transpose(-1, -2) @ do_c
        d_s = p * (do_c @ v_m.transpose(-1, -2) + row_term[:, :, chunk])
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
