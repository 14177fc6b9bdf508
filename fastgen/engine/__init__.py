"""The generation engine: a warm pipeline per model (``pool``), one run per pipeline call (``run``), one step
monitor per run (``monitor``), one request at a time per pipeline.

``Engine.run`` takes a validated request, fills the model's defaults, builds its ``Run``, attaches
every technique the run uses (``fastgen.accelerators``, in the technique table's order), calls the
ordinary diffusers pipeline and detaches them again whatever happens, so the pool's pipelines are
always clean between requests. The step callback is the
one place where progress is reported and cancellation is honoured (between denoising steps).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
import uuid
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from fastgen.accelerators import ACCELERATORS, Accelerator, attach
from fastgen.engine.batch import Member, MemberFlags, batch_key, batch_report
from fastgen.engine.monitor import CancelFlag, Progress, StepCallback, StepMonitor
from fastgen.engine.pool import LoadedPipeline, PipelinePool, resolve_device, resolve_dtype
from fastgen.engine.probe import predict
from fastgen.engine.run import Generation, ResolvedRequest, Run, call_kwargs, generation_of, run_timings, to_uint8
from fastgen.errors import Cancelled
from fastgen.jobs import DEFAULT_TENANT
from fastgen.lora.library import LoraInfo, LoraLibrary, fingerprints
from fastgen.models.registry import ModelRegistry, ModelSpec
from fastgen.schema import AccelerationReport, BatchReport, GenerationRequest, GenerationResult, parse_request
from fastgen.settings import Settings

if TYPE_CHECKING:
    from fastgen.cache.approximate import ApproximateCache, CacheRun
    from fastgen.cache.embedder import PromptEmbedding

__all__ = [
    "CancelFlag",
    "Engine",
    "Generation",
    "LoadedPipeline",
    "Member",
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
        member = Member(resolved, result_id or uuid.uuid4().hex, tenant, on_step, cancel, embedded)
        member.started = time.perf_counter() if started is None else started
        (outcome,) = self.run_members([member], decode)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run_members(self, members: list[Member], decode: bool = True) -> list[Generation | BaseException]:
        """Run resolved requests that share a batch key (``fastgen.engine.batch``) together: one pipeline call per
        approximate-cache start step among them. Each gets its Generation, or what stopped it (Cancelled).

        Each member's cancel flag is asked once before anything is done for it (a multi-device worker's flag is a
        collective every rank asks alike), then after every step."""
        for member in members:
            if member.cancel_requested():
                member.cancelled = Cancelled(0, member.request.steps)
        live = [member for member in members if member.cancelled is None]
        if not live:
            return [member.cancelled for member in members]
        loaded, load_s = self.pool.get(live[0].resolved.spec)
        keys = {json.dumps(batch_key(m.request), sort_keys=True) for m in members}
        if len(keys) > 1:
            raise ValueError("the requests of one batch must share their batch key")
        outcomes: dict[int, Generation | BaseException] = {}
        with loaded.lock:
            for member in live:
                if not member.looked_up:
                    member.cached = self.look_up(loaded, member)
            for start in sorted({member.start_step for member in live}):
                group = [member for member in live if member.start_step == start]
                for member, outcome in zip(group, self._run_together(loaded, load_s, group, decode), strict=True):
                    outcomes[id(member)] = outcome
        return [outcomes.get(id(member), member.cancelled) for member in members]

    def look_up(self, loaded: LoadedPipeline, member: Member) -> CacheRun | None:
        """The member's approximate-cache lookup (a hit says where it starts), or None when it does not use it."""
        if self.cache is None or not self.cache.enabled_for(member.request):
            return None
        resolved, pipe = member.resolved, loaded.pipe
        loras = fingerprints(resolved.adapters)
        probe = functools.partial(
            predict, loaded, member, settings=self.settings, library=self.loras, accelerators=self.accelerators
        )
        return self.cache.begin(
            pipe,
            resolved.spec.name,
            resolved.request,
            resolved.seed,
            member.tenant,
            loras,
            member.embedded,
            probe=probe,
        )

    def _run_together(
        self, loaded: LoadedPipeline, load_s: float, members: list[Member], decode: bool
    ) -> list[Generation | BaseException]:
        """One pipeline call for ``members`` (one start step); a member cancelled mid-call has its images dropped."""
        try:
            return self._call(loaded, load_s, members, decode)
        except Cancelled as exc:  # every member was cancelled (one alone: its own flag)
            return [member.cancelled or exc for member in members]

    def _call(
        self, loaded: LoadedPipeline, load_s: float, members: list[Member], decode: bool
    ) -> list[Generation | BaseException]:
        request = members[0].request
        if len(members) == 1:
            monitor = StepMonitor(request.steps, members[0].on_step, members[0].cancel)
        else:
            flags = MemberFlags(members)
            monitor = StepMonitor(request.steps, flags.on_step, flags)
        run = Run(loaded, members, monitor, self.settings, self.cache, self.loras, decode)
        output, reports = self._generate(run)
        finished = time.perf_counter()
        images = list(output.images) if decode and loaded.spec.kind == "image" else []
        generations: list[Generation | BaseException] = []
        first = 0
        for member, member_reports in zip(members, reports, strict=True):
            count = len(member.seeds)
            if member.cancelled is not None:
                generations.append(member.cancelled)
            else:
                result = self._result(member, monitor, load_s, finished, member_reports, batch_report(member, members))
                if not decode:
                    generations.append(Generation(result))
                elif loaded.spec.kind == "video":
                    generations.append(generation_of(result, loaded.spec, output))
                else:
                    generations.append(Generation(result, images=images[first : first + count]))
            first += count
        return generations

    def _result(
        self,
        member: Member,
        monitor: StepMonitor,
        load_s: float,
        finished: float,
        reports: list[AccelerationReport],
        batch: BatchReport | None,
    ) -> GenerationResult:
        request, seed, spec = member.request, member.resolved.seed, member.resolved.spec
        return GenerationResult(
            id=member.result_id,
            request=request.model_copy(update={"seed": seed}),
            model=spec.name,
            seed=seed,
            seeds=member.seeds,
            width=request.width,
            height=request.height,
            steps=request.steps,
            num_frames=request.num_frames,
            output_format=request.output_format,
            device=str(self.device),
            timings=run_timings(member.started, load_s, monitor, finished),
            accelerations=reports,
            batch=batch,
        )

    def adapters(self, request: GenerationRequest) -> list[tuple[LoraInfo, float]]:
        """The request's LoRAs from the library, with their scales; LoraError names an unusable one."""
        return [(self.loras.get(lora.name, f"loras[{i}]"), lora.scale) for i, lora in enumerate(request.loras)]

    def _generate(self, run: Run) -> tuple[Any, list[list[AccelerationReport]]]:
        """Attach the techniques the run uses (in the table's order), call the pipeline, collect each member's reports;
        whatever happens, each is taken off again in the reverse order."""
        with ExitStack() as attached_here:
            attached = attach(run.loaded.pipe, run, self.accelerators)
            attached_here.callback(attached.remove)
            run.monitor.start = time.perf_counter()
            output = run.loaded.pipe(**run.pipeline_kwargs())
            return output, attached.reports(len(run.members))
