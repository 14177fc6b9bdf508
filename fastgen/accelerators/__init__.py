"""The accelerator seam: every technique attaches to a pipeline and can be taken off again.

An accelerator is a frozen config plus ``apply(pipe, config) -> Handle``; ``handle.remove()``
restores the pipeline exactly, so after removal its output is bit-identical to a pipeline that
never had it. The engine composes the accelerators a request asks for inside try/finally.

Accelerators are found by the request option that turns them on (``request.accelerate.<name>``),
through the :data:`ACCELERATORS` table: adding one is a module with a config, ``from_request``
and ``apply``, and a row here. A worker may add rows of its own (a multi-device worker adds
``parallel``, bound to its process groups).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fastgen.accelerators import fuse_qkv, sparse_attention
from fastgen.request import AccelerationReport, GenerationRequest

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


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("fuse_qkv", fuse_qkv.from_request, fuse_qkv.apply),
    Accelerator("sparse_attention", sparse_attention.from_request, sparse_attention.apply),
)


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
