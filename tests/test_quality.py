import warnings

import numpy as np
import pytest

from meancache.models.quality import image_metrics, temporal_error


def test_image_metrics_on_known_inputs():
    a = np.random.default_rng(0).uniform(size=(2, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal images: an infinite PSNR, no division warning
        assert image_metrics(a, a) == (float("inf"), pytest.approx(1.0))
    psnr, ssim = image_metrics(np.clip(a + 0.1, 0, 1), a)
    assert 20.0 <= psnr < 22 and 0.5 < ssim < 1.0  # 0.1 everywhere except where clipped
    psnr, ssim = image_metrics(np.zeros((2, 16, 16)), a)
    assert psnr < 6 and ssim < 0.1


def test_image_metrics_average_over_every_frame_of_videos():
    reference = np.random.default_rng(1).uniform(0.2, 0.8, size=(2, 3, 16, 16))
    noisy = reference + np.linspace(0.01, 0.06, 6).reshape(2, 3, 1, 1)  # a different offset per frame
    psnr, ssim = image_metrics(noisy, reference)
    per_frame = [image_metrics(n[None], r[None]) for n, r in zip(noisy.reshape(6, 16, 16), reference.reshape(6, 16, 16),
                                                                   strict=True)]  # fmt: skip
    assert psnr == pytest.approx(np.mean([p for p, _ in per_frame]))
    assert ssim == pytest.approx(np.mean([s for _, s in per_frame]))
    assert per_frame[0][0] == pytest.approx(40.0)  # offset 0.01: 20 log10(1 / 0.01)


def test_temporal_error_on_known_inputs():
    reference = np.random.default_rng(2).uniform(0.2, 0.8, size=(2, 4, 8, 8))
    assert temporal_error(reference, reference) == 0
    assert temporal_error(reference + 0.1, reference) == pytest.approx(0, abs=1e-12)  # an offset: not motion
    flicker = reference.copy()
    flicker[:, 2] += 0.1  # frame 2 brighter: changes 1->2 and 2->3 each off by 0.1 of 3 changes
    assert temporal_error(flicker, reference) == pytest.approx(0.2 / 3)
    frozen = np.repeat(reference[:, :1], 4, axis=1)  # no motion at all
    assert temporal_error(frozen, reference) == pytest.approx(np.abs(np.diff(reference, axis=1)).mean())


@pytest.mark.parametrize(
    ("samples", "reference", "message"),
    [
        (np.zeros((2, 8, 8)), np.zeros((3, 8, 8)), r"of one shape, got \(2, 8, 8\) and \(3, 8, 8\)"),
        (np.zeros((8, 8)), np.zeros((8, 8)), r"images \(N, H, W\) or videos \(N, T, H, W\)"),
    ],
)
def test_image_metrics_refuse_mismatched_shapes(samples, reference, message):
    with pytest.raises(ValueError, match=message):
        image_metrics(samples, reference)


def test_temporal_error_needs_two_frames():
    with pytest.raises(ValueError, match=r"with T >= 2, got \(2, 1, 8, 8\)"):
        temporal_error(np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 8)))
