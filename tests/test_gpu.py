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


def test_different_loras_in_one_cuda_batch_each_match_their_request_alone(settings, tmp_path):
    """Punica's segmented LoRA on the GPU (half precision): the gathered batched matmuls run on the device."""
    from fastgen.engine import Engine, Member
    from fastgen.lora.library import LoraLibrary
    from fastgen.lora.synthetic import random_lora, write_lora
    from fastgen.settings import Settings

    engine = Engine(Settings(data_dir=settings.data_dir, device="cuda"), loras=LoraLibrary(tmp_path))
    unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet
    for i in range(2):
        write_lora(tmp_path / f"gpu{i}.safetensors", random_lora(unet, 4, seed=i))
    requests = [
        small(seed=1, loras=[{"name": "gpu0"}]),
        small(seed=2, loras=[{"name": "gpu1", "scale": 0.5}]),
        small(),
    ]
    batched = engine.run_members([Member(engine.resolve(request)) for request in requests])
    for request, generation in zip(requests, batched, strict=True):
        alone = np.asarray(engine.run(request).images[0]).astype(int)
        assert np.abs(np.asarray(generation.images[0]).astype(int) - alone).max() <= 3, request  # fp16 rounding
