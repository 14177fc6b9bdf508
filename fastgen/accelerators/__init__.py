"""The accelerator seam: every technique attaches to a pipeline and can be taken off again.

An accelerator is a frozen config plus ``apply(pipe, config) -> Handle``; ``handle.remove()``
restores the pipeline exactly, so after removal its output is bit-identical to a pipeline that
never had it. The engine composes the accelerators a request asks for inside try/finally.

Accelerators are found by the request option that turns them on (``request.accelerate.<name>``),
through the :data:`ACCELERATORS` table, made from the technique table's rows that name a module to
``attach`` (``fastgen.techniques``), in its order: adding one is a module here with a config,
``from_request`` and ``apply``, and its declaration there. A worker may add rows of its own (a
multi-device worker adds ``parallel``, bound to its process groups).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fastgen import techniques
from fastgen.schema import AccelerationReport, GenerationRequest
from fastgen.techniques.seam import Technique

logger = logging.getLogger(__name__)


class Handle(Protocol):
    """What ``apply`` returns: ``remove()`` puts the pipeline back as it was."""

    def remove(self) -> None: ...

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Accelerator:
    """One technique: how a request turns it on, and how it attaches."""

    name: str
    from_request: Callable[[GenerationRequest], Any | None]  # the technique's frozen config, or None when off
    apply: Callable[[Any, Any], Handle]


def accelerators(table: tuple[Technique, ...] | None = None) -> tuple[Accelerator, ...]:
    """The accelerators of the technique table's rows that name a module to attach, in the table's order."""
    modules = {t.name: importlib.import_module(t.attach) for t in table or techniques.TECHNIQUES if t.attach}
    return tuple(Accelerator(name, module.from_request, module.apply) for name, module in modules.items())


ACCELERATORS: tuple[Accelerator, ...] = accelerators()


@dataclass
class AttachedAccelerators:
    """The accelerators attached for one run, removed together in reverse order."""

    attached: list[tuple[Accelerator, Any, Handle]] = field(default_factory=list)

    def remove(self) -> None:
        errors = []
        while self.attached:
            accelerator, _, handle = self.attached.pop()
            try:
                handle.remove()
            except Exception as exc:  # keep removing the rest; a half-restored pipeline is worse
                logger.exception("removing %s failed", accelerator.name)
                errors.append(exc)
        if errors:
            raise errors[0]

    def reports(self) -> list[AccelerationReport]:
        return [
            AccelerationReport(name=acc.name, config=asdict(config), details=handle.report())
            for acc, config, handle in self.attached
        ]


def attach(pipe, request: GenerationRequest, table: tuple[Accelerator, ...] = ACCELERATORS) -> AttachedAccelerators:
    """Attach every accelerator ``request`` turns on; if one fails, those already attached come off again."""
    stack = AttachedAccelerators()
    try:
        for accelerator in table:
            config = accelerator.from_request(request)
            if config is not None:
                stack.attached.append((accelerator, config, accelerator.apply(pipe, config)))
    except BaseException:
        stack.remove()
        raise
    return stack
