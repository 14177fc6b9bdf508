"""The quality harness every acceleration benchmark uses.

An acceleration is judged against the exact generation with the same seed: PSNR and SSIM of each
accelerated image against its exact twin, and prompt adherence (``fastgen.shapes.score``) of both
on held-out captions of the built-in ``fastgen-shapes`` model, a model trained here that really
draws what it is asked. A technique that keeps PSNR high but breaks adherence, or the reverse,
shows here.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from fastgen.quality import psnr, ssim
from fastgen.shapes.scenes import caption, heldout_scenes
from fastgen.shapes.score import adherence

SHAPES_MODEL = "fastgen-shapes"
Generate = Callable[[dict[str, Any]], Image.Image]


def heldout_captions(limit: int | None = None) -> list[str]:
    """Captions whose colour/shape/position/background combination the model never saw in training."""
    captions = [caption(scene) for scene in heldout_scenes()]
    return captions[:limit] if limit else captions


def engine_generate(engine, accelerate: dict[str, Any] | None = None) -> Generate:
    """A generate function over ``engine``, with the given ``accelerate`` options on every request."""

    def generate(request: dict[str, Any]) -> Image.Image:
        return engine.run({**request, "accelerate": accelerate or {}}).images[0]

    return generate


def compare(exact: Generate, accelerated: Generate, captions: list[str], seed: int = 0, **fields) -> dict[str, Any]:
    """PSNR/SSIM of accelerated vs exact images (same seed per caption) and the adherence of each."""
    requests = [{"prompt": text, "model": SHAPES_MODEL, "seed": seed + i, **fields} for i, text in enumerate(captions)]
    exact(requests[0]), accelerated(requests[0])  # warm-up: model loading is not what is compared
    exact_images, exact_s, fast_images, fast_s = [], [], [], []
    for request in requests:  # interleaved, so a slow spell of the machine hits both alike
        exact_images.append(_timed(exact, request, exact_s))
        fast_images.append(_timed(accelerated, request, fast_s))
    speed = {"exact_s_per_image": statistics.median(exact_s), "accelerated_s_per_image": statistics.median(fast_s)}
    speed["speedup"] = speed["exact_s_per_image"] / speed["accelerated_s_per_image"]
    return {**speed, **fidelity(exact_images, fast_images, captions)}


def _timed(generate: Generate, request: dict[str, Any], times: list[float]) -> Image.Image:
    start = time.perf_counter()
    image = generate(request)
    times.append(time.perf_counter() - start)
    return image


def fidelity(exact_images: list[Image.Image], fast_images: list[Image.Image], captions: list[str]) -> dict[str, Any]:
    pairs = list(zip(exact_images, fast_images, strict=True))
    psnrs = [psnr(np.asarray(a), np.asarray(b)) for a, b in pairs]
    ssims = [ssim(np.asarray(a), np.asarray(b)) for a, b in pairs]
    exact_adherence = adherence(exact_images, captions)
    fast_adherence = adherence(fast_images, captions)
    return {
        "images": len(pairs),
        "identical_images": sum(math.isinf(p) for p in psnrs),
        "psnr_db_median": _json_number(statistics.median(psnrs)),
        "psnr_db_min": _json_number(min(psnrs)),
        "ssim_mean": statistics.fmean(ssims),
        "ssim_min": min(ssims),
        "adherence_exact": exact_adherence,
        "adherence_accelerated": fast_adherence,
        "adherence_change": fast_adherence["all"] - exact_adherence["all"],
    }


def _json_number(value: float) -> float | str:
    """JSON has no infinity: identical images' PSNR is written as the string "inf"."""
    return "inf" if math.isinf(value) else value
