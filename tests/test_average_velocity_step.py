import pytest
import torch

from meancache.ops import average_velocity_step, average_velocity_step_reference
from meancache.ops._extension import cpp_ops
from tests.tolerance import assert_close_by_own_rounding

SIGMAS = (0.93, 0.71, 0.64)  # sigma_anchor, sigma, sigma_next
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1,), (17,), (3, 5, 7), (2, 4099), (1, 16, 3, 5, 11))


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


def _composite(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next):
    """The equations written out in whatever dtype the inputs have (no upcast)."""
    ubar = (z - z_anchor) / (sigma - sigma_anchor)
    jvp = (ubar - v_anchor) / (sigma - sigma_anchor)
    u_hat = v_last + (sigma_next - sigma) * jvp
    return z + (sigma_next - sigma) * u_hat, u_hat


def test_cpp_extension_is_built_and_registered():
    assert cpp_ops() is not None, "pip install did not build meancache._C"
    assert hasattr(torch.ops.meancache, "average_velocity_step")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_kernel_matches_reference(shape, dtype):
    inputs = _inputs(shape, dtype)
    fused = torch.ops.meancache.average_velocity_step(*inputs, *SIGMAS)
    reference = _composite(*(t.double() for t in inputs), *SIGMAS)
    lowp = _composite(*inputs, *SIGMAS)
    for out, ref, low in zip(fused, reference, lowp, strict=True):
        assert out.dtype == dtype and out.shape == inputs[0].shape
        assert_close_by_own_rounding(out, low, ref)
    for out, ref in zip(fused, average_velocity_step_reference(*inputs, *SIGMAS), strict=True):
        assert_close_by_own_rounding(out, ref, ref.double())


def test_dispatch_uses_the_kernel_on_cpu_and_accepts_non_contiguous_inputs():
    base = _inputs((6, 10), torch.float32)
    strided = [t.t() for t in base]  # (10, 6), non-contiguous
    assert not strided[0].is_contiguous()
    z_next, u_hat = average_velocity_step(*strided, *SIGMAS)
    ref_z, ref_u = average_velocity_step_reference(*(t.contiguous() for t in strided), *SIGMAS)
    torch.testing.assert_close(z_next, ref_z)
    torch.testing.assert_close(u_hat, ref_u)


def test_reference_is_differentiable_in_float64():
    inputs = [t.requires_grad_() for t in _inputs((3, 4), torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: average_velocity_step(*t, *SIGMAS), inputs)


def test_meta_implementation_gives_shapes():
    inputs = [torch.empty(2, 3, device="meta", dtype=torch.bfloat16) for _ in range(4)]
    z_next, u_hat = torch.ops.meancache.average_velocity_step(*inputs, *SIGMAS)
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
        (
            lambda t: t.__setitem__(1, torch.ones(2, 3, dtype=torch.int32)),
            TypeError,
            "v_last must have a floating dtype",
        ),
        (
            lambda t: t.__setitem__(3, t[3].double()),
            TypeError,
            "v_anchor has dtype torch.float64 but z has torch.float32",
        ),
        (lambda t: t.__setitem__(1, t[1].to("meta")), ValueError, "v_last is on meta but z is on cpu"),
    ],
)
def test_bad_tensors_get_clear_errors(change, error, message):
    inputs = _inputs((2, 3), torch.float32)
    change(inputs)
    with pytest.raises(error, match=message):
        average_velocity_step(*inputs, *SIGMAS)


def test_bad_sigmas_get_clear_errors():
    inputs = _inputs((2, 3), torch.float32)
    with pytest.raises(ValueError, match=r"sigma \(0.5\) must differ from sigma_anchor"):
        average_velocity_step(*inputs, 0.5, 0.5, 0.4)
    with pytest.raises(ValueError, match=r"sigma_next must be finite"):
        average_velocity_step(*inputs, 0.6, 0.5, float("nan"))
    with pytest.raises(RuntimeError, match=r"must differ from sigma_anchor"):  # the kernel checks too
        torch.ops.meancache.average_velocity_step(*inputs, 0.5, 0.5, 0.4)
