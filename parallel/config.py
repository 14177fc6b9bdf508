"""One composed configuration for every parallel axis, checked once against the world size.

The degrees multiply: ``cfg x patch`` ranks serve one request. Ranks are laid out CFG-major, so the
``patch`` ranks that split one image share a CFG branch and sit next to each other (rank = cfg_index *
patch + patch_index); on GPUs that keeps the chatty patch exchange inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PatchMode = Literal["sync", "displaced", "pcpp", "naive"]
PATCH_MODES: tuple[str, ...] = ("sync", "displaced", "pcpp", "naive")


@dataclass(frozen=True)
class ParallelConfig:
    """How one request is spread over ranks.

    patch: ranks that each compute one row strip of the latent (1: no patch parallelism).
    cfg: 2 puts the unconditional and conditional branches of classifier-free guidance on different ranks.
    mode: ``sync`` exchanges fresh activations every step (exact); ``displaced`` (DistriFusion) uses the other
        strips' activations from the previous step, exchanged asynchronously; ``pcpp`` also attends to only the
        nearest ``pcpp_fraction`` of each neighbouring strip, swapped with neighbours only; ``naive`` exchanges
        nothing (the quality baseline).
    warmup_steps: synchronous steps after the first before ``displaced``/``pcpp`` go stale (the first is always
        synchronous: there is nothing stale yet).
    batch_bytes: consecutive layers' exchanges travel together in collectives of about this size.
    """

    patch: int = 1
    cfg: int = 1
    mode: PatchMode = "sync"
    warmup_steps: int = 4
    pcpp_fraction: float = 0.3
    batch_bytes: int = 4 << 20

    def __post_init__(self):
        if self.patch < 1:
            raise ValueError(f"patch: must be at least 1, got {self.patch}")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg: must be 1 or 2 (two guidance branches at most), got {self.cfg}")
        if self.mode not in PATCH_MODES:
            raise ValueError(f"mode: must be one of {', '.join(PATCH_MODES)}, got {self.mode!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be 0 or more, got {self.warmup_steps}")
        if not 0.0 < self.pcpp_fraction <= 1.0:
            raise ValueError(f"pcpp_fraction: must be in (0, 1], got {self.pcpp_fraction}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes: must be positive, got {self.batch_bytes}")

    @property
    def world_size(self) -> int:
        return self.patch * self.cfg

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"parallel: cfg ({self.cfg}) x patch ({self.patch}) = {self.world_size} ranks, "
                f"but the group has {world_size}"
            )

    def cfg_index(self, rank: int) -> int:
        return rank // self.patch

    def patch_index(self, rank: int) -> int:
        return rank % self.patch
