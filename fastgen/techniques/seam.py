"""What a technique declares: one :class:`Technique` row, with its request field, CLI flags and web page control."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastgen.models.registry import ModelSpec
    from fastgen.schema import GenerationRequest


@dataclass(frozen=True)
class Control:
    """How the web page offers a technique: a checkbox that sets ``accelerate.<name>`` to ``turned_on``."""

    label: str
    explanation: str
    turned_on: Any = True


@dataclass(frozen=True)
class Flag:
    """One ``fastgen generate`` flag and the request field it sets (a dotted path).

    ``switch``: a flag without a value (sets True); ``repeat``: may be given several times (a list). ``convert``
    turns each parsed value into the field's; it may raise :class:`fastgen.errors.InvalidRequest`.
    """

    name: str
    field: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False
    repeat: bool = False
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Technique:
    """One technique's declaration.

    ``options``: its field under the request's ``accelerate`` (pydantic's ``(type, Field(...))``), or None where its
    field lives elsewhere (``option`` names it: LoRAs are the request's own ``loras``). ``asked``: whether a request
    turns it on. ``supported``: whether a model can take it, from the model's spec. ``conflicts``: the techniques a
    request may not combine it with, each with the reason the door gives. ``acceleration``: listed among a model's
    ``accelerations`` (LoRAs are listed on their own, as ``loras``). ``flags``: its ``fastgen generate`` flags.
    ``attach``: the module whose ``from_run(run)`` and ``apply(pipe, config, run)`` attach it to a pipeline for one
    run (``fastgen.accelerators``; imported only by the engine, in table order; torch lives there). None: a worker
    adds it (``parallel``, bound to its process groups).
    """

    name: str
    asked: Callable[[GenerationRequest], bool]
    supported: Callable[[ModelSpec], bool]
    options: tuple[Any, Any] | None = None
    conflicts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    option: str = ""
    acceleration: bool = True
    control: Control | None = None
    flags: tuple[Flag, ...] = ()
    attach: str | None = None

    @property
    def request_field(self) -> str:
        return self.option or f"accelerate.{self.name}"
