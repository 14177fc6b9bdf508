"""The generation engine: a warm pipeline per model, one request at a time per pipeline.

``Engine.run`` takes a validated request, fills the model's defaults, attaches the accelerators
the request asks for, calls the ordinary diffusers pipeline and detaches them again in
try/finally, so the pool's pipelines are always clean between requests. The step callback is the
one place where progress is reported and cancellation is honoured (between denoising steps).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from fastgen.accelerators import ACCELERATORS, Accelerator, attach
from fastgen.errors import Cancelled, ModelLoadError
from fastgen.jobs import DEFAULT_TENANT
from fastgen.lora.hotswap import ActiveLoras, AdapterSlots
from fastgen.lora.library import LoraInfo, LoraLibrary
from fastgen.models.registry import ModelRegistry, ModelSpec
from fastgen.request import AccelerationReport, GenerationRequest, GenerationResult, Timings, parse_request
from fastgen.settings import Settings

if TYPE_CHECKING:
    from fastgen.cache.approximate import ApproximateCache
    from fastgen.cache.embedder import PromptEmbedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Reported after every denoising step."""

    step: int
    total: int
    elapsed_s: float
    eta_s: float


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


StepCallback = Callable[[Progress], None]


@dataclass
class Generation:
    """A finished run: its metadata and its pixels (images, or the frames of one video)."""

    result: GenerationResult
    images: list[Image.Image] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # uint8 HxWx3, video models only


@dataclass
class LoadedPipeline:
    spec: ModelSpec
    pipe: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: AdapterSlots | None = None  # LoRA slots, made on the first request with LoRAs


@dataclass
class Run:
    """One pipeline call, built once by ``Engine.run``: the request with its model's defaults, the seed, the LoRAs
    from the library, the tenant and prompt vector the cache looks up by, and the step monitor the techniques hook
    into. One request per call today; request batching will make it hold several."""

    loaded: LoadedPipeline
    request: GenerationRequest
    seed: int
    tenant: str
    monitor: StepMonitor
    adapters: list[tuple[LoraInfo, float]]
    decode: bool = True  # False: stop at the latents (the helper ranks of a multi-device worker)
    embedded: PromptEmbedding | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class PipelinePool:
    """Loads each model once per process and keeps it warm."""

    def __init__(self, registry: ModelRegistry, device: torch.device, dtype: torch.dtype):
        self.registry, self.device, self.dtype = registry, device, dtype
        self._loaded: dict[str, LoadedPipeline] = {}
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}

    def get(self, spec: ModelSpec) -> tuple[LoadedPipeline, float]:
        """The warm pipeline and how long this call spent loading it (0 when it was warm)."""
        with self._lock:
            model_lock = self._model_locks.setdefault(spec.name, threading.Lock())
        with model_lock:
            if spec.name in self._loaded:
                return self._loaded[spec.name], 0.0
            start = time.perf_counter()
            loaded = self._loaded[spec.name] = LoadedPipeline(spec, self._load(spec))
            load_s = time.perf_counter() - start
            logger.info("loaded %s on %s in %.2fs", spec.name, self.device, load_s)
            return loaded, load_s

    def _load(self, spec: ModelSpec):
        from diffusers import DiffusionPipeline

        source = self.registry.source(spec)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=self.dtype, local_files_only=spec.builtin)
        except Exception as exc:
            raise ModelLoadError(f"could not load model {spec.name!r} from {source}: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        use_fast_attention(pipe, self.device)
        return pipe


def use_fast_attention(pipe, device: torch.device) -> None:
    """xformers' memory-efficient attention on CUDA when installed; PyTorch SDPA (the default) elsewhere."""
    if device.type != "cuda":
        return
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
        logger.info("using xformers memory-efficient attention")
    except Exception as exc:  # missing or built for another torch: SDPA is a fine fallback
        logger.info("xformers unavailable (%s); using PyTorch SDPA", exc)


class StepMonitor:
    """The pipeline's ``callback_on_step_end``: progress, ETA, cooperative cancellation, state capture.

    ``skipped`` steps were not run (a resumed run starts after them): progress counts the full schedule.
    Each of ``hooks`` is called as ``hook(step, latents)`` after each step of the full schedule (the cache captures
    states there; a LoRA loaded in the background is switched on there).
    """

    def __init__(
        self,
        total: int,
        on_step: StepCallback | None,
        cancel: CancelFlag | None,
        skipped: int = 0,
    ):
        self.total, self.on_step, self.cancel = total, on_step, cancel
        self.skipped = skipped
        self.hooks: list[Callable[[int, torch.Tensor | None], None]] = []
        self.start = time.perf_counter()
        self.last_step_at = self.start
        self.steps_done = 0  # steps this run computed

    def __call__(self, pipe, index: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = index + 1
        # Some schedulers add steps; a resumed pipeline counts only the steps it runs.
        self.total = self.skipped + (getattr(pipe, "_num_timesteps", None) or self.total - self.skipped)
        self.last_step_at = time.perf_counter()
        elapsed = self.last_step_at - self.start
        step = self.skipped + self.steps_done
        eta = elapsed / self.steps_done * (self.total - step)
        for hook in self.hooks:
            hook(step, callback_kwargs.get("latents"))
        if self.on_step is not None:
            self.on_step(Progress(step, self.total, elapsed, eta))
        self.check_cancel()
        return callback_kwargs

    def legacy_callback(self, index: int, timestep, latents) -> None:
        """The older ``callback(step, timestep, latents)`` some pipelines (PixArt) still take instead."""
        self(None, index, timestep, {"latents": latents})

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(self.skipped + self.steps_done, self.total)


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
        spec, request = self.prepare(request)
        adapters = self.adapters(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return self.run_resolved(
            spec, request, seed, adapters, on_step, cancel, result_id, tenant, decode, embedded, started
        )

    def run_resolved(
        self,
        spec: ModelSpec,
        request: GenerationRequest,
        seed: int,
        adapters: list[tuple[LoraInfo, float]],
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
        loaded, load_s = self.pool.get(spec)
        monitor = StepMonitor(request.steps, on_step, cancel)
        monitor.check_cancel()
        run = Run(loaded, request, seed, tenant, monitor, adapters, decode, embedded)
        with loaded.lock:
            output, reports = self._generate(run)
        finished = time.perf_counter()
        result = GenerationResult(
            id=result_id or uuid.uuid4().hex,
            request=request.model_copy(update={"seed": seed}),
            model=spec.name,
            seed=seed,
            width=request.width,
            height=request.height,
            steps=request.steps,
            num_frames=request.num_frames,
            output_format=request.output_format,
            device=str(self.device),
            timings=_timings(started, load_s, monitor, finished),
            accelerations=reports,
        )
        return _generation(result, spec, output) if decode else Generation(result)

    def adapters(self, request: GenerationRequest) -> list[tuple[LoraInfo, float]]:
        """The request's LoRAs from the library, with their scales; LoraError names an unusable one."""
        return [(self.loras.get(lora.name, f"loras[{i}]"), lora.scale) for i, lora in enumerate(request.loras)]

    def _generate(self, run: Run) -> tuple[Any, list[AccelerationReport]]:
        """Look up the cache, switch on the LoRAs, attach the accelerators, run the pipeline; whatever happens, each is
        taken off again in the reverse order (the stack)."""
        pipe, request = run.loaded.pipe, run.request
        with ExitStack() as attached_here:
            cached = self._begin_cache(run)
            loras = self._activate(run)
            if loras:
                attached_here.callback(loras.remove)
            accelerators = attach(pipe, request, self.accelerators)
            attached_here.callback(accelerators.remove)
            resume_kwargs = {}
            if cached:
                detach_resume, resume_kwargs = cached.resume()
                attached_here.callback(detach_resume)
            run.monitor.start = time.perf_counter()
            kwargs = call_kwargs(pipe, run.loaded.spec, request, run.seed, run.monitor) | resume_kwargs
            output = pipe(**kwargs | ({} if run.decode else {"output_type": "latent"}))
            reports = accelerators.reports()
        if loras:
            reports.insert(0, AccelerationReport(name="loras", details=loras.report()))
        if cached:
            if loras and loras.applied_late:  # its first steps ran without the adapter: not this prompt's states
                cached.captured.clear()
            reports.append(AccelerationReport(name="cache", details=cached.finish()))
        return output, reports

    def _begin_cache(self, run: Run):
        """The cache's decision for this run (a hit sets where it starts), or None with the cache off."""
        if not self.cache:
            return None
        fingerprints = tuple((info.name, info.sha256, scale) for info, scale in run.adapters)
        spec, pipe = run.loaded.spec, run.loaded.pipe
        cached = self.cache.begin(pipe, spec.name, run.request, run.seed, run.tenant, fingerprints, run.embedded)
        if cached:
            run.monitor.skipped = cached.skipped
            run.monitor.hooks.append(cached.on_step)
        return cached

    def _activate(self, run: Run) -> ActiveLoras | None:
        loaded, adapters, monitor = run.loaded, run.adapters, run.monitor
        if not adapters:
            return None
        if loaded.adapters is None:
            loaded.adapters = AdapterSlots(loaded.pipe, self.loras, self.settings.lora_slots)
        # Due by the last step at the latest; a resumed run starts after its skipped steps, so an adapter due by
        # then is swapped in before the first.
        by_step = min(self.settings.lora_apply_by_step, monitor.total - 1)
        loras = loaded.adapters.activate(adapters, by_step if by_step > monitor.skipped else 0)
        monitor.hooks.append(loras.on_step)
        return loras


def call_kwargs(pipe, spec: ModelSpec, request: GenerationRequest, seed: int, monitor: StepMonitor) -> dict:
    """The pipeline's own call arguments for this request, keeping only those its ``__call__`` takes."""
    accepted = inspect.signature(pipe.__call__).parameters
    wanted = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "num_frames": request.num_frames,
        # A CPU generator makes the starting noise the same on every device.
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np" if spec.kind == "video" else "pil",
        **step_callback(accepted, monitor, type(pipe).__name__),
        **spec.call_kwargs,
    }
    return {name: value for name, value in wanted.items() if name in accepted and value is not None}


def step_callback(accepted: Mapping[str, Any], monitor: StepMonitor, pipeline_name: str) -> dict:
    """Hook the monitor into whichever step callback the pipeline's ``__call__`` (``accepted``) has."""
    if "callback_on_step_end" in accepted:
        return {"callback_on_step_end": monitor}
    if "callback" in accepted:
        return {"callback": monitor.legacy_callback, "callback_steps": 1}
    logger.warning("%s has no step callback: no progress or cancellation", pipeline_name)
    return {}


def _timings(started: float, load_s: float, monitor: StepMonitor, finished: float) -> Timings:
    denoise_s = monitor.last_step_at - monitor.start
    return Timings(
        load_s=load_s,
        denoise_s=denoise_s,
        total_s=finished - started,
        per_step_s=denoise_s / max(monitor.steps_done, 1),
    )


def _generation(result: GenerationResult, spec: ModelSpec, output) -> Generation:
    if spec.kind == "video":
        frames = np.asarray(output.frames[0])
        return Generation(result, frames=[to_uint8(frame) for frame in frames])
    return Generation(result, images=list(output.images))


def to_uint8(frame: np.ndarray) -> np.ndarray:
    return (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
