import os
import warnings

import pytest
import torch

from meancache.kernels.average_velocity_step import average_velocity_step_triton
from meancache.ops import average_velocity_step, average_velocity_step_reference
from meancache.ops._extension import cpp_ops
from tests.tolerance import assert_close_by_own_rounding

SIGMAS = (0.93, 0.71, 0.64)  # sigma_anchor, sigma, sigma_next
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1,), (17,), (3, 5, 7), (2, 4099), (1, 16, 3, 5, 11))


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


def _per_sample_sigmas(batch, dtype=torch.float32):
    sigma = torch.linspace(0.9, 0.3, batch, dtype=dtype)
    return sigma + 0.11, sigma, sigma - 0.05


def _composite(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next):
    """The equations written out in whatever dtype the inputs have (no upcast); sigmas broadcast per sample."""

    def col(s):
        return s.reshape(-1, *[1] * (z.dim() - 1)).to(z.dtype) if isinstance(s, torch.Tensor) else s

    sigma_anchor, sigma, sigma_next = col(sigma_anchor), col(sigma), col(sigma_next)
    ubar = (z - z_anchor) / (sigma - sigma_anchor)
    jvp = (ubar - v_anchor) / (sigma - sigma_anchor)
    u_hat = v_last + (sigma_next - sigma) * jvp
    return z + (sigma_next - sigma) * u_hat, u_hat


def _check_against_float64(outputs, inputs, sigmas):
    reference = _composite(*(t.double() for t in inputs), *(s.double() if torch.is_tensor(s) else s for s in sigmas))
    lowp = _composite(*inputs, *sigmas)
    for out, ref, low in zip(outputs, reference, lowp, strict=True):
        assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
        assert_close_by_own_rounding(out, low, ref)


def test_cpp_extension_is_built_and_registered():
    assert cpp_ops() is not None, "pip install did not build meancache._C"
    assert hasattr(torch.ops.meancache, "average_velocity_step")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_kernel_matches_reference(shape, dtype):
    inputs = _inputs(shape, dtype)
    _check_against_float64(average_velocity_step(*inputs, *SIGMAS), inputs, SIGMAS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 5, 7), (2, 300)])
def test_triton_kernel_matches_reference(shape, dtype):
    """On CPU this runs in Triton's interpreter (which computes in float32 / float64 only)."""
    inputs = _inputs(shape, dtype)
    d, h = [SIGMAS[1] - SIGMAS[0]], [SIGMAS[2] - SIGMAS[1]]
    outputs = average_velocity_step_triton(*inputs, d, h)
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter casts float32 -> bfloat16 by truncation (CUDA rounds to nearest): compare with the
        # float32 reference truncated the same way.
        for out, ref in zip(
            outputs, average_velocity_step_reference(*(t.float() for t in inputs), *SIGMAS), strict=True
        ):
            truncated = (ref.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
            torch.testing.assert_close(out, truncated, rtol=2**-7, atol=1e-6)
        return
    _check_against_float64(outputs, inputs, SIGMAS)


@pytest.mark.parametrize("implementation", ["op", "triton", "reference"])
def test_per_sample_sigmas(implementation):
    inputs = _inputs((3, 4, 37), torch.float32)
    sigmas = _per_sample_sigmas(3)
    if implementation == "triton":
        d, h = (sigmas[1] - sigmas[0]).tolist(), (sigmas[2] - sigmas[1]).tolist()
        outputs = average_velocity_step_triton(*inputs, d, h)
    else:
        fn = average_velocity_step if implementation == "op" else average_velocity_step_reference
        outputs = fn(*inputs, *sigmas)
    _check_against_float64(outputs, inputs, sigmas)
    # each sample equals a scalar-sigma call at its own noise levels
    for b in range(3):
        one = average_velocity_step(*(t[b] for t in inputs), *(float(s[b]) for s in sigmas))
        for out, out_b in zip(outputs, one, strict=True):
            torch.testing.assert_close(out[b], out_b, rtol=1e-6, atol=1e-6)


def test_sigmas_may_be_zero_dim_tensors():
    inputs = _inputs((2, 9), torch.float32)
    as_tensors = average_velocity_step(*inputs, *(torch.tensor(s, dtype=torch.float64) for s in SIGMAS))
    as_floats = average_velocity_step(*inputs, *SIGMAS)
    for a, b in zip(as_tensors, as_floats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_inputs():
    strided = [t.t() for t in _inputs((6, 10), torch.float32)]
    assert not strided[0].is_contiguous()
    expected = average_velocity_step_reference(*(t.contiguous() for t in strided), *SIGMAS)
    for outputs in (
        average_velocity_step(*strided, *SIGMAS),
        average_velocity_step_triton(*strided, [SIGMAS[1] - SIGMAS[0]], [SIGMAS[2] - SIGMAS[1]]),
    ):
        for out, ref in zip(outputs, expected, strict=True):
            torch.testing.assert_close(out, ref)


def test_gradcheck_backward_and_forward_mode_in_float64():
    inputs = [t.requires_grad_() for t in _inputs((3, 4), torch.float64)]
    sigmas = _per_sample_sigmas(3, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: average_velocity_step(*t, *sigmas), inputs, check_forward_ad=True)


def test_backward_matches_autograd_through_the_reference():
    inputs = [t.requires_grad_() for t in _inputs((2, 5, 3), torch.float32)]
    weights = [torch.randn(2, 5, 3), torch.randn(2, 5, 3)]
    sigmas = _per_sample_sigmas(2)

    def loss(fn):
        z_next, u_hat = fn(*inputs, *sigmas)
        return (z_next * weights[0]).sum() + (u_hat * weights[1]).sum()

    ours = torch.autograd.grad(loss(average_velocity_step), inputs)
    expected = torch.autograd.grad(loss(lambda *a: _composite(*a)), inputs)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_func_jvp_and_grad_and_forward_ad():
    primals = _inputs((4, 6), torch.float64)
    tangents = _inputs((4, 6), torch.float64, seed=1)

    def op(*t):
        return average_velocity_step(*t, *SIGMAS)

    def composite(*t):
        return _composite(*t, *SIGMAS)

    _, ours = torch.func.jvp(op, tuple(primals), tuple(tangents))
    _, expected = torch.func.jvp(composite, tuple(primals), tuple(tangents))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)

    def scalar(fn):
        return lambda z: fn(z, *primals[1:])[1].square().sum()

    torch.testing.assert_close(torch.func.grad(scalar(op))(primals[0]), torch.func.grad(scalar(composite))(primals[0]))

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(primals[0], tangents[0])  # only z carries a tangent
        z_next, u_hat = average_velocity_step(dual, *primals[1:], *SIGMAS)
        z_t, u_t = fwAD.unpack_dual(z_next).tangent, fwAD.unpack_dual(u_hat).tangent
    zero = torch.zeros_like(primals[0])
    _, (exp_z_t, exp_u_t) = torch.func.jvp(composite, tuple(primals), (tangents[0], zero, zero, zero))
    torch.testing.assert_close(z_t, exp_z_t)
    torch.testing.assert_close(u_t, exp_u_t)


def test_torch_compile_traces_the_op(fresh_dynamo):
    """Traced whole, with no warning from Dynamo (it warns of possible silent incorrectness when it traces through
    a cache wrapper such as ``functools.cache``, so none may be on the op's path)."""
    inputs = _inputs((2, 33), torch.float32)
    compiled = torch.compile(lambda *t: average_velocity_step(*t, *SIGMAS), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = compiled(*inputs)
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    for out, ref in zip(outputs, average_velocity_step_reference(*inputs, *SIGMAS), strict=True):
        torch.testing.assert_close(out, ref)


def test_meta_implementation_gives_shapes():
    inputs = [torch.empty(2, 3, device="meta", dtype=torch.bfloat16) for _ in range(4)]
    z_next, u_hat = average_velocity_step(*inputs, *SIGMAS)
    assert z_next.shape == (2, 3) and u_hat.dtype == torch.bfloat16 and z_next.device.type == "meta"


def test_span_one_estimate_is_plain_reuse():
    """With the anchor one Euler step back, ubar equals the anchor velocity and u_hat = v_last."""
    g = torch.Generator().manual_seed(1)
    z_anchor, v = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    sigma_anchor, sigma, sigma_next = 0.8, 0.75, 0.7
    z = z_anchor + (sigma - sigma_anchor) * v
    z_next, u_hat = average_velocity_step(z, v, z_anchor, v, sigma_anchor, sigma, sigma_next)
    torch.testing.assert_close(u_hat, v, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_next, z + (sigma_next - sigma) * v, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda t: t.__setitem__(2, torch.randn(3, 4)), ValueError, r"z_anchor has shape \(3, 4\) but z has shape"),
        (lambda t: t.__setitem__(1, torch.ones(2, 3, dtype=torch.int32)), TypeError, "v_last must have a floating"),
        (lambda t: t.__setitem__(3, t[3].double()), TypeError, "v_anchor has dtype torch.float64 but z has"),
        (lambda t: t.__setitem__(1, t[1].to("meta")), ValueError, "v_last is on meta but z is on cpu"),
    ],
)
def test_bad_tensors_get_clear_errors(change, error, message):
    inputs = _inputs((2, 3), torch.float32)
    change(inputs)
    with pytest.raises(error, match=message):
        average_velocity_step(*inputs, *SIGMAS)


@pytest.mark.parametrize(
    ("sigmas", "error", "message"),
    [
        ((0.5, 0.5, 0.4), ValueError, r"sigma \(0.5\) must differ from sigma_anchor"),
        ((0.6, 0.5, float("nan")), ValueError, "sigma_next must be finite, got nan"),
        ((0.6, torch.tensor([0.5, 0.4, 0.3]), 0.2), ValueError, r"one value per sample \(2 for z of shape \(2, 3\)\)"),
        (
            (0.6, torch.tensor([0.5, 0.6], dtype=torch.float64), 0.2),
            ValueError,
            r"must differ from sigma_anchor.*\(sample 1\)",
        ),
        ((0.6, torch.tensor(5), 0.2), TypeError, "sigma must be a floating tensor"),
        (("0.6", 0.5, 0.2), TypeError, "sigma_anchor must be a real number or a tensor, got str"),
        ((0.6, torch.tensor(0.5, requires_grad=True), 0.2), ValueError, "sigma requires grad"),
    ],
)
def test_bad_sigmas_get_clear_errors(sigmas, error, message):
    with pytest.raises(error, match=message):
        average_velocity_step(*_inputs((2, 3), torch.float32), *sigmas)


def test_the_kernel_checks_its_own_inputs():
    inputs = _inputs((2, 3), torch.float32)
    same = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must differ from sigma_anchor"):
        torch.ops.meancache.average_velocity_step(*inputs, same, same, same)
    with pytest.raises(RuntimeError, match="must be a 1-D float64 tensor"):
        torch.ops.meancache.average_velocity_step(*inputs, same.float(), same, same)
    tables = [torch.tensor([value], dtype=torch.float64) for value in SIGMAS]
    o = torch.empty(2, 3)
    flat = torch.empty(7)
    for out, message in [
        ((o, o), "out z_next shares memory with the output u_hat"),
        ((o, inputs[0]), "out u_hat shares memory with the input z"),
        ((flat[1:].view(2, 3), o), "out z_next shares memory with the input v_last without being exactly"),
    ]:
        args = (inputs[0], flat[:6].view(2, 3), *inputs[2:]) if "v_last" in message else inputs
        with pytest.raises(ValueError, match=message):
            torch.ops.meancache.average_velocity_step.out(*args, *tables, z_next=out[0], u_hat=out[1])


def test_a_derivative_is_recorded_only_when_needed():
    """The fast path: no tensor needs a derivative, so no autograd node is made (and none is needed)."""
    inputs = _inputs((2, 3), torch.float32)
    z_next, u_hat = average_velocity_step(*inputs, *SIGMAS)
    assert z_next.grad_fn is None and u_hat.grad_fn is None
    inputs[1].requires_grad_(True)
    z_next, _ = average_velocity_step(*inputs, *SIGMAS)
    assert z_next.grad_fn is not None


@pytest.mark.parametrize("implementation", ["op", "triton"])
def test_out_writes_into_the_given_tensors(implementation):
    inputs = _inputs((3, 41), torch.float32)
    out = (torch.full((3, 41), float("nan")), torch.full((3, 41), float("nan")))
    if implementation == "op":
        result = average_velocity_step(*inputs, *SIGMAS, out=out)
    else:
        result = average_velocity_step_triton(*inputs, [SIGMAS[1] - SIGMAS[0]], [SIGMAS[2] - SIGMAS[1]], out=out)
    assert result[0] is out[0] and result[1] is out[1]
    for got, ref in zip(out, average_velocity_step_reference(*inputs, *SIGMAS), strict=True):
        torch.testing.assert_close(got, ref)


def test_out_can_overwrite_an_input_slot():
    """The estimator writes u_hat over a dead history slot; elementwise, aliasing an input is safe too."""
    inputs = _inputs((5, 7), torch.float32)
    expected = average_velocity_step_reference(*inputs, *SIGMAS)
    z_next = torch.empty(5, 7)
    average_velocity_step(*inputs, *SIGMAS, out=(z_next, inputs[1]))  # u_hat over v_last
    torch.testing.assert_close(inputs[1], expected[1])
    torch.testing.assert_close(z_next, expected[0])


def test_bad_out_gets_clear_errors():
    inputs = _inputs((2, 3), torch.float32)
    with pytest.raises(ValueError, match=r"out u_hat must match z \(shape \(2, 3\)"):
        average_velocity_step(*inputs, *SIGMAS, out=(torch.empty(2, 3), torch.empty(3, 2)))
    with pytest.raises(ValueError, match="out z_next must be contiguous"):
        average_velocity_step(*inputs, *SIGMAS, out=(torch.empty(3, 2).t(), torch.empty(2, 3)))
    with pytest.raises(TypeError, match="out must be a tuple of two tensors"):
        average_velocity_step(*inputs, *SIGMAS, out=torch.empty(2, 3))
    inputs[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"out=\.\.\.\) is not differentiable"):
        average_velocity_step(*inputs, *SIGMAS, out=(torch.empty(2, 3), torch.empty(2, 3)))


def test_more_than_2_pow_24_elements():
    n = 2**24 + 7
    inputs = [torch.randn(n, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    z_next, u_hat = average_velocity_step(*inputs, *SIGMAS)
    picks = torch.tensor([0, 2**24 - 1, 2**24, 2**24 + 6])  # around the 2^24 boundary
    ref_z, ref_u = average_velocity_step_reference(*(t[picks] for t in inputs), *SIGMAS)
    torch.testing.assert_close(z_next[picks], ref_z)
    torch.testing.assert_close(u_hat[picks], ref_u)


def test_without_the_cpp_build_it_warns_once_and_falls_back():
    import subprocess
    import sys

    script = """
import sys, warnings, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "meancache._C":
            raise ImportError("simulated missing build")
sys.meta_path.insert(0, Hide())
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from meancache.ops import average_velocity_step, average_velocity_step_reference
    t = [torch.randn(3, 4) for _ in range(4)]
    for _ in range(3):
        out = average_velocity_step(*t, 0.9, 0.7, 0.6)
ref = average_velocity_step_reference(*t, 0.9, 0.7, 0.6)
assert all(torch.equal(a, b) for a, b in zip(out, ref))
messages = [str(w.message) for w in caught if "C++ extension is not built" in str(w.message)]
print(len(messages), messages[0])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    count, message = result.stdout.strip().split(" ", 1)
    assert count == "1" and "simulated missing build" in message and "pip install --no-build-isolation" in message


def test_out_overlapping_another_output_or_z_is_refused():
    """Item 15 of issue #15: these aliasings used to return silently wrong results."""
    inputs = _inputs((4, 8), torch.float32)
    o = torch.empty(4, 8)
    with pytest.raises(ValueError, match="out z_next shares memory with the output u_hat"):
        average_velocity_step(*inputs, *SIGMAS, out=(o, o))
    with pytest.raises(ValueError, match=r"out u_hat shares memory with the input z.*u_hat over exactly v_anchor"):
        average_velocity_step(*inputs, *SIGMAS, out=(o, inputs[0]))
    flat = torch.randn(33)
    v_last, shifted = flat[:32].view(4, 8), flat[1:].view(4, 8)  # the same memory, one element apart
    with pytest.raises(ValueError, match="out u_hat shares memory with the input v_last"):
        average_velocity_step(inputs[0], v_last, *inputs[2:], *SIGMAS, out=(o, shifted))


def test_out_in_place_over_the_same_elements_is_exact():
    inputs = _inputs((4, 8), torch.float32)
    expected = average_velocity_step_reference(*inputs, *SIGMAS)
    u_hat = torch.empty(4, 8)
    average_velocity_step(*inputs, *SIGMAS, out=(inputs[0], u_hat))  # z_next over z
    torch.testing.assert_close(inputs[0], expected[0])
    torch.testing.assert_close(u_hat, expected[1])


def test_numpy_scalar_sigmas_are_accepted():
    import numpy as np

    inputs = _inputs((2, 3), torch.float32)
    expected = average_velocity_step(*inputs, *(float(np.float32(s)) for s in SIGMAS))
    for kind in (np.float32, np.float64):
        result = average_velocity_step(*inputs, *(kind(s) for s in SIGMAS))
        for out, ref in zip(result, expected, strict=True):
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("op", [average_velocity_step, average_velocity_step_reference])
def test_an_empty_batch_gives_empty_outputs(op):
    """Item 17 of issue #15: per-sample sigmas of an empty batch are empty too."""
    z = torch.empty(0, 4)
    empty = torch.empty(0)
    for sigmas in ((empty, empty, empty), (empty, 0.5, 0.2), SIGMAS):
        z_next, u_hat = op(z, z, z, z, *sigmas)
        assert z_next.shape == u_hat.shape == (0, 4)
