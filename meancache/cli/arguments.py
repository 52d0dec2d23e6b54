"""Checks of command-line arguments that the library cannot make for the CLI: devices, output paths and
prompts for the bundled models. Each raises a ``ValueError`` naming the flag, the value and what is allowed;
``meancache`` runs them before any work starts, so nothing is loaded, generated or written for bad input."""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from meancache.models import BUNDLED_MODELS, is_digits_model

DIGIT_PROMPTS = tuple(str(d) for d in range(10))


class RefusedArgument(ValueError):
    """An argument found bad only once a command's work has begun, before that work changed anything (a key
    ``calibrations clear`` matches no stored calibration): ``meancache`` exits 2 for it, as for every check."""


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


def check_output_file(path: Path, flag: str, image: bool = False, animated: bool = False, suffix: str = "") -> None:
    """``path`` can be written: it is not a directory, its folder exists and a file can be created in it (tried
    with a temporary file, removed at once), and an existing file there is writable; an ``image`` needs an
    extension PIL can write, an ``animated`` one an extension PIL writes animations to, and a ``suffix`` (such as
    ``.json``) that extension."""
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {str(path)!r} needs the file extension {suffix!r}, got {path.suffix or 'none'!r}")
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
    folder = path.parent
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a directory"
        raise ValueError(f"{flag} {str(path)!r} cannot be written: its folder {str(folder)!r} {problem}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r} exists and is not writable")
    _check_writable_folder(folder, flag, path)


def check_output_dir(path: Path, flag: str) -> None:
    """``path`` is a writable directory, or can be created as one: its nearest existing folder is a directory in
    which files can be created (nothing is created here but a temporary file, removed at once)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is not a directory")
    _check_writable_folder(existing, flag, path)


def _check_writable_folder(folder: Path, flag: str, path: Path) -> None:
    """A file can be created in ``folder``: tried, since permission bits do not tell (a superuser passes
    ``os.access`` on ``/proc`` and on read-only file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(
            f"{flag} {str(path)!r} cannot be written: no file can be created in {str(folder)!r} ({e.strerror})"
        ) from e


def check_model(model: str, flag: str = "--model") -> None:
    """``model`` is an existing folder, a bundled model, or shaped like a hub id (``owner/name``): anything else is
    a typo that loading would only report as a failed hub download."""
    if Path(model).is_dir() or model in BUNDLED_MODELS or re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return
    close = difflib.get_close_matches(model, BUNDLED_MODELS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{flag} {model!r} is not a folder, a bundled model ({', '.join(BUNDLED_MODELS)}) or a hub id (owner/name)"
        f"{hint}"
    )


def check_prompts(model: str, prompts: Sequence[str], flag: str = "--prompt") -> None:
    """A bundled digits model (or a folder holding one) draws a digit: each prompt must be 0-9."""
    if is_digits_model(model):
        bad = [p for p in prompts if p not in DIGIT_PROMPTS]
        if bad:
            raise ValueError(f"{model} draws a digit: {flag} must be 0-9, got {bad[0]!r}")
