"""Several requests in one pipeline call: what must match for them to share it, and each one's own part of the run.

A batch computes its samples together, so everything that shapes the call as a whole must be equal
(:func:`batch_key`): the model, the size, the steps, the frames, the guidance and the accelerations. What is each
request's own travels per sample: the prompt, the negative prompt, the seeds (one per image) and the LoRAs (each
adapted layer adds each sample's own update: ``fastgen.lora.segmented``, on a compiled denoiser too). The
approximate cache's start step must be equal too; it is known only after each request's lookup, so the engine runs
one call per start step among the requests it is given.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastgen.engine.monitor import CancelFlag, Progress, StepCallback
from fastgen.engine.run import ResolvedRequest
from fastgen.errors import Cancelled
from fastgen.jobs import DEFAULT_TENANT
from fastgen.schema import BatchReport, GenerationRequest

if TYPE_CHECKING:
    from fastgen.cache.approximate import CacheRun
    from fastgen.cache.embedder import PromptEmbedding

# The request fields a batch shares (with the accelerations but the cache, whose start step is matched after lookup).
SHARED_FIELDS = ("model", "width", "height", "steps", "num_frames", "guidance")


def batch_key(request: GenerationRequest) -> dict[str, Any]:
    """What a request (completed with its model's defaults) must have in common with the others of its batch."""
    accelerate = request.accelerate.model_dump(mode="json", exclude={"cache"})
    return {**{name: getattr(request, name) for name in SHARED_FIELDS}, "accelerate": accelerate}


@dataclass
class Member:
    """One request of a run: its resolved request, whose result it is, and its own progress and cancel flag.

    ``on_cancelled`` is told at once when the member's flag is seen set while the others go on; its images are then
    dropped. ``cached`` is its approximate-cache lookup (None when it does not use the cache); ``looked_up``: that
    lookup was made before the run (a multi-device worker's ranks run rank 0's), so the engine makes none."""

    resolved: ResolvedRequest
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str = DEFAULT_TENANT
    on_step: StepCallback | None = None
    cancel: CancelFlag | None = None
    embedded: PromptEmbedding | None = None
    started: float = field(default_factory=time.perf_counter)
    on_cancelled: Callable[[Cancelled], None] | None = None
    cached: CacheRun | None = None
    looked_up: bool = False
    cancelled: Cancelled | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.resolved.request

    @property
    def seeds(self) -> list[int]:
        return self.resolved.seeds

    @property
    def start_step(self) -> int:
        return self.cached.skipped if self.cached else 0

    def cancel_requested(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class MemberFlags:
    """The step monitor's ``on_step`` and cancel flag for several members: progress goes to each member still in the
    run; a member whose own flag is set leaves it at once (``on_cancelled``); the run stops when none is left."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.last = Progress(0, members[0].request.steps, 0.0, 0.0)

    def on_step(self, progress: Progress) -> None:
        self.last = progress
        for member in self.live():
            if member.on_step is not None:
                member.on_step(progress)

    def is_set(self) -> bool:
        for member in self.live():
            if member.cancel_requested():
                member.cancelled = Cancelled(self.last.step, self.last.total)
                if member.on_cancelled is not None:
                    member.on_cancelled(member.cancelled)
        return not self.live()

    def live(self) -> list[Member]:
        return [member for member in self.members if member.cancelled is None]


def batch_report(member: Member, members: list[Member]) -> BatchReport | None:
    """What ``member``'s result says of the others it ran with (None when it ran alone)."""
    if len(members) == 1:
        return None
    return BatchReport(
        jobs=len(members),
        images=sum(len(m.seeds) for m in members),
        others=[m.result_id for m in members if m is not member],
        shared={**batch_key(member.request), "cache_start_step": member.start_step},
    )
