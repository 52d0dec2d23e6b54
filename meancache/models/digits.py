"""The data behind the bundled models: scikit-learn's 8x8 digits, upscaled (for the video model: sliding across
the frame), a classifier that judges whether a generated image or video frame shows the digit that was asked
for, and the motion of a video."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the learned "no class" embedding (label dropout), for true CFG
CLASSES = list(range(NUM_CLASSES))
FRAMES = 9
"""Frames of a moving-digits video."""
DIGIT_SIZE = 16
"""Side of a digit in a video frame: it slides ``IMAGE_SIZE - DIGIT_SIZE`` = 16 pixels, 2 a frame."""
DIRECTIONS = ("right", "left", "down", "up")


def _upscaled_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as ``(images in [0, 1] of shape (N, 1, size, size), labels)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.tensor(digits.target)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as ``(images in [-1, 1] of shape (N, 1, 32, 32), labels)``."""
    images, labels = _upscaled_digits(IMAGE_SIZE)
    return images * 2 - 1, labels


def moving_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Each of scikit-learn's digits, ``DIGIT_SIZE`` pixels high, sliding across a 32x32 frame in each of the four
    ``DIRECTIONS`` (edge to edge, through the middle, 2 pixels a frame) as ``(videos in [-1, 1] of shape
    (4 N, 1, FRAMES, 32, 32), labels)``, the four directions of a digit one after the other."""
    digits, labels = _upscaled_digits(DIGIT_SIZE)
    travel, middle = IMAGE_SIZE - DIGIT_SIZE, (IMAGE_SIZE - DIGIT_SIZE) // 2
    videos = torch.zeros(len(digits), len(DIRECTIONS), FRAMES, IMAGE_SIZE, IMAGE_SIZE)
    for frame in range(FRAMES):
        p = frame * travel // (FRAMES - 1)
        corners = ((middle, p), (middle, travel - p), (p, middle), (travel - p, middle))  # (y, x) per direction
        for direction, (y, x) in enumerate(corners):
            videos[:, direction, frame, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = digits[:, 0]
    return videos.flatten(0, 1)[:, None] * 2 - 1, labels.repeat_interleave(len(DIRECTIONS))


def _logistic_regression(features: Any, labels: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(features, labels)


@functools.cache
def digit_classifier() -> Any:
    """A logistic-regression classifier fitted on scikit-learn's 8x8 digits (about 97 % held-out accuracy); fitted
    once per process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _logistic_regression(digits.data, digits.target)


@functools.cache
def frame_classifier() -> Any:
    """The classifier of :func:`classify_frames`: a logistic regression like :func:`digit_classifier`, fitted on
    the centred crops (:func:`centred_crops`) of every frame of the moving digits sliding right (about 92 %
    held-out frame accuracy on the other directions of unseen digits); fitted once per process."""
    videos, labels = moving_digits_dataset()
    right = videos[:: len(DIRECTIONS), 0] / 2 + 0.5
    return _logistic_regression(_features(centred_crops(right)), labels[:: len(DIRECTIONS)].repeat_interleave(FRAMES))


def _features(images: torch.Tensor) -> Any:
    """Square images (N, 1, S, S) or (N, S, S) in [0, 1] -> the classifiers' inputs: 8x8 averages in 0..16."""
    x = images.reshape(-1, 1, *images.shape[-2:]).float()
    return (F.adaptive_avg_pool2d(x, 8).reshape(len(x), 64) * 16.0).numpy()


def classify(classifier: Any, images: torch.Tensor) -> torch.Tensor:
    """Predicted digits for images in [0, 1] of shape (N, 1, 32, 32) or (N, 32, 32)."""
    return torch.tensor(classifier.predict(_features(images)))


def recognised(samples: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Whether the classifier sees the requested digit ``classes[n]`` in each generated sample in [0, 1]: per image
    of images ``(N, H, W)`` (:func:`digit_classifier`), shape ``(N,)``; per frame of videos ``(N, T, H, W)``
    (:func:`frame_classifier`), shape ``(N, T)``."""
    wanted = torch.as_tensor(classes)
    if samples.ndim == 3:
        return classify(digit_classifier(), samples) == wanted
    if samples.ndim == 4:
        return classify_frames(frame_classifier(), samples) == wanted[:, None]
    raise ValueError(f"samples must be images (N, H, W) or videos (N, T, H, W), got shape {tuple(samples.shape)}")


def centre_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """The intensity-weighted centre ``(y, x)``, in pixels, of each frame in [0, 1] of shape (..., H, W)."""
    frames = frames.float()
    mass = frames.sum((-2, -1)).clamp_min(1e-6)
    y = (frames.sum(-1) * torch.arange(frames.shape[-2])).sum(-1) / mass
    x = (frames.sum(-2) * torch.arange(frames.shape[-1])).sum(-1) / mass
    return torch.stack([y, x], dim=-1)


def centred_crops(videos: torch.Tensor) -> torch.Tensor:
    """The ``DIGIT_SIZE`` square centred on each frame's centre of mass (kept inside the frame), ``(N T, 16, 16)``,
    for videos in [0, 1] of shape (N, T, 32, 32)."""
    frames = videos.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    corners = (centre_of_mass(frames) - (DIGIT_SIZE - 1) / 2).round().long().clamp(0, IMAGE_SIZE - DIGIT_SIZE)
    pairs = zip(frames, corners.tolist(), strict=True)
    return torch.stack([f[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] for f, (y, x) in pairs])


def classify_frames(classifier: Any, videos: torch.Tensor) -> torch.Tensor:
    """Predicted digits ``(N, T)`` for the frames of videos in [0, 1] of shape (N, T, 32, 32), by the
    :func:`frame_classifier` on their :func:`centred_crops`."""
    return torch.tensor(classifier.predict(_features(centred_crops(videos)))).reshape(videos.shape[:2])


def displacement(videos: torch.Tensor) -> torch.Tensor:
    """How far, in pixels, the centre of mass moves from the first to the last frame of each video in [0, 1] of
    shape (N, T, H, W): the training videos' digits move ``IMAGE_SIZE - DIGIT_SIZE`` = 16 pixels."""
    centres = centre_of_mass(videos)
    return (centres[:, -1] - centres[:, 0]).norm(dim=-1)
