"""The approximate noise-state cache as a technique: its request options, CLI flags and page control.

Nirvana (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models", NSDI 2024);
the cache itself is ``fastgen.cache``, attached to a run by ``fastgen.accelerators.cache``.
"""

from __future__ import annotations

from pydantic import Field

from fastgen.strict import Strict
from fastgen.techniques.seam import Control, Flag, Technique


class CacheOptions(Strict):
    """The approximate noise-state cache: start from a similar earlier prompt's state and skip steps."""

    enabled: bool | None = Field(
        None, description="Use the cache; null: the service's default (FASTGEN_CACHE_DEFAULT)"
    )
    min_similarity: float | None = Field(
        None, ge=0.0, le=1.0, description="Only reuse states of prompts at least this similar (cosine, 0-1)"
    )


TECHNIQUE = Technique(
    "cache",
    attach="fastgen.accelerators.cache",
    asked=lambda r: r.accelerate.cache.enabled,
    supported=lambda spec: "cache" in spec.accelerations,
    options=(CacheOptions, Field(default_factory=CacheOptions)),
    control=Control(
        "Approximate cache",
        "Start from a similar earlier prompt's half-finished image and skip its first steps: faster, approximate.",
        {"enabled": True},
    ),
    flags=(
        Flag(
            "--cache",
            "accelerate.cache.enabled",
            "accelerate: start from a similar earlier prompt's stored state (default: FASTGEN_CACHE_DEFAULT)",
            choices=("on", "off"),
            convert=lambda value: value == "on",
        ),
        Flag(
            "--min-similarity",
            "accelerate.cache.min_similarity",
            "cache: only reuse prompts at least this similar (0-1)",
            type=float,
        ),
    ),
)
