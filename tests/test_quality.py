"""Fidelity metrics: PSNR against its closed form, SSIM's defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from fastgen.quality import psnr, ssim


@pytest.fixture
def image() -> np.ndarray:
    """A smooth gradient with texture, so SSIM has structure to lose."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 64)
    base = ramp[None, :, None] + ramp[:, None, None] / 4 + rng.normal(0, 8, (64, 64, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def test_identical_images_have_infinite_psnr_and_unit_ssim(image):
    assert psnr(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_uniform_error_matches_closed_form(image):
    darker = np.clip(image, 10, 255)
    assert psnr(darker, darker - 10) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


def test_ssim_falls_below_one_and_keeps_falling_with_more_noise(image):
    scores = [ssim(image, noisy(image, sigma)) for sigma in (2, 10, 40)]
    assert scores[0] < 1.0
    assert scores[0] > scores[1] > scores[2]


def test_ssim_is_symmetric(image):
    other = noisy(image, 15)
    assert ssim(image, other) == pytest.approx(ssim(other, image), abs=1e-12)


def test_shape_mismatch_names_both_shapes(image):
    with pytest.raises(ValueError, match=r"\(1, 64, 64, 3\).*\(1, 32, 64, 3\)"):
        psnr(image, image[:32])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(image, image[:, :32])


def test_float_pixels_are_refused(image):
    with pytest.raises(ValueError, match="uint8"):
        psnr(image / 255.0, image / 255.0)


def test_pil_images_match_arrays(image):
    other = noisy(image, 10)
    assert psnr(Image.fromarray(image), Image.fromarray(other)) == psnr(image, other)
    assert ssim(Image.fromarray(image), Image.fromarray(other)) == ssim(image, other)


def test_video_ssim_averages_frames_and_psnr_pools_error(image):
    other = noisy(image, 10)
    assert ssim([image, image], [image, other]) == pytest.approx((1.0 + ssim(image, other)) / 2)
    # Pooled squared error: half the frames identical halves the MSE, adding 10*log10(2) dB.
    assert psnr([image, image], [image, other]) == pytest.approx(psnr(image, other) + 10 * math.log10(2))
    assert psnr(np.stack([image, other]), np.stack([image, other])) == math.inf
