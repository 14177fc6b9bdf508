"""The quality-aware cache's probe: what the denoiser predicts for a request's prompt from a stored state's latents.

One denoiser call of the pipeline's own loop (``fastgen.cache.predict``), started at the state's step, with the
request's own techniques attached (its LoRAs, its attention) so the prediction is the one its run would make, but
neither the cache (this is its lookup) nor a multi-device split (the check runs on the rank that plans, alone).
Classifier-free guidance is turned off where the pipeline has it: the check compares conditional predictions only,
and one batch row costs half of two. ``fastgen.cache.check`` says what the prediction is compared against.
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
    attached = attach(pipe, run, table)
    try:
        handle, kwargs = resume.apply(pipe, dataclasses.replace(state, latents=state.latents[:1]))
        tap = PredictionTap(denoisers(pipe), 1, stop=True)
        try:
            pipe(**run.pipeline_kwargs() | kwargs)
        except Predicted:
            pass
        finally:
            tap.remove()
            handle.remove()
    finally:
        attached.remove()
    prediction = tap.take()
    if prediction is None:
        raise ValueError(f"{type(pipe).__name__}: the denoiser's first call gave no conditional prediction")
    return prediction.conditional
