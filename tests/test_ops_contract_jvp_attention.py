"""The autograd contract of ``meancache.ops.jvp_attention`` and ``meancache.ops.attention`` (one op file, two
public functions), against forward- and reverse-mode AD through PyTorch's math-backend SDPA."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meancache.ops import attention, jvp_attention
from tests import ops_contract as contract
from tests.ops_contract import Mode

# (batch, heads, Sq, Sk, head_dim, masked): batch 1 with Sq < Sk and head dim 6; Sq > Sk, head dim 5, masked.
CASES = ((1, 1, 3, 5, 6, False), (2, 2, 4, 3, 5, True))
REFUSED_TANGENT_BACKWARD = (NotImplementedError, "backward through the tangent output")

ATTENTION_MODES = {
    "backward": Mode(contract.backward, "math SDPA's backward"),
    "double backward": Mode(contract.double_backward, "math SDPA's double backward"),
    "forward AD (`torch.func.jvp`)": Mode(contract.jvp, "math SDPA under `torch.func.jvp`"),
    "forward AD (`fwAD` dual level)": Mode(contract.dual_level, "math SDPA under a dual level"),
    "nested forward AD (`jvp` of `jvp`)": Mode(contract.jvp_of_jvp, "the same nesting of math SDPA"),
    "forward-over-reverse (`jvp` of `vjp`)": Mode(contract.jvp_of_vjp, "the same transforms of math SDPA"),
    "forward-over-reverse (dual level + `autograd.grad`)": Mode(contract.dual_over_backward, "the same of math SDPA"),
    "reverse-over-forward (`vjp` of `jvp`)": Mode(
        contract.vjp_of_jvp,
        "the gradient of the fused tangent is a second-order term; detach the tangent (stop-gradient targets)",
        REFUSED_TANGENT_BACKWARD,
    ),
    "reverse-over-forward (dual level + `autograd.grad`)": Mode(
        contract.backward_of_dual,
        "the same transforms of math SDPA with `torch.func` (PyTorch's own math SDPA fails this)",
        reference_transform=contract.vjp_of_jvp,
    ),
    "`torch.func.vmap`": Mode(contract.vmap, "`vmap` of math SDPA"),
    "`torch.func.grad`": Mode(contract.grad, "math SDPA under `torch.func.grad`"),
    "`jacfwd`": Mode(contract.jacfwd, "`jacfwd` of math SDPA"),
    "`jacrev`": Mode(contract.jacrev, "`jacrev` of math SDPA"),
    "`torch.compile(fullgraph=True)`, output and backward": Mode(
        contract.compiled, "eager math SDPA", dtypes=(torch.float32,)
    ),
}

JVP_ATTENTION_MODES = {
    "backward through `o`": Mode(contract.backward, "math SDPA's backward"),
    "double backward through `o`": Mode(contract.double_backward, "math SDPA's double backward"),
    "backward through `o_t`": Mode(
        contract.backward,
        "a second-order term; detach `o_t` (stop-gradient targets) or differentiate math SDPA",
        REFUSED_TANGENT_BACKWARD,
    ),
    "forward AD along dual tangents of all six inputs (`torch.func.jvp`)": Mode(
        contract.jvp, "math SDPA's `jvp` under `torch.func.jvp` (`o_t`'s tangent is second order)"
    ),
    "forward AD along dual tangents (`fwAD` dual level)": Mode(
        contract.dual_level,
        "math SDPA's `jvp` under `torch.func.jvp` (PyTorch refuses a `torch.func.jvp` inside a dual level)",
        reference_transform=contract.jvp_tangents,
    ),
    "`torch.func.vmap`": Mode(contract.vmap, "`vmap` of math SDPA's `jvp`"),
    "`jacfwd`": Mode(contract.jacfwd, "`jacfwd` of math SDPA's `jvp`"),
    "`torch.compile(fullgraph=True)`, outputs and backward through `o`": Mode(
        contract.compiled, "eager math SDPA's `jvp`", dtypes=(torch.float32,)
    ),
    "`torch.compile(fullgraph=True)`, backward through `o_t`": Mode(
        contract.compiled,
        "raised when the compiled backward runs (it is handed zeros for an unused `o_t`); detach `o_t`",
        (RuntimeError, REFUSED_TANGENT_BACKWARD[1]),
    ),
}


def _inputs(case, dtype, device="cpu"):
    """``(q, k, v, q_t, k_t, v_t)`` and a key-padding mask (or None)."""
    batch, heads, seq_q, seq_k, head_dim, masked = case
    g = torch.Generator().manual_seed(0)
    lengths = (seq_q, seq_k, seq_k) * 2
    tensors = [torch.randn(batch, heads, s, head_dim, generator=g, dtype=torch.float64) for s in lengths]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, seq_k, generator=g) > 0.4
        mask[..., 0] = True  # every row attends to some key (math SDPA gives NaN for a fully masked row)
        mask = mask.to(device)
    return [t.to(device, dtype) for t in tensors], mask


def _sdpa(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_jvp(q, k, v, q_t, k_t, v_t, mask):
    return torch.func.jvp(functools.partial(_sdpa, mask=mask), (q, k, v), (q_t, k_t, v_t))


def _ours_attention(q, k, v, mask):
    return attention(q, k, v, attn_mask=mask)


def _ours_jvp_attention(q, k, v, q_t, k_t, v_t, mask):
    return jvp_attention(q, k, v, q_t, k_t, v_t, attn_mask=mask)


def _only_o(fn):
    return lambda *args: fn(*args)[0]


# op -> (its modes, our function, the reference, number of primal inputs, the backward-through-o modes)
OPS = {
    "attention": (ATTENTION_MODES, _ours_attention, _sdpa, 3),
    "jvp_attention": (JVP_ATTENTION_MODES, _ours_jvp_attention, _sdpa_jvp, 6),
}


def _functions(op, mode):
    _, ours, reference, _ = OPS[op]
    if op == "jvp_attention" and "through `o`" in mode:
        return _only_o(ours), _only_o(reference)
    return ours, reference


def _params(devices=contract.DEVICES):
    for device in devices:
        marks = [pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="needs a GPU")]
        for op, (modes, *_) in OPS.items():
            for mode, spec in modes.items():
                for dtype in spec.dtypes if not spec.refused else (torch.float64,):
                    for index, case in enumerate(CASES):
                        yield pytest.param(op, mode, dtype, case, device, id=f"{device}-{op}-{mode}-{dtype}-{index}",
                                           marks=marks)  # fmt: skip


@pytest.mark.parametrize(("op", "mode", "dtype", "case", "device"), list(_params()))
def test_mode(op, mode, dtype, case, device):
    """A supported mode matches the same transform of math SDPA by flash-attention's tolerance rule; a refused
    one raises the documented error."""
    spec = OPS[op][0][mode]
    ours, reference = _functions(op, mode)
    tensors, mask = _inputs(case, torch.float64, device)
    count = OPS[op][3]
    inputs, directions = tensors[:count], tensors[count:] if count == 3 else [t.flip(-1) for t in tensors]

    bound = lambda fn: lambda *x: fn(*x, mask)  # noqa: E731
    contract.check_mode(spec, bound(ours), bound(reference), inputs, directions, dtype)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_and_gradgradcheck_in_float64(case):
    tensors, mask = _inputs(case, torch.float64)
    primals = [t.requires_grad_() for t in tensors[:3]]
    assert torch.autograd.gradcheck(lambda *x: _ours_attention(*x, mask), primals, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda *x: _ours_attention(*x, mask), primals, check_fwd_over_rev=True)
    all_six = [t.detach().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(
        lambda *x: _ours_jvp_attention(*x, mask), all_six, check_forward_ad=True, check_backward_ad=False,
        check_undefined_grad=False,
    )  # fmt: skip
    assert torch.autograd.gradgradcheck(lambda *x: _ours_jvp_attention(*x, mask)[0], all_six[:3] + tensors[3:])


@pytest.mark.parametrize("dtype", tuple(contract.ATOL))
@pytest.mark.parametrize("tangents", (True, False))
@pytest.mark.parametrize("requires_grad", (True, False))
def test_opcheck(dtype, tangents, requires_grad, case=CASES[1]):
    """``torch.library.opcheck`` on the dispatcher op: schema, autograd registration, fake tensors, AOT
    dispatch (whose backward through every output reaches ``o_t`` when there are tangents: refused)."""
    tensors, mask = _inputs(case, dtype)
    batch, heads, seq_q, seq_k, _, _ = case
    primals = [t.requires_grad_(requires_grad) for t in tensors[:3]]
    expanded = mask.expand(batch, heads, seq_q, seq_k) if mask is not None else None
    args = (*primals, *(tensors[3:] if tangents else (None,) * 3), expanded, 0.4)
    op = torch.ops.meancache.jvp_attention.default
    if not (tangents and requires_grad):
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match=REFUSED_TANGENT_BACKWARD[1]):
        torch.library.opcheck(op, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("op", OPS)
def test_the_docs_table_is_the_suite(op):
    """``docs/autograd_modes.md`` holds exactly the table of modes this suite proves."""
    assert contract.documented_table(op) == contract.table(op, OPS[op][0])
