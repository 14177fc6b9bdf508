"""One warm pipeline per model per process, with its lock and its LoRA slots."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgen.errors import ModelLoadError
from fastgen.lora.hotswap import AdapterSlots
from fastgen.models.registry import ModelRegistry, ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    spec: ModelSpec
    pipe: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: AdapterSlots | None = None  # LoRA slots, made on the first request with LoRAs


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
