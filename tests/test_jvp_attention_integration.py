import pytest
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.nn.attention import SDPBackend, sdpa_kernel

from meancache.integrations.jvp_attention import (
    SDPAToJVPAttention,
    disable_jvp_attention,
    enable_jvp_attention,
    is_jvp_attention_enabled,
)
from meancache.testing import tiny_inputs, tiny_pipeline


class _FirstCall(ModelHook):
    """Keeps the keyword arguments of the transformer's first call in a real pipeline run."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs = None

    def new_forward(self, module, *args, **kwargs):
        if self.kwargs is None:
            self.kwargs = dict(kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


def _transformer_and_call(kind):
    """The tiny pipeline's transformer in float64 and a function of (hidden_states, timestep) calling it with
    the arguments the pipeline passes (padded prompts for HunyuanVideo, so its masks matter)."""
    pipe = tiny_pipeline(kind)
    inputs = tiny_inputs(kind)
    if kind == "hunyuan-video":
        inputs["prompt_attention_mask"][:, 4:] = 0
    if kind == "qwen-image":
        inputs["prompt_embeds_mask"][:, 5:] = 0
    capture = _FirstCall()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(capture, "capture")
    pipe(**inputs, num_inference_steps=2, output_type="latent")
    registry.remove_hook("capture", recurse=False)
    transformer = pipe.transformer.double()
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in capture.kwargs.items()}
    hidden, timestep = kwargs.pop("hidden_states"), kwargs.pop("timestep")
    kwargs["return_dict"] = False

    def call(h, t):
        return transformer(hidden_states=h, timestep=t, **kwargs)[0]

    return transformer, call, (hidden, timestep), (torch.randn_like(hidden), torch.ones_like(timestep))


@pytest.mark.parametrize("kind", ("flux", "qwen-image", "hunyuan-video"))
def test_whole_transformer_jvp_equals_jvp_with_math_sdpa(kind):
    transformer, call, primals, tangents = _transformer_and_call(kind)
    with sdpa_kernel(SDPBackend.MATH):
        reference = torch.func.jvp(call, primals, tangents)
    with pytest.raises(NotImplementedError, match="forward AD"):  # what users hit without this library
        torch.func.jvp(call, primals, tangents)
    enable_jvp_attention(transformer)
    assert is_jvp_attention_enabled(transformer)
    ours = torch.func.jvp(call, primals, tangents)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(primals[0], tangents[0])
        tangent = torch.autograd.forward_ad.unpack_dual(call(dual, primals[1])).tangent
    with sdpa_kernel(SDPBackend.MATH):
        hidden_only = torch.func.jvp(call, primals, (tangents[0], torch.zeros_like(tangents[1])))[1]
    torch.testing.assert_close(tangent, hidden_only, atol=1e-10, rtol=1e-10)
    disable_jvp_attention(transformer)
    assert not is_jvp_attention_enabled(transformer)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(call, primals, tangents)


def test_plain_forward_and_backward_are_unchanged():
    transformer, call, (hidden, timestep), _ = _transformer_and_call("flux")
    leaf = hidden.clone().requires_grad_()
    expected = call(leaf, timestep)
    expected.square().sum().backward()
    expected_grad = leaf.grad.clone()
    enable_jvp_attention(transformer)
    leaf.grad = None
    out = call(leaf, timestep)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(leaf.grad, expected_grad, atol=1e-10, rtol=1e-10)


def test_other_attention_backends_are_refused():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    transformer, *_ = _transformer_and_call("flux")
    default = _AttentionBackendRegistry._active_backend
    transformer.set_attention_backend("flex")  # also makes flex diffusers' global default: restored below
    try:
        with pytest.raises(ValueError, match="'flex'"):
            enable_jvp_attention(transformer)
    finally:
        transformer.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(default)
    enable_jvp_attention(transformer)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_jvp_attention(transformer)
    disable_jvp_attention(transformer)
    with pytest.raises(ValueError, match="not enabled"):
        disable_jvp_attention(transformer)


def test_a_forward_that_never_reaches_sdpa_raises():
    from diffusers.models.attention_dispatch import attention_backend

    transformer, call, primals, _ = _transformer_and_call("flux")
    enable_jvp_attention(transformer)
    with torch.no_grad(), attention_backend("flex"), pytest.raises(RuntimeError, match="native attention backend"):
        call(*primals)


@pytest.mark.parametrize("masked", (-1e4, float("-inf")))
def test_additive_padding_masks_run_as_the_boolean_masks_they_stand_for(masked):
    """Key padding as an additive float mask (0 or -10000 as LTX-Video passes it, or -inf): under JVP attention it
    gives SDPA's output and tangent (math backend, float64)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, q_t, k_t, v_t = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(6))
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[0, ..., 3:] = masked
    mask[1, ..., 1:] = masked

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.func.jvp(sdpa, (q, k, v), (q_t, k_t, v_t))
    with SDPAToJVPAttention() as mode:
        got = torch.func.jvp(sdpa, (q, k, v), (q_t, k_t, v_t))
    assert mode.calls == 1
    for g_, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g_, e)


@pytest.mark.parametrize(
    ("value", "error"), [(-0.5, r"holds other values \(e.g. -0.5\), a real attention bias"), (-1e4, r"every key")]
)
def test_additive_masks_that_are_not_padding_are_refused(value, error):
    q = torch.randn(1, 1, 3, 4)
    mask = torch.full((1, 1, 3, 3), value)
    if value > -1e4:
        mask[..., 0] = 0  # every row attends somewhere; -0.5 is a bias
    with SDPAToJVPAttention(), pytest.raises(TypeError, match=error):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
