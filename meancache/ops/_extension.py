"""Loading the compiled C++ operators (``meancache._C``), built by ``pip install`` from ``csrc/``."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch


@functools.cache
def cpp_ops() -> Any | None:
    """``torch.ops.meancache`` when the C++ extension is built, else ``None`` after one warning."""
    try:
        import meancache._C  # noqa: F401  (registers torch.ops.meancache.*)
    except ImportError as e:
        warnings.warn(
            f"meancache's C++ extension is not built ({e}); CPU ops fall back to PyTorch. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return torch.ops.meancache
