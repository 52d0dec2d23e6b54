"""Checks shared by the library and the command line: one helper per concern, each raising an error that
names the value (``name``: an argument, a JSON key, a command-line flag) and what is allowed."""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
from collections.abc import Iterable
from typing import Any

MAX_STEPS = 10_000
"""The largest sampler step count a schedule or calibration may describe (a schedule holds one entry per
step; real samplers run tens of steps)."""


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an ``int``: an integer (Python or numpy; not a bool) in ``[minimum, maximum]``."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    number = operator.index(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {allowed}, got {number}")
    return number


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite ``float``: any real scalar (Python, numpy; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}")
    return number


def check_sigmas(values: Iterable[Any], name: str = "sigmas") -> list[float]:
    """Noise levels of a sampler run as floats: at least 2 (``N + 1`` for ``N`` steps, at most
    ``MAX_STEPS + 1``), real, finite and strictly decreasing (noise to data)."""
    sigmas = [check_real(s, f"{name}[{i}]") for i, s in enumerate(values)]
    if not 2 <= len(sigmas) <= MAX_STEPS + 1:
        raise ValueError(f"{name} needs 2 to {MAX_STEPS + 1} values (N + 1 for N steps), got {len(sigmas)}")
    for i in range(1, len(sigmas)):
        if sigmas[i] >= sigmas[i - 1]:
            raise ValueError(
                f"{name} must be strictly decreasing (noise to data), but {name}[{i}] = {sigmas[i]!r} follows "
                f"{sigmas[i - 1]!r}"
            )
    return sigmas


def check_metadata(value: Any, name: str = "metadata") -> dict[str, Any]:
    """A copy of ``value``, which must be a dict (a JSON object)."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict (a JSON object), got {value!r} ({type(value).__name__})")
    return dict(value)


def load_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ValueError`` naming the file if it is not UTF-8 JSON holding an
    object (the ``OSError`` of a missing or unreadable file names it too)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a {what} JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(data).__name__}, not a {what} object")
    return data
