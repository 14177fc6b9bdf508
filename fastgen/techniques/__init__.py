"""Every technique a request can ask for, in one ordered table: its request options, what turns it on, which models
take it, what it is refused with, its CLI flags and how the web page offers it.

Each technique declares itself in one module here (``cache``, ``loras``, ``fuse_qkv``, ``sparse_attention``,
``parallel``: a :class:`~fastgen.techniques.seam.Technique` named ``TECHNIQUE``). The request's ``accelerate`` options
(``fastgen.schema``), the door (``ModelSpec.complete``), ``GET /v1/models`` (``ModelSpec.capabilities``), the web
page's controls and the ``fastgen generate`` flags all read :data:`TECHNIQUES`, so the rules between techniques live
here and nowhere else. The table's order is the order the engine applies them in: the cache decides the start step
before LoRAs are switched on, and the accelerators that swap attention processors attach after both. Torch-free: the
API tier and the page import it.

Each row's ``attach`` module in ``fastgen.accelerators`` attaches it to one run (the cache, LoRAs, fuse_qkv, sparse
attention); the machinery behind it is its own package's business (``fastgen.cache``, ``fastgen.lora``,
``fastgen.attention``); a multi-device worker adds the ``parallel`` row itself (``fastgen.parallel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastgen.techniques import cache, fuse_qkv, loras, parallel, sparse_attention
from fastgen.techniques.loras import LORA_PIPELINES
from fastgen.techniques.parallel import SPLITTABLE_PIPELINES
from fastgen.techniques.seam import Control, Flag, Technique

if TYPE_CHECKING:
    from fastgen.models.registry import ModelSpec
    from fastgen.schema import GenerationRequest

__all__ = ["LORA_PIPELINES", "SPLITTABLE_PIPELINES", "TECHNIQUES", "Control", "Flag", "Technique"]

TECHNIQUES: tuple[Technique, ...] = tuple(
    module.TECHNIQUE for module in (cache, loras, fuse_qkv, sparse_attention, parallel)
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
