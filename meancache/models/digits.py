"""The data behind the bundled models: scikit-learn's 8x8 digits, upscaled, and a classifier that judges
whether a generated image shows the digit that was asked for."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the learned "no class" embedding (label dropout), for true CFG
CLASSES = list(range(NUM_CLASSES))


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as ``(images in [-1, 1] of shape (N, 1, 32, 32), labels)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    return images, torch.tensor(digits.target)


def digit_classifier() -> Any:
    """A logistic-regression classifier fitted on scikit-learn's 8x8 digits (about 97 % held-out accuracy)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.data, digits.target)


def classify(classifier: Any, images: torch.Tensor) -> torch.Tensor:
    """Predicted digits for images in [0, 1] of shape (N, 1, 32, 32) or (N, 32, 32)."""
    x = images.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).float()
    small = F.adaptive_avg_pool2d(x, 8).reshape(len(x), 64) * 16.0
    return torch.tensor(classifier.predict(small.numpy()))
