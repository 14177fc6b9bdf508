"""One request's patch-parallel state on this rank: its strip, the step, and the exchange buffers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastgen.parallel.comm import AllGather, CommBuffer, NeighbourSwap, all_gather_now
from fastgen.parallel.config import ParallelConfig


@dataclass
class PatchContext:
    """Shared by every wrapped layer of one model; ``begin_step``/``end_step`` bracket each model call."""

    mode: str
    warmup_steps: int
    fraction: float
    group: object
    index: int  # this rank's strip, top to bottom
    size: int  # strips
    gather: CommBuffer  # every rank's slot: GroupNorm statistics, full K/V
    edges: CommBuffer  # neighbours only: conv halos, PCPP's partial K/V
    step: int = -1
    direct_bytes: int = 0  # blocking exchanges outside the buffers (PCPP's warm-up K/V)

    @classmethod
    def create(cls, config: ParallelConfig, group, index: int) -> PatchContext:
        size = config.patch
        return cls(
            mode=config.mode,
            warmup_steps=config.warmup_steps,
            fraction=config.pcpp_fraction,
            group=group,
            index=index,
            size=size,
            gather=CommBuffer(AllGather(group, index, size), config.batch_bytes),
            edges=CommBuffer(NeighbourSwap(group, index, size), config.batch_bytes),
        )

    @property
    def exchanging(self) -> bool:
        return self.mode != "naive"

    @property
    def synchronous(self) -> bool:
        """Fresh exchange this step: always in ``sync``, and for everyone during the first step and warm-up."""
        return self.mode == "sync" or self.step <= self.warmup_steps

    def begin_step(self) -> None:
        self.step += 1

    def end_step(self) -> None:
        if self.step == 0:
            self.gather.finalise()
            self.edges.finalise()
        elif not self.synchronous:
            self.gather.flush()
            self.edges.flush()

    def close(self) -> None:
        self.gather.wait_all()
        self.edges.wait_all()

    def all_gather_now(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A blocking all-gather outside the buffers; every strip's tensor in strip order."""
        self.direct_bytes += (self.size - 1) * tensor.nbytes
        return all_gather_now(tensor, self.group, self.size)

    @property
    def bytes_received(self) -> int:
        return self.gather.bytes_received + self.edges.bytes_received + self.direct_bytes


@dataclass
class Wrapped:
    """Instance-level ``forward`` overrides, undone exactly (a module that had its own keeps it)."""

    saved: list[tuple[torch.nn.Module, object]] = field(default_factory=list)
    _missing = object()

    def override(self, module: torch.nn.Module, forward) -> None:
        self.saved.append((module, vars(module).get("forward", self._missing)))
        module.forward = forward

    def restore(self) -> None:
        while self.saved:
            module, previous = self.saved.pop()
            if previous is self._missing:
                del module.forward
            else:
                module.forward = previous
