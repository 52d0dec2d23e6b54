import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from meancache.kernels.jvp_attention import jvp_attention_triton
from meancache.ops import attention, jvp_attention
from tests.tolerance import assert_close_by_own_rounding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (Sq, Sk): single token, odd equal lengths, cross attention both ways.
LENGTHS = ((1, 1), (17, 17), (300, 300), (17, 300), (300, 17))


def _inputs(batch, heads, seq_q, seq_k, head_dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(seq_q,), (seq_k,), (seq_k,)] * 2
    return [torch.randn(batch, heads, s[0], head_dim, generator=g).to(DEVICE, dtype) for s in shapes]


def _key_padding(batch, seq_k, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, 1, seq_k, generator=g) > 0.3
    mask[..., 0] = True
    return mask.to(DEVICE)


def _sdpa_jvp(q, k, v, q_t, k_t, v_t, mask=None):
    """The reference: forward-mode AD through PyTorch's math-backend attention."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v), (q_t, k_t, v_t)
        )


def _check(outputs, inputs, mask):
    """Judge (o, o_t) in the inputs' dtype against the float64 reference, by that dtype's own rounding."""
    dtype = inputs[0].dtype
    reference = _sdpa_jvp(*(t.double() for t in inputs), mask)
    lowp = _sdpa_jvp(*inputs, mask) if dtype != torch.float64 else reference
    for out, ref, low in zip(outputs, reference, lowp, strict=True):
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close_by_own_rounding(out, low, ref, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("head_dim", (64, 72, 128))
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("masked", (False, True))
def test_op_matches_forward_ad_through_math_sdpa(lengths, head_dim, dtype, masked):
    seq_q, seq_k = lengths
    inputs = _inputs(2, 3, seq_q, seq_k, head_dim, dtype)
    mask = _key_padding(2, seq_k) if masked else None
    _check(jvp_attention(*inputs, attn_mask=mask), inputs, mask)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("head_dim", (64, 72, 128))
@pytest.mark.parametrize(("lengths", "masked"), [((1, 1), False), ((17, 300), True), ((130, 17), False)])
def test_triton_kernel_matches_forward_ad_through_math_sdpa(lengths, head_dim, dtype, masked):
    seq_q, seq_k = lengths
    inputs = _inputs(1, 2, seq_q, seq_k, head_dim, dtype)
    mask = _key_padding(1, seq_k) if masked else None
    expanded = mask.expand(1, 2, seq_q, seq_k) if masked else None
    o, o_t, lse = jvp_attention_triton(*inputs, expanded, head_dim**-0.5)
    _check((o, o_t), inputs, mask)
    with sdpa_kernel(SDPBackend.MATH):
        scores = inputs[0].double() @ inputs[1].double().transpose(-1, -2) * head_dim**-0.5
    if masked:
        scores = scores.masked_fill(~expanded, float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-2, rtol=0)


def test_triton_kernel_without_tangent_and_with_strided_inputs():
    q, k, v, *_ = _inputs(2, 3, 33, 40, 64, torch.float16)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) storage, as diffusers passes it
    o, o_t, _ = jvp_attention_triton(q_strided, k, v, None, None, None, None, 0.125)
    assert o_t is None and o.stride() == q_strided.stride()
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("implementation", ("op", "triton"))
def test_full_masks_and_fully_masked_rows_give_zero_like_math_sdpa(implementation):
    inputs = _inputs(1, 2, 9, 12, 64, torch.float16)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 2, 9, 12, generator=g) > 0.5).to(DEVICE)
    mask[0, 1, 4] = False  # one query row sees no key at all
    if implementation == "op":
        o, o_t = jvp_attention(*inputs, attn_mask=mask)
    else:
        o, o_t, _ = jvp_attention_triton(*inputs, mask, 0.125)
    assert o[0, 1, 4].abs().max() == 0 and o_t[0, 1, 4].abs().max() == 0
    _check((o, o_t), inputs, mask)


def test_torch_func_jvp_and_forward_ad_and_backward_through_attention():
    q, k, v, q_t, k_t, v_t = _inputs(2, 2, 20, 31, 16)
    mask = _key_padding(2, 31)
    ref_o, ref_t = _sdpa_jvp(q, k, v, q_t, k_t, v_t, mask)
    o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, attn_mask=mask), (q, k, v), (q_t, k_t, v_t))
    torch.testing.assert_close((o, o_t), (ref_o, ref_t))
    with fwAD.dual_level():  # tangent on q only: the others count as zero
        out = attention(fwAD.make_dual(q, q_t), k, v, attn_mask=mask)
        only_q = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(only_q, _sdpa_jvp(q, k, v, q_t, torch.zeros_like(k), torch.zeros_like(v), mask)[1])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    attention(*leaves, attn_mask=mask).backward(grad)
    with sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(*ref_leaves, attn_mask=mask).backward(grad)
    for ours, theirs in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_grad_through_the_primal_of_a_jvp_and_the_tangent_refuses_backward():
    q, k, v, q_t, k_t, v_t = _inputs(1, 2, 7, 9, 8)
    leaf = q.clone().requires_grad_()
    o, o_t = jvp_attention(leaf, k, v, q_t, k_t, v_t)
    with pytest.raises(NotImplementedError, match="reverse-over-forward"):
        (o + o_t).sum().backward(retain_graph=True)
    o.sum().backward()
    ref = q.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(ref, k, v).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_a_loss_through_the_tangent_raises_instead_of_a_silent_zero_gradient():
    q, k, v, q_t, k_t, v_t = _inputs(1, 2, 7, 9, 8)
    v_t.requires_grad_()
    _, o_t = jvp_attention(q, k, v, q_t, k_t, v_t)
    with pytest.raises(NotImplementedError, match="detach the tangent"):
        o_t.sum().backward()
    weight = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)  # tangents through trainable weights
    with pytest.raises(NotImplementedError, match="detach the tangent"):
        torch.func.grad(lambda w: torch.func.jvp(lambda x: attention(x @ w, k, v), (q,), (q_t,))[1].sum())(weight)
    _, o_t = jvp_attention(q, k, v, q_t, k_t, v_t.detach())
    assert not o_t.requires_grad


def test_gradcheck_forward_and_backward_in_float64():
    inputs = [t.requires_grad_() for t in _inputs(1, 2, 5, 6, 8)[:3]]
    mask = _key_padding(1, 6)
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, attn_mask=mask), inputs, check_forward_ad=True, check_backward_ad=True
    )


def test_torch_func_grad_runs_the_backward():
    q, k, v, *_ = _inputs(1, 1, 6, 5, 8)
    grad = torch.func.grad(lambda a: attention(a, k, v).square().sum())(q)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.grad(lambda a: F.scaled_dot_product_attention(a, k, v).square().sum())(q)
    torch.testing.assert_close(grad, ref)


def test_query_chunks_give_the_same_result(monkeypatch):
    module = importlib.import_module("meancache.ops.jvp_attention")
    inputs = _inputs(1, 2, 64, 50, 8)
    whole = jvp_attention(*inputs, attn_mask=_key_padding(1, 50))
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 2 * 50 * 7)  # 7 query rows per chunk: 10 chunks, a ragged last
    torch.testing.assert_close(jvp_attention(*inputs, attn_mask=_key_padding(1, 50)), whole, atol=1e-14, rtol=0)


def _bad(**change):
    q, k, v, q_t, k_t, v_t = _inputs(1, 2, 5, 6, 8)
    args = {"q": q, "k": k, "v": v, "q_t": q_t, "k_t": k_t, "v_t": v_t, "attn_mask": None, "scale": None}
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"k": torch.randn(1, 3, 6, 8, dtype=torch.float64)}, ValueError, "grouped-query"),
        ({"v": torch.randn(1, 2, 6, 4, dtype=torch.float64)}, ValueError, "head dim 4"),
        ({"v": torch.randn(1, 2, 7, 8, dtype=torch.float64)}, ValueError, "7 values"),
        ({"q": torch.randn(2, 5, 8, dtype=torch.float64)}, ValueError, "must be 4-D"),
        ({"k": torch.randn(1, 2, 6, 8)}, TypeError, "share one dtype"),
        ({"q": torch.ones(1, 2, 5, 8, dtype=torch.long)}, TypeError, "floating"),
        ({"q_t": torch.randn(1, 2, 4, 8, dtype=torch.float64)}, ValueError, "q_t has shape"),
        ({"attn_mask": torch.ones(1, 1, 3, 6, dtype=torch.bool)}, ValueError, "does not broadcast"),
        ({"attn_mask": torch.ones(1, 6, 1, dtype=torch.bool)}, ValueError, "does not broadcast"),
        ({"attn_mask": torch.zeros(1, 1, 5, 6)}, TypeError, "additive masks"),
        ({"scale": -1.0}, ValueError, "positive finite"),
        ({"scale": float("nan")}, ValueError, "positive finite"),
    ],
)
def test_bad_inputs_get_clear_errors(change, error, message):
    args = _bad(**change)
    q, k, v, q_t, k_t, v_t = (args.pop(n) for n in ("q", "k", "v", "q_t", "k_t", "v_t"))
    with pytest.raises(error, match=message):
        jvp_attention(q, k, v, q_t, k_t, v_t, **args)


def test_key_padding_mask_may_be_two_dimensional():
    inputs = _inputs(2, 2, 5, 6, 8)
    mask = _key_padding(2, 6)
    o_2d = jvp_attention(*inputs, attn_mask=mask[:, 0, 0])
    torch.testing.assert_close(o_2d, jvp_attention(*inputs, attn_mask=mask))


def test_torch_compile_traces_the_op():
    q, k, v, q_t, k_t, v_t = _inputs(1, 2, 5, 6, 8, torch.float32)
    op = torch.ops.meancache.jvp_attention
    compiled = torch.compile(lambda *t: op(*t, None, 0.3), fullgraph=True, backend="eager")
    o, o_t, _ = compiled(q, k, v, q_t, k_t, v_t)
    torch.testing.assert_close((o, o_t), jvp_attention(q, k, v, q_t, k_t, v_t, scale=0.3))


@pytest.mark.parametrize(("seq_k", "head_dim"), [(0, 8), (5, 0), (0, 0)])
def test_no_keys_or_head_dim_zero_match_sdpa(seq_k, head_dim):
    """Item 16 of issue #15: no keys give zero outputs and tangents, head dim 0 empty ones, as math SDPA does."""
    inputs = _inputs(2, 3, 4, seq_k, head_dim)
    o, o_t = jvp_attention(*inputs)
    ref_o, ref_t = _sdpa_jvp(*inputs)
    assert o.shape == o_t.shape == ref_o.shape == (2, 3, 4, head_dim)
    torch.testing.assert_close((o, o_t), (ref_o, ref_t))
    q, k, v = (t.requires_grad_() for t in inputs[:3])
    attention(q, k, v).sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_a_numpy_scale_is_accepted():
    import numpy as np

    inputs = _inputs(1, 2, 5, 7, 8)
    torch.testing.assert_close(jvp_attention(*inputs, scale=np.float32(0.25)), jvp_attention(*inputs, scale=0.25))
