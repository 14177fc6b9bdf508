"""The accelerator seam: every technique attaches to a pipeline for one run and can be taken off again.

An accelerator is a frozen config plus ``apply(pipe, config, run) -> Handle``; ``handle.remove()``
restores the pipeline exactly, so after removal its output is bit-identical to a pipeline that
never had it. ``from_run(run)`` gives the config a run asks for, or None when it does not use the
technique. A handle may also take part in the run: ``start_step`` (the steps it lets the run skip:
the cache's resume), ``call_kwargs`` (arguments it adds to the pipeline call) and ``on_step(step,
latents)`` (called after every step). ``report()`` is called once after a completed call; a
technique that keeps something from the run does so there (the cache stores its states). It says
what it did as one dict, or as a list of one per member of the run (several requests batched).

Accelerators are the technique table's rows that name a module to ``attach`` (``fastgen.techniques``),
in its order: the cache decides the start step before LoRAs are switched on, and those that swap
attention processors come after both. Adding one is a module here with its config, ``from_run``
and ``apply``, and its declaration there. A worker may add rows of its own (a multi-device worker
adds ``parallel``, bound to its process groups).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastgen import techniques
from fastgen.schema import AccelerationReport
from fastgen.techniques.seam import Technique

if TYPE_CHECKING:
    from fastgen.engine.run import Run

logger = logging.getLogger(__name__)


class Handle(Protocol):
    """What ``apply`` returns: ``remove()`` puts the pipeline back as it was; ``report()`` says what it did.

    Optional, read by ``Run.take_part``: ``start_step: int``, ``call_kwargs: dict``, ``on_step(step, latents)``."""

    def remove(self) -> None: ...

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Accelerator:
    """One technique: how a request turns it on, and how it attaches."""

    name: str
    from_run: Callable[[Run], Any | None]  # the technique's frozen config for the run, or None when off
    apply: Callable[[Any, Any, Run], Handle]


def accelerators(table: tuple[Technique, ...] | None = None) -> tuple[Accelerator, ...]:
    """The accelerators of the technique table's rows that name a module to attach, in the table's order."""
    modules = {t.name: importlib.import_module(t.attach) for t in table or techniques.TECHNIQUES if t.attach}
    return tuple(Accelerator(name, module.from_run, module.apply) for name, module in modules.items())


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

    def reports(self, members: int = 1) -> list[list[AccelerationReport]]:
        """Each member's reports, in the table's order. A handle's ``report()`` is one dict for every member, or a
        list with one per member (None where the technique did nothing for that member)."""
        per_member: list[list[AccelerationReport]] = [[] for _ in range(members)]
        for accelerator, config, handle in self.attached:
            report = handle.report()
            for reports, details in zip(
                per_member, report if isinstance(report, list) else [report] * members, strict=True
            ):
                if details is not None:
                    reports.append(AccelerationReport(name=accelerator.name, config=asdict(config), details=details))
        return per_member


def attach(pipe, run: Run, table: tuple[Accelerator, ...] = ACCELERATORS) -> AttachedAccelerators:
    """Attach every accelerator ``run`` uses, in the table's order, each taking part in the run as its handle says
    (later rows see the start step earlier ones set); if one fails, those already attached come off again."""
    stack = AttachedAccelerators()
    try:
        for accelerator in table:
            config = accelerator.from_run(run)
            if config is not None:
                handle = accelerator.apply(pipe, config, run)
                stack.attached.append((accelerator, config, handle))
                run.take_part(handle)
    except BaseException:
        stack.remove()
        raise
    return stack
