r"""Triton kernel: attention and its forward-mode derivative in one streaming pass (CUDA tensors; CPU
tensors under ``TRITON_INTERPRET=1``).

Per (batch, head), with scale ``c``, ``S = c Q K^T``, ``P = softmax(S)``, ``O = P V`` and tangents
``\dot Q, \dot K, \dot V``:

.. math::

    \dot S = c(\dot Q K^T + Q \dot K^T), \qquad
    \dot O = (P \odot \dot S) V + P \dot V - \operatorname{rowsum}(P \odot \dot S) \odot O

Each program owns ``BLOCK_M`` query rows and streams the keys in ``BLOCK_N`` blocks with the online
softmax: running max ``m``, normaliser ``l`` and, for the tangent, ``mu`` (the unnormalised
``rowsum(P * dS)``) and one merged accumulator ``T = sum p (dV) + (p * dS) V`` (six GEMMs per block instead
of two; no ``S x S`` matrix exists anywhere). At the end ``O = A / l``, ``dO = T / l - (mu / l) O`` and the
row log-sum-exp ``m + log l`` is stored for the backward pass.

Any lengths (rows and columns past the ends are masked), ``Sq != Sk``, head dims up to 128 (padded to the
next power of two inside the kernel), an optional boolean mask broadcast over (batch, head, query) via
zero strides (key padding is a ``(B, 1, 1, Sk)`` mask), and fully masked rows give 0 like PyTorch's math
backend. Storage dtypes bfloat16 and float16 (tensor-core dots, float32 accumulation; float32 storage
does not fit sm_90's registers and shared memory in any tiling tried, so the op sends it to its chunked
path). Plain pointer arithmetic only, so older Triton releases compile it too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
SUPPORTED_DTYPES = tuple(_TRITON_DTYPES)
MAX_HEAD_DIM = 128


@triton.jit
def jvp_attention_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, vt_ptr, o_ptr, ot_ptr, lse_ptr, mask_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    sqt_b, sqt_h, sqt_s, skt_b, skt_h, skt_s, svt_b, svt_h, svt_s,
    so_b, so_h, so_s, sot_b, sot_h, sot_s,
    sm_b, sm_h, sm_q, sm_k,
    num_heads, seq_q, seq_k, head_dim, scale,
    HAS_TANGENT: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    q_tile = offs_m[:, None] * sq_s + offs_d[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + q_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter has no bfloat16 arithmetic
        q = q.to(tl.float32)
    dot_dtype = q.dtype
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    if HAS_TANGENT:
        qt = tl.load(
            qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_s + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(dot_dtype)  # fmt: skip
        kt_base = kt_ptr + b * skt_b + h * skt_h
        vt_base = vt_ptr + b * svt_b + h * svt_h
    qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mu_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tacc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seq_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_dtype)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_dtype)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:
            keep = tl.load(
                mask_ptr + b * sm_b + h * sm_h + offs_m[:, None] * sm_q + offs_n[None, :] * sm_k,
                mask=valid, other=0,
            )  # fmt: skip
            valid = valid & (keep != 0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dot_dtype), v, acc)
        if HAS_TANGENT:
            kt = tl.load(kt_base + offs_n[:, None] * skt_s + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_dtype)
            vt = tl.load(vt_base + offs_n[:, None] * svt_s + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_dtype)
            st = tl.dot(qt, tl.trans(k))
            st = tl.dot(q, tl.trans(kt), st) * scale
            pst = tl.where(valid, p * st, 0.0)
            mu_i = mu_i * alpha + tl.sum(pst, 1)
            tacc = tacc * alpha[:, None]
            tacc = tl.dot(p.to(dot_dtype), vt, tacc)
            tacc = tl.dot(pst.to(dot_dtype), v, tacc)
        m_i = m_new
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    inv_l = tl.where(has_keys, 1.0 / l_safe, 0.0)  # fully masked rows give 0
    o = acc * inv_l[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    o_offs = b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=out_mask)
    lse = tl.where(has_keys, m_i / 1.4426950408889634 + tl.log(l_safe), float("-inf"))
    tl.store(lse_ptr + batch_head.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)
    if HAS_TANGENT:
        ot = tacc * inv_l[:, None] - (mu_i * inv_l)[:, None] * o
        ot_offs = b * sot_b + h * sot_h + offs_m[:, None] * sot_s + offs_d[None, :]
        tl.store(ot_ptr + ot_offs, ot.to(ot_ptr.dtype.element_ty), mask=out_mask)


def launch_config(head_dim: int) -> dict[str, int]:
    """Tiles, warps and pipeline stages for a head dim (padded to a power of two), chosen by compiling for
    sm_90 on the CPU machine (``python -m tests.kernel_compile``): with the tangent and a mask, D <= 64
    uses 245 registers and no spills; D = 128 spills about 200 bytes in every tiling tried, and this is the
    least (a GPU autotune may still do better)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 3 if block_d <= 64 else 2}


def compile_configs() -> list[tuple[dict[str, str], dict[str, object], dict[str, int]]]:
    """(signature, constexprs, options) for ahead-of-time compile checks: each dtype and padded head dim
    (64; 128, which also serves 72), forward only without a mask and forward + tangent with one."""
    names = ("q", "k", "v", "qt", "kt", "vt", "o", "ot")
    configs = []
    for dtype_name in _TRITON_DTYPES.values():
        for head_dim in (64, 128):
            for has_tangent, has_mask in ((False, False), (True, True)):
                launch = launch_config(head_dim)
                signature = {f"{n}_ptr": f"*{dtype_name}" for n in names} | {"lse_ptr": "*fp32", "mask_ptr": "*i1"}
                for n in names:
                    signature |= {f"s{n}_b": "i32", f"s{n}_h": "i32", f"s{n}_s": "i32"}
                signature |= dict.fromkeys(("sm_b", "sm_h", "sm_q", "sm_k", "num_heads", "seq_q", "seq_k"), "i32")
                signature |= {"head_dim": "i32", "scale": "fp32"}
                constexprs = {
                    "HAS_TANGENT": has_tangent, "HAS_MASK": has_mask, "UPCAST": False,
                    "BLOCK_M": launch["BLOCK_M"], "BLOCK_N": launch["BLOCK_N"], "BLOCK_D": launch["BLOCK_D"],
                }  # fmt: skip
                signature |= dict.fromkeys(constexprs, "constexpr")
                options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
                configs.append((signature, constexprs, options))
    return configs


def jvp_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor | None,
    k_t: torch.Tensor | None,
    v_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the kernel on validated ``(B, H, S, D)`` tensors (any strides with a unit last one); returns
    ``(o, o_t, lse)`` with ``o`` and ``o_t`` laid out like ``q`` and ``lse`` float32 ``(B, H, Sq)``.

    Tangents: all three or none. ``mask``: boolean, already expanded (zero strides) to ``(B, H, Sq, Sk)``."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    has_tangent = q_t is not None
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    tangents = [t if t.stride(-1) == 1 else t.contiguous() for t in (q_t, k_t, v_t)] if has_tangent else tensors
    o = torch.empty_like(tensors[0])  # laid out like q (unit last stride)
    o_t = torch.empty_like(o) if has_tangent else None
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o.zero_(), o_t.zero_() if o_t is not None else None, lse.fill_(float("-inf"))
    mask_arg = mask if mask is not None else lse
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    launch = launch_config(head_dim)
    grid = (triton.cdiv(seq_q, launch["BLOCK_M"]), batch * heads)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    out_t = o_t if o_t is not None else o
    strides = [s for t in (*tensors, *tangents, o, out_t) for s in t.stride()[:3]]
    jvp_attention_kernel[grid](
        *tensors, *tangents, o, out_t, lse, mask_arg, *strides, *mask_strides,
        heads, seq_q, seq_k, head_dim, scale,
        HAS_TANGENT=has_tangent, HAS_MASK=mask is not None,
        UPCAST=interpreting and q.dtype == torch.bfloat16, **launch,
    )  # fmt: skip
    return o, o_t, lse
