"""Checks of command-line arguments that the library cannot make for the CLI: devices, output paths and
prompts for the bundled models. Each raises a ``ValueError`` naming the flag, the value and what is allowed;
``meancache`` runs them before any work starts, so nothing is loaded, generated or written for bad input."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from meancache.models import is_digits_model

DIGIT_PROMPTS = tuple(str(d) for d in range(10))


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` names a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{flag} {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1): {e}") from e
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for a backend it was built without
        raise ValueError(f"{flag} {device!r} is not available on this machine: {e}") from e
    return device


def image_suffixes(animated: bool = False) -> set[str]:
    """File extensions PIL can write an image to (``.png``, ``.jpg``, ...); ``animated``: an animated image to
    (``.gif``, ``.png``, ``.webp``, ...)."""
    writers = Image.SAVE_ALL if animated else Image.SAVE
    return {suffix for suffix, kind in Image.registered_extensions().items() if kind in writers}


def check_output_file(path: Path, flag: str, image: bool = False, animated: bool = False) -> None:
    """``path`` can be written: it is not a directory, an existing file there is writable, and its nearest
    existing folder is a writable directory (missing folders are created when the file is written); an image
    also needs an extension PIL can write, an ``animated`` one an extension PIL writes animations to."""
    if animated and path.suffix.lower() not in image_suffixes(animated=True):
        raise ValueError(
            f"{flag} {str(path)!r} needs an animated image file extension PIL can write (e.g. .gif, .png, .webp), "
            f"got {path.suffix or 'none'!r}"
        )
    if image and path.suffix.lower() not in image_suffixes():
        raise ValueError(
            f"{flag} {str(path)!r} needs an image file extension PIL can write (e.g. .png, .jpg, .webp), "
            f"got {path.suffix or 'none'!r}"
        )
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r} exists and is not writable")
    _check_writable_folder(path.parent, flag, path)


def check_output_dir(path: Path, flag: str) -> None:
    """``path`` is a writable directory, or can be created as one (nothing is created here)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a directory")
    _check_writable_folder(path, flag, path)


def _check_writable_folder(folder: Path, flag: str, path: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be written: the folder {str(existing)!r} is not writable")


def check_prompts(model: str, prompts: Sequence[str], flag: str = "--prompt") -> None:
    """A bundled digits model (or a folder holding one) draws a digit: each prompt must be 0-9."""
    if is_digits_model(model):
        bad = [p for p in prompts if p not in DIGIT_PROMPTS]
        if bad:
            raise ValueError(f"{model} draws a digit: {flag} must be 0-9, got {bad[0]!r}")
