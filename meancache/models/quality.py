"""How close a generation is to the full run of the same call: PSNR and SSIM per image (a video: per frame), and
for videos how far the motion between consecutive frames strays from the full run's."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def image_metrics(samples: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM against ``reference`` over every image of ``(N, H, W)`` or every frame of videos
    ``(N, T, H, W)``, values in [0, 1]. An image equal to its reference has an infinite PSNR (so has the mean)."""
    if samples.shape != reference.shape or samples.ndim not in (3, 4):
        raise ValueError(
            f"samples and reference must be images (N, H, W) or videos (N, T, H, W) of one shape, got "
            f"{samples.shape} and {reference.shape}"
        )
    frames, references = samples.reshape(-1, *samples.shape[-2:]), reference.reshape(-1, *reference.shape[-2:])
    pairs = list(zip(frames, references, strict=True))
    with np.errstate(divide="ignore"):  # an identical frame: PSNR is infinite, not a warning
        psnr = [peak_signal_noise_ratio(r, s, data_range=1.0) for s, r in pairs]
    ssim = [structural_similarity(r, s, data_range=1.0) for s, r in pairs]
    return float(np.mean(psnr)), float(np.mean(ssim))


def temporal_error(videos: np.ndarray, reference: np.ndarray) -> float:
    """The mean absolute difference between the frame-to-frame changes of ``videos`` and of ``reference``, both
    ``(N, T, H, W)`` in [0, 1]: ``mean |(x[t+1] - x[t]) - (r[t+1] - r[t])|`` over videos, frame pairs and pixels.

    0 when every video changes from frame to frame exactly as the full run does (flicker or motion the full run
    does not have raises it); an offset the same in every frame scores 0, which PSNR sees."""
    if videos.shape != reference.shape or videos.ndim != 4 or videos.shape[1] < 2:
        raise ValueError(
            f"videos and reference must be videos (N, T, H, W) of one shape with T >= 2, got {videos.shape} and "
            f"{reference.shape}"
        )
    return float(np.abs(np.diff(videos, axis=1) - np.diff(reference, axis=1)).mean())
