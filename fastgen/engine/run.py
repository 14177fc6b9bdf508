"""One pipeline call: the run the engine builds for it, the pipeline's own arguments, and what it gives back."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from fastgen.engine.monitor import StepMonitor, step_callback
from fastgen.engine.pool import LoadedPipeline
from fastgen.lora.library import LoraInfo, LoraLibrary
from fastgen.models.registry import ModelSpec
from fastgen.schema import GenerationRequest, GenerationResult, Timings, image_seeds
from fastgen.settings import Settings

if TYPE_CHECKING:
    from fastgen.cache.approximate import ApproximateCache
    from fastgen.engine.batch import Member


@dataclass(frozen=True)
class ResolvedRequest:
    """A request ready to run: its model, the request with the model's defaults, the seed, the LoRAs from the library.

    ``Engine.resolve`` makes one; the ranks of a multi-device worker make theirs from rank 0's plan."""

    spec: ModelSpec
    request: GenerationRequest
    seed: int
    adapters: list[tuple[LoraInfo, float]]

    @property
    def seeds(self) -> list[int]:
        return image_seeds(self.seed, self.request.num_images)


@dataclass
class Run:
    """One pipeline call, built once by the engine: its members (one request each, several when requests are batched:
    ``fastgen.engine.batch``), the step monitor, and the service's settings and stores the techniques attach with
    (``fastgen.accelerators``). The members share everything but their prompts, seeds, results and flags, so the
    shared request fields are the first member's (``request``).

    What the attached techniques give the run collects here: ``call_kwargs`` for the pipeline call, the monitor's
    start step and step hooks, and ``changed_mid_run``: the techniques that changed the denoiser after its first step
    (the states such a run passes through are not the request's own, so the cache does not keep them)."""

    loaded: LoadedPipeline
    members: list[Member]
    monitor: StepMonitor
    settings: Settings
    cache: ApproximateCache | None = None
    library: LoraLibrary | None = None
    decode: bool = True  # False: stop at the latents (the helper ranks of a multi-device worker)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    changed_mid_run: set[str] = field(default_factory=set)

    @property
    def request(self) -> GenerationRequest:
        return self.members[0].request

    @property
    def adapters(self) -> list[tuple[LoraInfo, float]]:
        return self.members[0].resolved.adapters

    @property
    def seeds(self) -> list[int]:
        """Every image's seed, member after member: the call draws image i's starting noise from its own generator."""
        return [seed for member in self.members for seed in member.seeds]

    def per_image(self, value: Callable[[GenerationRequest], Any]) -> list[Any]:
        """``value`` of each image's member's request, image after image."""
        return [value(member.request) for member in self.members for _ in member.seeds]

    def take_part(self, handle) -> None:
        """Let an attached technique's handle take part: skip its ``start_step`` steps of the schedule, add its
        ``call_kwargs`` to the call, hear every step through its ``on_step``."""
        self.monitor.skipped = max(self.monitor.skipped, getattr(handle, "start_step", 0))
        self.call_kwargs |= getattr(handle, "call_kwargs", {})
        if callable(getattr(handle, "on_step", None)):
            self.monitor.hooks.append(handle.on_step)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline call's arguments: the requests', then the techniques'."""
        prompts = self.per_image(lambda r: r.prompt), self.per_image(lambda r: r.negative_prompt)
        kwargs = call_kwargs(self.loaded.pipe, self.loaded.spec, self.request, self.seeds, self.monitor, *prompts)
        return kwargs | self.call_kwargs | ({} if self.decode else {"output_type": "latent"})


@dataclass
class Generation:
    """A finished run: its metadata and its pixels (images, or the frames of one video)."""

    result: GenerationResult
    images: list[Image.Image] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # uint8 HxWx3, video models only


def call_kwargs(
    pipe,
    spec: ModelSpec,
    request: GenerationRequest,
    seeds: list[int],
    monitor: StepMonitor,
    prompts: list[str] | None = None,
    negatives: list[str] | None = None,
) -> dict:
    """The pipeline's own call arguments for this request, keeping only those its ``__call__`` takes.

    Several images are one batch, image i with its own prompt and negative prompt (default: the request's) and
    drawing its starting noise from its own seeded generator (diffusers draws sample i from ``generator[i]``): image
    i starts exactly where a one-image request with its seed does."""
    accepted = inspect.signature(pipe.__call__).parameters
    # A CPU generator makes the starting noise the same on every device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    count = len(seeds)
    prompts = prompts or [request.prompt] * count
    negatives = negatives or [request.negative_prompt] * count
    wanted = {
        "prompt": one_or_all(prompts),
        "negative_prompt": one_or_all(negatives) if any(negatives) else None,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "num_frames": request.num_frames,
        "generator": one_or_all(generators),
        "output_type": "np" if spec.kind == "video" else "pil",
        **step_callback(accepted, monitor, type(pipe).__name__),
        **spec.call_kwargs,
    }
    return {name: value for name, value in wanted.items() if name in accepted and value is not None}


def one_or_all(values: list) -> Any:
    """Per-image values as the call takes them: the value itself for one image (a one-image call exactly as before
    batching), the list for several."""
    return values[0] if len(values) == 1 else values


def run_timings(started: float, load_s: float, monitor: StepMonitor, finished: float) -> Timings:
    denoise_s = monitor.last_step_at - monitor.start
    return Timings(
        load_s=load_s,
        denoise_s=denoise_s,
        total_s=finished - started,
        per_step_s=denoise_s / max(monitor.steps_done, 1),
    )


def generation_of(result: GenerationResult, spec: ModelSpec, output) -> Generation:
    if spec.kind == "video":
        frames = np.asarray(output.frames[0])
        return Generation(result, frames=[to_uint8(frame) for frame in frames])
    return Generation(result, images=list(output.images))


def to_uint8(frame: np.ndarray) -> np.ndarray:
    return (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
