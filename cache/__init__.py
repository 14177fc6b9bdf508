"""The approximate noise-state cache across prompts (Agarwal et al., "Approximate Caching for Efficiently Serving
Text-to-Image Diffusion Models", Nirvana, NSDI 2024).

Installed as ``fastgen.cache``. A similar earlier prompt's stored latent after K steps lets a request run only
the remaining steps. Modules: ``embedder`` (prompt vectors), ``index`` (FAISS nearest neighbours), ``store``
(shared records, LCBFU eviction, counters), ``states`` (state files over fsspec), ``policy`` (marks and the
similarity-to-K table), ``resume`` (exact resumption per scheduler), ``approximate`` (what the engine calls),
``check`` and ``calibrate`` (the quality-aware check at resume time and the per-model tables it reads), ``predict``
(the denoiser's predictions the check compares).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastgen.cache.approximate import ApproximateCache
    from fastgen.cache.embedder import DoorEmbedder
    from fastgen.settings import Settings


def open_cache(settings: Settings) -> ApproximateCache | None:
    """The cache the settings describe, over the shared store; None when FASTGEN_CACHE_BYTES is 0."""
    if settings.cache_bytes == 0:
        return None
    from fastgen.cache.approximate import ApproximateCache, CacheConfig
    from fastgen.cache.check import BUILT_IN, load_calibrations
    from fastgen.cache.policy import FASTGEN, POLICIES, QUALITY
    from fastgen.cache.states import StateFiles
    from fastgen.cache.store import open_cache_store

    calibrations = {}
    if settings.cache_policy == QUALITY:  # fastgen's policy, with each calibrated model's own table
        folders = [BUILT_IN, *([Path(settings.cache_calibrations)] if settings.cache_calibrations else [])]
        calibrations = load_calibrations(folders)
    policy = POLICIES.get(settings.cache_policy, FASTGEN)
    if settings.cache_threshold_table is not None:
        policy = dataclasses.replace(policy, thresholds=settings.cache_threshold_table)
    config = CacheConfig(
        budget_bytes=settings.cache_bytes,
        policy=policy,
        embedder=settings.cache_embedder,
        share_across_tenants=settings.cache_share_tenants,
        index=settings.cache_index,
        default_on=settings.cache_default,
        calibrations=calibrations,
    )
    store = open_cache_store(settings.broker_url, settings.data_dir, settings.cache_url)
    return ApproximateCache(config, store, StateFiles(settings.cache_url))


def open_door_embedder(settings: Settings) -> DoorEmbedder | None:
    """The workers' cache embedder, for the door; None when the cache is off or embeds with the pipeline."""
    if settings.cache_bytes == 0 or settings.cache_embedder == "pipeline":
        return None
    from fastgen.cache.embedder import DoorEmbedder

    return DoorEmbedder(settings.cache_embedder, settings.cache_default)
