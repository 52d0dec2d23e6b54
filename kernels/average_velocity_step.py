r"""Triton kernel for the average-velocity step (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

With ``d = sigma - sigma_anchor`` and ``h = sigma_next - sigma`` (one pair per sample, or one for all):

.. math::

    \hat u = v_{last} + h \, \frac{(z - z_r)/d - v_r}{d}, \qquad z_{next} = z + h\,\hat u

One program handles ``BLOCK`` contiguous elements: each input element is read once and both outputs are
written once, with the math in float32 (float64 for float64 inputs). Plain pointer arithmetic only (no
block pointers), so the kernel compiles with older Triton releases too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def average_velocity_step_kernel(
    z_ptr,
    v_last_ptr,
    z_anchor_ptr,
    v_anchor_ptr,
    d_ptr,
    h_ptr,
    z_next_ptr,
    u_hat_ptr,
    d_scalar,
    h_scalar,
    n_elements,
    per_sample,
    PER_SAMPLE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    if PER_SAMPLE:
        sample = offsets // per_sample
        d = tl.load(d_ptr + sample, mask=mask, other=1.0).to(COMPUTE)
        h = tl.load(h_ptr + sample, mask=mask, other=0.0).to(COMPUTE)
    else:  # float32 scalars (float64 always takes the per-sample path)
        d = d_scalar
        h = h_scalar
    z = tl.load(z_ptr + offsets, mask=mask).to(COMPUTE)
    v_last = tl.load(v_last_ptr + offsets, mask=mask).to(COMPUTE)
    z_anchor = tl.load(z_anchor_ptr + offsets, mask=mask).to(COMPUTE)
    v_anchor = tl.load(v_anchor_ptr + offsets, mask=mask).to(COMPUTE)
    ubar = (z - z_anchor) / d
    jvp = (ubar - v_anchor) / d
    u_hat = v_last + h * jvp
    z_next = z + h * u_hat
    tl.store(u_hat_ptr + offsets, u_hat.to(u_hat_ptr.dtype.element_ty), mask=mask)
    tl.store(z_next_ptr + offsets, z_next.to(z_next_ptr.dtype.element_ty), mask=mask)


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def compile_configs() -> list[tuple[dict[str, str], dict[str, object], dict[str, int]]]:
    """Every (signature, constexprs, options) the launcher below can produce, for ahead-of-time compile checks.

    Triton specialises the two sizes to 32- or 64-bit integers by value, so both widths are listed."""
    configs = []
    for dtype, name in _TRITON_DTYPES.items():
        compute = "fp64" if dtype == torch.float64 else "fp32"
        for per_sample in (True,) if dtype == torch.float64 else (False, True):
            table = compute if per_sample else name  # without per-sample tables the launcher passes z itself
            for size in ("i32", "i64"):
                signature = {
                    **dict.fromkeys(("z_ptr", "v_last_ptr", "z_anchor_ptr", "v_anchor_ptr"), f"*{name}"),
                    **dict.fromkeys(("d_ptr", "h_ptr"), f"*{table}"),
                    **dict.fromkeys(("z_next_ptr", "u_hat_ptr"), f"*{name}"),
                    **dict.fromkeys(("d_scalar", "h_scalar"), "fp32"),
                    **dict.fromkeys(("n_elements", "per_sample"), size),
                    **dict.fromkeys(("PER_SAMPLE", "COMPUTE", "BLOCK"), "constexpr"),
                }
                compute_type = tl.float64 if compute == "fp64" else tl.float32
                constexprs = {"PER_SAMPLE": per_sample, "COMPUTE": compute_type, "BLOCK": BLOCK}
                configs.append((signature, constexprs, {"num_warps": NUM_WARPS}))
    return configs


def average_velocity_step_triton(
    z: torch.Tensor,
    v_last: torch.Tensor,
    z_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    d: list[float],
    h: list[float],
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Tensors: one shape, dtype and device; ``d`` / ``h``: one value, or one per sample
    (along dim 0). Non-contiguous inputs are copied to contiguous ones first. ``out``: contiguous
    ``(z_next, u_hat)`` to write into instead of new tensors."""
    z, v_last, z_anchor, v_anchor = (t.contiguous() for t in (z, v_last, z_anchor, v_anchor))
    z_next, u_hat = out if out is not None else (torch.empty_like(z), torch.empty_like(z))
    n = z.numel()
    if n == 0:
        return z_next, u_hat
    compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    # Scalar kernel arguments are float32 in Triton, so float64 coefficients always travel through memory.
    per_sample = len(d) > 1 or compute_dtype == torch.float64
    if per_sample:
        d_arg = torch.tensor(d, dtype=compute_dtype).to(z.device, non_blocking=True)
        h_arg = torch.tensor(h, dtype=compute_dtype).to(z.device, non_blocking=True)
        d_scalar, h_scalar = 1.0, 0.0
    else:
        d_arg, h_arg = z, z  # unused by the kernel when PER_SAMPLE is false
        d_scalar, h_scalar = d[0], h[0]
    grid = (triton.cdiv(n, BLOCK),)
    elements_per_sample = n // len(d) if len(d) > 1 else n
    average_velocity_step_kernel[grid](
        z, v_last, z_anchor, v_anchor, d_arg, h_arg, z_next, u_hat, d_scalar, h_scalar, n, elements_per_sample,
        PER_SAMPLE=per_sample, COMPUTE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return z_next, u_hat
