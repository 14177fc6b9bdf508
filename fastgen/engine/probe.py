"""The quality-aware cache's probe: what the denoiser predicts for a request's prompt from a stored state's latents.

With the request's own techniques attached (its LoRAs, its attention) so the prediction is the one its run would
make, but neither the cache (this is its lookup) nor a multi-device split (the check runs on the rank that plans,
alone). Classifier-free guidance is left out: the check compares conditional predictions only (the unconditional one
on the same latents is the stored run's), and one batch row costs half of two.

The check's cost counts against every hit it grants, so where the pipeline is a plain text-to-image UNet pipeline
the probe makes that one denoiser call itself, as the pipeline's loop would (:func:`unet_prediction`): the
pipeline's own call costs as much again in set-up (measured on fastgen-shapes: 30-45 ms a probe through the pipeline,
a UNet call alone 13 ms). Any other pipeline runs its own loop for one call (:func:`loop_prediction`), stopped by a
tap right after it (``fastgen.cache.predict``). ``fastgen.cache.check`` says what the prediction is compared against.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from fastgen.accelerators import Accelerator, attach
from fastgen.accelerators.sparse_attention import denoisers
from fastgen.cache import resume
from fastgen.cache.predict import Predicted, PredictionTap
from fastgen.engine.batch import Member
from fastgen.engine.monitor import StepMonitor
from fastgen.engine.run import Run

if TYPE_CHECKING:
    from fastgen.engine.pool import LoadedPipeline
    from fastgen.lora.library import LoraLibrary
    from fastgen.settings import Settings

NOT_IN_PROBES = frozenset({"cache", "parallel"})
# Pipelines whose loop calls ``unet(scale_model_input(latents, t), t, encoder_hidden_states=encode_prompt(prompt))``
# and nothing more for a text-only request without guidance: the probe may make that call itself. By exact class:
# a subclass (img2img, SDXL) conditions its UNet on more.
PLAIN_UNET_PIPELINES = frozenset({"StableDiffusionPipeline"})


def predict(
    loaded: LoadedPipeline,
    member: Member,
    state: resume.State,
    settings: Settings,
    library: LoraLibrary | None,
    accelerators: tuple[Accelerator, ...],
) -> torch.Tensor:
    """The conditional prediction of ``member``'s prompt (one image) from ``state``'s latents."""
    pipe, request = loaded.pipe, member.request
    uses_guidance = hasattr(type(pipe), "do_classifier_free_guidance")
    update = {"num_images": 1} | ({"guidance": 1.0} if uses_guidance else {})
    resolved = dataclasses.replace(member.resolved, request=request.model_copy(update=update))
    one = Member(resolved, tenant=member.tenant, looked_up=True)
    monitor = StepMonitor(request.steps, None, None, skipped=state.step)
    run = Run(loaded, [one], monitor, settings, None, library, decode=False)
    table = tuple(a for a in accelerators if a.name not in NOT_IN_PROBES)
    one_state = dataclasses.replace(state, latents=state.latents[:1])
    attached = attach(pipe, run, table)
    try:
        if calls_unet_plainly(loaded, run):
            return unet_prediction(pipe, request.prompt, one_state)
        return loop_prediction(pipe, run, one_state)
    finally:
        attached.remove()


def calls_unet_plainly(loaded: LoadedPipeline, run: Run) -> bool:
    """Whether :func:`unet_prediction` makes exactly the call ``run``'s pipeline loop would."""
    pipe = loaded.pipe
    return (
        type(pipe).__name__ in PLAIN_UNET_PIPELINES
        and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None  # no guidance embedding (LCM)
        and not loaded.spec.call_kwargs
        and not run.call_kwargs
    )


@torch.no_grad()
def unet_prediction(pipe, prompt: str, state: resume.State) -> torch.Tensor:
    """The UNet's prediction for ``prompt`` on ``state``'s latents at its step, as the pipeline's loop computes it."""
    weight = next(pipe.unet.parameters())  # the pipeline's ``device`` walks every module: a cost of its own here
    embeds, _ = pipe.encode_prompt(prompt, weight.device, 1, False)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's own is left untouched
    scheduler.set_timesteps(state.total, device=weight.device)
    if len(scheduler.timesteps) != state.total:
        raise ValueError(f"scheduler made {len(scheduler.timesteps)} steps, the state was taken from {state.total}")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(state.step)
    timestep = scheduler.timesteps[state.step]
    latents = scheduler.scale_model_input(state.latents.to(weight.device, weight.dtype), timestep)
    output = pipe.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    return output.detach().to("cpu", torch.float32)


def loop_prediction(pipe, run: Run, state: resume.State) -> torch.Tensor:
    """The prediction of the pipeline's own loop, resumed at ``state`` and stopped after its first denoiser call."""
    handle, kwargs = resume.apply(pipe, state)
    tap = PredictionTap(denoisers(pipe), 1, stop=True)
    try:
        pipe(**run.pipeline_kwargs() | kwargs)
    except Predicted:
        pass
    finally:
        tap.remove()
        handle.remove()
    prediction = tap.take()
    if prediction is None:
        raise ValueError(f"{type(pipe).__name__}: the denoiser's first call gave no conditional prediction")
    return prediction.conditional
