"""Every technique a request can ask for, in one ordered table: what turns it on, which models take it, what it is
refused with, and how the web page offers it.

The door (``ModelSpec.complete``), ``GET /v1/models`` (``ModelSpec.capabilities``) and the web page's controls all
read :data:`TECHNIQUES`, so the rules between techniques live here and nowhere else. The table's order is the order
the engine applies them in: the cache decides the start step before LoRAs are switched on, and the accelerators that
swap attention processors attach after both. Torch-free: the API tier and the page import it.

How each one attaches to a pipeline is its own module's business (``fastgen.accelerators``, ``fastgen.cache``,
``fastgen.lora``, ``fastgen.parallel``); this table only declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastgen.models.registry import ModelSpec
    from fastgen.request import GenerationRequest

# Pipelines whose denoiser takes LoRA adapters through diffusers' hot-swap (tested: Stable Diffusion and Wan).
LORA_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline", "WanPipeline"})

# Pipelines whose denoiser fastgen.parallel splits (UNets by row strips, PixArt and Wan DiTs by token chunks).
# Not Flux or SD3 (joint text-image attention) nor AnimateDiff (temporal attention), which it would split wrongly.
SPLITTABLE_PIPELINES = frozenset(
    (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "WanPipeline",
    )
)


@dataclass(frozen=True)
class Control:
    """How the web page offers a technique: a checkbox that sets ``accelerate.<name>`` to ``turned_on``."""

    label: str
    explanation: str
    turned_on: Any = True


@dataclass(frozen=True)
class Technique:
    """One technique's declaration.

    ``option``: the request field that turns it on (``accelerate.<name>`` unless said otherwise). ``asked``: whether a
    request turns it on. ``supported``: whether a model can take it, from the model's spec. ``conflicts``: the
    techniques a request may not combine it with, each with the reason the door gives. ``acceleration``: listed
    among a model's ``accelerations`` (LoRAs are listed on their own, as ``loras``).
    """

    name: str
    asked: Callable[[GenerationRequest], bool]
    supported: Callable[[ModelSpec], bool]
    conflicts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    option: str = ""
    acceleration: bool = True
    control: Control | None = None

    @property
    def request_field(self) -> str:
        return self.option or f"accelerate.{self.name}"


TECHNIQUES: tuple[Technique, ...] = (
    Technique(
        "cache",
        asked=lambda r: r.accelerate.cache.enabled,
        supported=lambda spec: "cache" in spec.accelerations,
        control=Control(
            "Approximate cache",
            "Start from a similar earlier prompt's half-finished image and skip its first steps: faster, approximate.",
            {"enabled": True},
        ),
    ),
    Technique(
        "loras",
        asked=lambda r: bool(r.loras),
        supported=lambda spec: spec.pipeline_class in LORA_PIPELINES,
        option="loras",
        acceleration=False,
    ),
    Technique(
        "fuse_qkv",
        asked=lambda r: r.accelerate.fuse_qkv,
        supported=lambda spec: "fuse_qkv" in spec.accelerations,
        # The fused projection is built from the base weights alone.
        conflicts=MappingProxyType({"loras": "cannot be combined with loras: it would bypass them"}),
        control=Control(
            "Fused Q/K/V projections",
            "One matmul instead of three for each attention's query, key and value: the same image up to rounding.",
        ),
    ),
    Technique(
        "sparse_attention",
        asked=lambda r: r.accelerate.sparse_attention.asked,
        supported=lambda spec: bool(spec.sparse_attention_modes),
        control=Control(
            "Sparse attention",
            "Each query attends to a window of nearby tokens (about 3%), rescaled to stay close to dense: DiTs only.",
            {"mode": "window"},
        ),
    ),
    # Composes with sparse attention only where it keeps each sequence whole (a CFG split, or a UNet's row strips):
    # a rule of the worker's device layout, decided there (fastgen.parallel.layout), since it depends on the group.
    Technique(
        "parallel",
        asked=lambda r: r.accelerate.parallel.asked,
        supported=lambda spec: spec.pipeline_class in SPLITTABLE_PIPELINES,
    ),
)


def by_name(table: tuple[Technique, ...] | None = None) -> dict[str, Technique]:
    return {technique.name: technique for technique in table or TECHNIQUES}


def accelerations(spec: ModelSpec, table: tuple[Technique, ...] | None = None) -> frozenset[str]:
    """The accelerations a model takes (its capabilities' ``accelerations``)."""
    return frozenset(t.name for t in table or TECHNIQUES if t.acceleration and t.supported(spec))


def conflicts(
    request: GenerationRequest, spec: ModelSpec, table: tuple[Technique, ...] | None = None
) -> list[tuple[str, str]]:
    """(field, reason) for each pair of techniques the request asks for together that the table refuses, said on the
    field of the one declaring it; a technique the model does not take is refused as that instead."""
    table = table or TECHNIQUES
    asked = {t.name for t in table if t.asked(request) and t.supported(spec)}
    return [
        (technique.request_field, reason)
        for technique in table
        if technique.name in asked
        for other, reason in technique.conflicts.items()
        if other in asked
    ]
