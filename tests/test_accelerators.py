"""The accelerator seam: attached for one run, then removed without a trace."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import small

from fastgen.accelerators import ACCELERATORS, Accelerator, accelerators, attach, fuse_qkv
from fastgen.accelerators.fuse_qkv import FuseQKVConfig, apply, denoiser
from fastgen.engine import Member, Run, StepMonitor
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


def run_of(engine, request: dict) -> Run:
    """The run the engine would build for ``request`` (no cache, the engine's LoRA library)."""
    resolved = engine.resolve(request)
    loaded, _ = engine.pool.get(resolved.spec)
    monitor = StepMonitor(resolved.request.steps, None, None)
    return Run(loaded, [Member(resolved)], monitor, engine.settings, library=engine.loras)


def refuse(pipe, config, run):
    """An accelerator whose attach fails, to check that the ones before it come off again."""
    raise RuntimeError("cannot attach")


def test_failed_attach_removes_what_was_attached(engine, sd_pipe):
    names, _ = model_state(sd_pipe)
    table = ACCELERATORS + (Accelerator("refuses", lambda run: object(), refuse),)
    with pytest.raises(RuntimeError, match="cannot attach"):
        attach(sd_pipe, run_of(engine, small(accelerate={"fuse_qkv": True})), table)
    assert model_state(sd_pipe)[0] == names


def test_nothing_attached_when_nothing_asked(engine, sd_pipe):
    run = run_of(engine, small())
    assert attach(sd_pipe, run).attached == []
    assert run.call_kwargs == {} and run.monitor.hooks == [] and run.monitor.skipped == 0


def test_the_accelerators_are_the_technique_tables_attachable_rows_in_its_order():
    names = ["cache", "loras", "fuse_qkv", "sparse_attention"]
    assert [a.name for a in ACCELERATORS] == [t.name for t in TECHNIQUES if t.attach] == names
    # A row declared only here, ahead of the others, attaches first, with its own module's functions.
    probe = Technique(
        "probe", asked=lambda r: False, supported=lambda spec: True, attach="fastgen.accelerators.fuse_qkv"
    )
    table = accelerators((probe, *TECHNIQUES))
    assert [a.name for a in table] == ["probe", *names]
    assert table[0].apply is fuse_qkv.apply and table[0].from_run is fuse_qkv.from_run


@dataclass(frozen=True)
class ProbeConfig:
    on: bool = True


class Probe:
    """A technique's handle defined only here: it hears every step and changes an argument of the pipeline call."""

    call_kwargs = {"guidance_scale": 1.0}

    def __init__(self):
        self.steps: list[int] = []
        self.removed = False

    def on_step(self, step, latents) -> None:
        self.steps.append(step)

    def remove(self) -> None:
        self.removed = True

    def report(self) -> dict:
        return {"steps": self.steps}


def test_a_technique_defined_only_here_takes_part_in_the_run_and_reports(engine):
    handles = []

    def apply_probe(pipe, config, run):
        handles.append(Probe())
        return handles[-1]

    probe = Accelerator("probe", lambda run: ProbeConfig() if run.request.prompt == "probe" else None, apply_probe)
    saved, engine.accelerators = engine.accelerators, ACCELERATORS + (probe,)
    try:
        probed = engine.run(small(prompt="probe", steps=3, guidance=7.5))
    finally:
        engine.accelerators = saved
    assert handles[0].removed and handles[0].steps == [1, 2, 3]
    assert probed.result.accelerations[-1].model_dump() == {
        "name": "probe",
        "config": {"on": True},
        "details": {"steps": [1, 2, 3]},
    }
    # Its call argument reached the pipeline: the image is the one guidance 1 makes.
    assert np.array_equal(pixels(probed), pixels(engine.run(small(prompt="probe", steps=3, guidance=1.0))))
