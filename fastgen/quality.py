"""Image fidelity metrics: how far an accelerated output is from the plain pipeline's output.

Every benchmark reports these next to its speed, so an acceleration is never judged on time alone.

- PSNR: peak signal-to-noise ratio in dB for 8-bit images (peak 255); identical images give ``inf``.
- SSIM: the structural similarity index of Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from
  error visibility to structural similarity", IEEE Transactions on Image Processing 13(4), 600-612, 2004, with
  the paper's parameters (11x11 circular-symmetric Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), computed
  per colour channel and averaged.

Inputs are uint8 images (HxW or HxWxC numpy arrays, or PIL images), or videos as a sequence of such frames or a
uint8 FxHxWxC array. Float arrays are refused rather than guessed at: [0, 1] and [0, 255] floats look alike, and
a wrong guess silently shifts PSNR by 48 dB. Convert first, e.g. with ``fastgen.engine.to_uint8``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images or videos; ``inf`` when they are identical.

    For a video the squared error is averaged over all frames before the log, so one identical frame does not make
    the whole video's PSNR infinite.
    """
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(PEAK**2 / mse)


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004) between two uint8 images, channels averaged; videos average over frames."""
    x, y = _pair(a, b)
    return float(np.mean([_ssim_frame(fx, fy) for fx, fy in zip(x, y, strict=True)]))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 arrays of shape (frames, H, W, C), checked to match."""
    x, y = _frames(a), _frames(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape (frames, height, width, channels): {x.shape} vs {y.shape}")
    return x, y


def _frames(images) -> np.ndarray:
    is_video = isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4)
    if is_video and len(images) == 0:
        raise ValueError("no frames given")
    frames = [_as_uint8(frame) for frame in images] if is_video else [_as_uint8(images)]
    return np.stack(frames).astype(np.float64)


def _as_uint8(image) -> np.ndarray:
    """One image as a uint8 HxWxC array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}; convert floats explicitly first")
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")
    return image


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _blur(image: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean over 'valid' windows only, as in the paper's reference code (no padding)."""
    window = _gaussian_window()
    height, width = image.shape[0] - SSIM_WINDOW + 1, image.shape[1] - SSIM_WINDOW + 1
    # The 2D Gaussian is separable: filter rows, then columns.
    rows = sum(w * image[i : i + height] for i, w in enumerate(window))
    return sum(w * rows[:, j : j + width] for j, w in enumerate(window))


def _ssim_frame(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of one HxWxC frame, averaged over its channels."""
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape[:2]}")
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    mu_x, mu_y = _blur(x), _blur(y)
    var_x = _blur(x * x) - mu_x**2
    var_y = _blur(y * y) - mu_y**2
    cov = _blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())
