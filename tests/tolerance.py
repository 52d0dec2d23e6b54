"""flash-attention's tolerance idiom: judge each dtype by its own rounding.

A kernel's error against a float64 reference may be at most twice the error that the plain PyTorch
computation *in the kernel's storage dtype* makes against the same reference, plus an absolute floor.
"""

import torch


def assert_close_by_own_rounding(
    actual: torch.Tensor, lowp: torch.Tensor, reference: torch.Tensor, atol: float = 1e-6
) -> None:
    kernel_err = (actual.double() - reference.double()).abs().max().item()
    lowp_err = (lowp.double() - reference.double()).abs().max().item()
    bound = 2 * lowp_err + atol
    assert kernel_err <= bound, f"error {kernel_err:.3e} > 2 x {lowp_err:.3e} (PyTorch in {lowp.dtype}) + {atol:g}"
