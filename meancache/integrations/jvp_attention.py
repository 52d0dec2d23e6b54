"""Switch a diffusers transformer's attention to :func:`meancache.ops.attention`, and back.

After :func:`enable_jvp_attention`, ``torch.func.jvp`` (or ``torch.autograd.forward_ad``) runs through the
whole transformer, each attention computing its output and tangent in one fused pass; plain forward and
backward keep working. Works for every model whose attention processors go through diffusers' native
backends (``native`` and the ``_native_*`` ones that call ``scaled_dot_product_attention``: FLUX.1,
Qwen-Image, HunyuanVideo, SD3, ...), with no processor copies and no class patches:

* :class:`JVPAttentionHook` is registered in the transformer's ``HookRegistry`` as ``"jvp_attention"``;
  around each forward it activates
* :class:`SDPAToJVPAttention`, a ``TorchFunctionMode`` that answers
  ``torch.nn.functional.scaled_dot_product_attention`` with :func:`meancache.ops.attention` (boolean masks,
  no dropout, no causal flag, no grouped-query attention: anything else gets a clear error).

A forward in which no attention call reached it (another attention backend was selected) raises instead
of silently differentiating nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from meancache.ops.jvp_attention import attention

HOOK_NAME = "jvp_attention"
_SDPA_BACKENDS = (None, "native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn")
"""diffusers attention backends that call ``scaled_dot_product_attention`` (None: the global default)."""


class SDPAToJVPAttention(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)`` calls ``attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return _sdpa_as_attention(*args, **kwargs)


def _sdpa_as_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    unsupported = {"dropout_p": dropout_p != 0.0, "is_causal": is_causal, "enable_gqa": enable_gqa}
    for name, used in unsupported.items():
        if used:
            raise NotImplementedError(f"meancache JVP attention does not support {name}; it was given")
    return attention(query, key, value, attn_mask=_as_boolean_mask(attn_mask), scale=scale)


MASKED_BIAS = -1e4
"""An additive mask entry at or below this excludes its key: ``exp(-1e4)`` is 0 in every floating dtype."""


def _as_boolean_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An additive float mask as the boolean mask it stands for (True = attend), when it is one: every entry 0 (attend)
    or at most ``MASKED_BIAS`` (-inf, or the ``-10000`` of LTX-Video's key padding), and every
    row attending to some key (where all keys are masked, SDPA attends uniformly and the boolean op gives 0). Any
    other float mask (a real bias) is refused, naming it."""
    if mask is None or mask.dtype == torch.bool or not mask.is_floating_point():
        return mask
    attend = mask == 0
    if bool(((attend | (mask <= MASKED_BIAS)).all() & attend.any(dim=-1).all()).item()):  # one host sync per call
        return attend
    bias = mask[~attend & (mask > MASKED_BIAS)]
    if bias.numel():
        raise TypeError(
            "meancache JVP attention takes boolean masks, and additive masks of 0 (attend) and <= -1e4 or -inf "
            f"(masked) entries; this {mask.dtype} mask holds other values (e.g. {bias[0].item():.4g}), a real "
            "attention bias"
        )
    raise TypeError("meancache JVP attention: this additive mask masks every key of some query rows")


@contextmanager
def sdpa_as_jvp_attention(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module``'s forward calls inside with :class:`SDPAToJVPAttention` active; raise if none of its
    attention calls reached it."""
    with SDPAToJVPAttention() as mode:
        yield
    if mode.calls == 0:
        raise RuntimeError(
            f"JVP attention is on for this {type(module).__name__} but none of its attention calls went through "
            "scaled_dot_product_attention; select diffusers' native attention backend "
            "(transformer.reset_attention_backend())"
        )


class JVPAttentionHook(ModelHook):
    """Transformer-root hook: runs each forward with :class:`SDPAToJVPAttention` active."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with sdpa_as_jvp_attention(module):
            return self.fn_ref.original_forward(*args, **kwargs)


def enable_jvp_attention(transformer: torch.nn.Module) -> None:
    """Make ``transformer``'s attention forward-differentiable with the fused kernel (undo with
    :func:`disable_jvp_attention`)."""
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
    for name, module in transformer.named_modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        backend = getattr(backend, "value", backend)
        if backend not in _SDPA_BACKENDS:
            raise ValueError(
                f"{name} uses the attention backend {backend!r}; JVP attention replaces only the native ones "
                f"({[b for b in _SDPA_BACKENDS if b]}): call transformer.reset_attention_backend() first"
            )
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise RuntimeError("JVP attention is already enabled on this transformer")
    registry.register_hook(JVPAttentionHook(), HOOK_NAME)


def disable_jvp_attention(transformer: torch.nn.Module) -> None:
    """Give ``transformer`` back its own attention."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        raise ValueError(f"JVP attention is not enabled on this {type(transformer).__name__}")
    registry.remove_hook(HOOK_NAME, recurse=False)


def is_jvp_attention_enabled(transformer: torch.nn.Module) -> bool:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(HOOK_NAME) is not None
