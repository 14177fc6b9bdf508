"""The approximate noise-state cache attached to one run: look the prompt up, start after the matched state's steps,
capture this run's states as it denoises, store them when it completes.

Nirvana (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models", NSDI 2024);
the cache itself (index, policy, stores, exact resume) is ``fastgen.cache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastgen.lora.library import fingerprints

if TYPE_CHECKING:
    import torch

    from fastgen.cache.approximate import CacheRun
    from fastgen.engine.run import Run


@dataclass(frozen=True)
class CacheUse:
    """What the request asked of the cache (the service's cache decides the rest)."""

    min_similarity: float | None = None


def from_run(run: Run) -> CacheUse | None:
    """On when the engine has a cache and the request, or the service's default, turns it on."""
    if run.cache is None or not run.cache.enabled_for(run.request):
        return None
    return CacheUse(run.request.accelerate.cache.min_similarity)


def apply(pipe, config: CacheUse, run: Run) -> CachedRun:
    """Look the run up; on a hit the pipeline resumes from the stored state (``start_step`` steps later)."""
    loras = fingerprints(run.adapters)
    cached = run.cache.begin(pipe, run.loaded.spec.name, run.request, run.seed, run.tenant, loras, run.embedded)
    detach, kwargs = cached.resume()
    return CachedRun(cached, detach, kwargs, run)


class CachedRun:
    """The cache's handle: ``start_step`` and ``call_kwargs`` resume a hit, ``on_step`` captures states, ``report``
    stores them after a completed run (unless a technique changed the denoiser mid-run: they are not this prompt's)."""

    def __init__(self, cached: CacheRun, detach, call_kwargs: dict[str, Any], run: Run):
        self.cached, self.detach, self.call_kwargs, self.run = cached, detach, call_kwargs, run
        self.start_step = cached.skipped

    def on_step(self, step: int, latents: torch.Tensor | None) -> None:
        self.cached.on_step(step, latents)

    def remove(self) -> None:
        self.detach()

    def report(self) -> dict[str, Any]:
        if self.run.changed_mid_run:
            self.cached.captured.clear()
        return self.cached.finish()
