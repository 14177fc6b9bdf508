"""The accelerator seam: attached for one run, then removed without a trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small

from fastgen.accelerators import ACCELERATORS, Accelerator, accelerators, attach, fuse_qkv
from fastgen.accelerators.fuse_qkv import FuseQKVConfig, apply, denoiser
from fastgen.schema import GenerationRequest
from fastgen.techniques import TECHNIQUES, Technique


def pixels(generation) -> np.ndarray:
    return np.stack(generation.frames) if generation.frames else np.stack([np.asarray(i) for i in generation.images])


def model_state(pipe) -> tuple[list[str], dict]:
    model = denoiser(pipe)
    return [name for name, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-pixart", "tiny-wan"])
def test_fuse_qkv_removal_is_bit_identical(engine, model):
    plain = pixels(engine.run(small(model)))
    fused = engine.run(small(model, accelerate={"fuse_qkv": True}))
    after = pixels(engine.run(small(model)))
    assert np.array_equal(plain, after)
    assert fused.result.accelerations[0].name == "fuse_qkv"
    assert fused.result.accelerations[0].details["fused_attention_layers"] > 0
    # Only the summation order differs while fused.
    assert np.abs(pixels(fused).astype(int) - plain.astype(int)).max() <= 2


def test_fuse_qkv_handle_restores_modules_processors_and_weights(sd_pipe):
    names, weights = model_state(sd_pipe)
    processors = {k: type(v) for k, v in denoiser(sd_pipe).attn_processors.items()}
    handle = apply(sd_pipe, FuseQKVConfig())
    assert any(name.endswith("to_qkv") for name, _ in denoiser(sd_pipe).named_modules())
    handle.remove()
    after_names, after_weights = model_state(sd_pipe)
    assert after_names == names
    assert after_weights.keys() == weights.keys()
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert {k: type(v) for k, v in denoiser(sd_pipe).attn_processors.items()} == processors
    assert "original_attn_processors" not in vars(denoiser(sd_pipe))


def refuse(pipe, config):
    """An accelerator whose attach fails, to check that the ones before it come off again."""
    raise RuntimeError("cannot attach")


def test_failed_attach_removes_what_was_attached(sd_pipe):
    names, _ = model_state(sd_pipe)
    table = ACCELERATORS + (Accelerator("refuses", lambda request: object(), refuse),)
    with pytest.raises(RuntimeError, match="cannot attach"):
        attach(sd_pipe, GenerationRequest(prompt="x", accelerate={"fuse_qkv": True}), table)
    assert model_state(sd_pipe)[0] == names


def test_nothing_attached_when_nothing_asked(sd_pipe):
    assert attach(sd_pipe, GenerationRequest(prompt="x")).attached == []


def test_the_accelerators_are_the_technique_tables_attachable_rows_in_its_order():
    assert (
        [a.name for a in ACCELERATORS] == [t.name for t in TECHNIQUES if t.attach] == ["fuse_qkv", "sparse_attention"]
    )
    # A row declared only here, ahead of the others, attaches first, with its own module's functions.
    probe = Technique(
        "probe", asked=lambda r: False, supported=lambda spec: True, attach="fastgen.accelerators.fuse_qkv"
    )
    table = accelerators((probe, *TECHNIQUES))
    assert [a.name for a in table] == ["probe", "fuse_qkv", "sparse_attention"]
    assert table[0].apply is fuse_qkv.apply and table[0].from_request is fuse_qkv.from_request
