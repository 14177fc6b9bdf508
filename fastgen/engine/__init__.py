"""The generation engine: a warm pipeline per model (``pool``), one run per pipeline call (``run``), one step
monitor per run (``monitor``), one request at a time per pipeline.

``Engine.run`` takes a validated request, fills the model's defaults, builds its ``Run``, attaches
every technique the run uses (``fastgen.accelerators``, in the technique table's order), calls the
ordinary diffusers pipeline and detaches them again whatever happens, so the pool's pipelines are
always clean between requests. The step callback is the
one place where progress is reported and cancellation is honoured (between denoising steps).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from fastgen.accelerators import ACCELERATORS, Accelerator, attach
from fastgen.engine.monitor import CancelFlag, Progress, StepCallback, StepMonitor
from fastgen.engine.pool import LoadedPipeline, PipelinePool, resolve_device, resolve_dtype
from fastgen.engine.run import Generation, ResolvedRequest, Run, call_kwargs, generation_of, run_timings, to_uint8
from fastgen.jobs import DEFAULT_TENANT
from fastgen.lora.library import LoraInfo, LoraLibrary
from fastgen.models.registry import ModelRegistry, ModelSpec
from fastgen.schema import AccelerationReport, GenerationRequest, GenerationResult, parse_request
from fastgen.settings import Settings

if TYPE_CHECKING:
    from fastgen.cache.approximate import ApproximateCache
    from fastgen.cache.embedder import PromptEmbedding

__all__ = [
    "CancelFlag",
    "Engine",
    "Generation",
    "LoadedPipeline",
    "PipelinePool",
    "Progress",
    "ResolvedRequest",
    "Run",
    "StepCallback",
    "StepMonitor",
    "call_kwargs",
    "resolve_device",
    "resolve_dtype",
    "to_uint8",
]

logger = logging.getLogger(__name__)


class Engine:
    """Runs generation requests on warm pipelines."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        accelerators: tuple[Accelerator, ...] = ACCELERATORS,
        cache: ApproximateCache | None = None,
        loras: LoraLibrary | None = None,
    ):
        """``loras``: the LoRA library (default: the one in ``settings.lora_dir``)."""
        self.settings, self.cache = settings, cache
        self.loras = loras or LoraLibrary(settings.lora_dir, settings.lora_host_bytes)
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.device = resolve_device(settings.device)
        self.pool = PipelinePool(self.registry, self.device, resolve_dtype(settings.dtype, self.device))
        self.accelerators = accelerators

    def prepare(self, request: GenerationRequest | dict) -> tuple[ModelSpec, GenerationRequest]:
        """Validate against the limits and the model; return the spec and the request with defaults filled."""
        request = parse_request(request, self.settings.limits)
        spec = self.registry.resolve(request.model or self.settings.default_model)
        return spec, spec.complete(request, self.settings.limits)

    def run(
        self,
        request: GenerationRequest | dict,
        on_step: StepCallback | None = None,
        cancel: CancelFlag | None = None,
        result_id: str | None = None,
        tenant: str = DEFAULT_TENANT,
        decode: bool = True,
        embedded: PromptEmbedding | None = None,
    ) -> Generation:
        """Generate what ``request`` asks for. Raises InvalidRequest, ModelLoadError or Cancelled.

        ``result_id`` names the result (a job's id, so a redelivered job overwrites its own artifacts);
        ``tenant`` partitions the approximate cache. ``decode=False`` stops at the latents (no images or frames): for
        the ranks of a multi-device worker that only help rank 0 denoise. ``embedded``: the prompt's cache vector
        when the door computed it.
        """
        started = time.perf_counter()
        return self.run_resolved(self.resolve(request), on_step, cancel, result_id, tenant, decode, embedded, started)

    def resolve(self, request: GenerationRequest | dict) -> ResolvedRequest:
        """``prepare``, then the LoRAs from the library and the seed (random where the request leaves it open)."""
        spec, request = self.prepare(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return ResolvedRequest(spec, request, seed, self.adapters(request))

    def run_resolved(
        self,
        resolved: ResolvedRequest,
        on_step: StepCallback | None = None,
        cancel: CancelFlag | None = None,
        result_id: str | None = None,
        tenant: str = DEFAULT_TENANT,
        decode: bool = True,
        embedded: PromptEmbedding | None = None,
        started: float | None = None,
    ) -> Generation:
        """``run`` for a request already resolved: validated and completed (``prepare``), its seed and LoRAs fixed.

        Nothing is validated or decided again: the ranks of a multi-device worker run rank 0's plan this way.
        """
        started = time.perf_counter() if started is None else started
        spec, request, seed = resolved.spec, resolved.request, resolved.seed
        loaded, load_s = self.pool.get(spec)
        monitor = StepMonitor(request.steps, on_step, cancel)
        monitor.check_cancel()
        run = Run(loaded, request, seed, tenant, monitor, resolved.adapters, self.settings, self.cache, self.loras)
        run.decode, run.embedded = decode, embedded
        with loaded.lock:
            output, reports = self._generate(run)
        finished = time.perf_counter()
        result = GenerationResult(
            id=result_id or uuid.uuid4().hex,
            request=request.model_copy(update={"seed": seed}),
            model=spec.name,
            seed=seed,
            seeds=resolved.seeds,
            width=request.width,
            height=request.height,
            steps=request.steps,
            num_frames=request.num_frames,
            output_format=request.output_format,
            device=str(self.device),
            timings=run_timings(started, load_s, monitor, finished),
            accelerations=reports,
        )
        return generation_of(result, spec, output) if decode else Generation(result)

    def adapters(self, request: GenerationRequest) -> list[tuple[LoraInfo, float]]:
        """The request's LoRAs from the library, with their scales; LoraError names an unusable one."""
        return [(self.loras.get(lora.name, f"loras[{i}]"), lora.scale) for i, lora in enumerate(request.loras)]

    def _generate(self, run: Run) -> tuple[Any, list[AccelerationReport]]:
        """Attach the techniques the run uses (in the table's order), call the pipeline, collect their reports;
        whatever happens, each is taken off again in the reverse order."""
        with ExitStack() as attached_here:
            attached = attach(run.loaded.pipe, run, self.accelerators)
            attached_here.callback(attached.remove)
            run.monitor.start = time.perf_counter()
            output = run.loaded.pipe(**run.pipeline_kwargs())
            return output, attached.reports()
