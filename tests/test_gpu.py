"""GPU-only behaviour; skipped where there is no CUDA (CI never has one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def gpu_engine(settings):
    from fastgen.engine import Engine
    from fastgen.settings import Settings

    return Engine(Settings(data_dir=settings.data_dir, device="cuda"))


def test_cuda_generation_is_deterministic_in_half_precision(gpu_engine):
    first, second = gpu_engine.run(small()), gpu_engine.run(small())
    assert first.result.device.startswith("cuda")
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


def test_xformers_attention_is_used_when_installed(gpu_engine):
    pytest.importorskip("xformers")
    loaded, _ = gpu_engine.pool.get(gpu_engine.registry.resolve("tiny-sd"))
    names = {type(p).__name__ for p in loaded.pipe.unet.attn_processors.values()}
    assert names == {"XFormersAttnProcessor"}


def test_fuse_qkv_removal_is_bit_identical_on_cuda(gpu_engine):
    plain = np.asarray(gpu_engine.run(small()).images[0])
    gpu_engine.run(small(accelerate={"fuse_qkv": True}))
    assert np.array_equal(plain, np.asarray(gpu_engine.run(small()).images[0]))
