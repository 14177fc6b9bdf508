"""How a multi-device worker spreads each request over its ranks: the layout (cfg x patch) and the patch mode.

A worker of N ranks builds, once at start, the process groups of every layout N allows (building groups is
collective: every rank must do it in the same order, so it is not done per request). Per request it picks:

- CFG parallelism (``cfg`` = 2) when guidance is on, N is even and the request does not say no: exact, and the
  cheapest exchange (one gather of the prediction per step);
- patch parallelism over the remaining ``N / cfg`` ranks, in the request's mode or the worker's default.

A request whose height does not split into the strips it would need is refused with a message naming the height
and the multiple that works when it asked for parallelism explicitly; otherwise every rank computes the whole
image (``replicated``, reported with the reason), so a request that did not ask is never failed for it. The same
holds for a DiT request with sparse attention that would be split by tokens: the sparse processors need the whole
sequence, and the token split's processors would replace them (a CFG split keeps it whole and is fine).

The worker adds :func:`accelerator` to its engine's accelerator table; the engine attaches and removes it like any
other technique. The patch methods are in :mod:`fastgen.parallel.unet` (DistriFusion, Li et al., CVPR 2024,
arXiv:2402.19481; PCPP, Zhang et al., arXiv:2412.02962).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastgen.accelerators import Accelerator
from fastgen.errors import InvalidRequest
from fastgen.parallel import sequence, unet
from fastgen.parallel.config import ParallelConfig, PatchMode
from fastgen.parallel.groups import ParallelGroups
from fastgen.schema import GenerationRequest


@dataclass(frozen=True)
class ParallelRequest:
    """What one request asks of the rank group: the accelerator's config."""

    mode: PatchMode
    cfg: bool | None  # None: the worker decides
    guidance_on: bool
    height: int
    width: int
    num_frames: int | None
    explicit: bool  # the request named a mode or cfg: refuse rather than fall back
    sparse_attention: bool = False  # the request's DiT attention is sparse: its tokens must not be split


def from_request(request: GenerationRequest, default_mode: PatchMode) -> ParallelRequest:
    options = request.accelerate.parallel
    return ParallelRequest(
        mode=options.mode or default_mode,
        cfg=options.cfg,
        guidance_on=(request.guidance or 0.0) > 1.0,
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        explicit=options.asked,
        sparse_attention=request.accelerate.sparse_attention.asked,
    )


@dataclass(frozen=True)
class RankLayouts:
    """This rank's groups for every layout of the world: (patch, cfg) -> ParallelGroups."""

    world_size: int
    groups: dict[tuple[int, int], ParallelGroups]

    @classmethod
    def build(cls, world_size: int, timeout: timedelta | None = None) -> RankLayouts:
        """Collective: every rank calls it once, at start. ``timeout`` bounds every collective of every layout."""
        layouts = {}
        for cfg in (1, 2):
            if world_size % cfg == 0:
                config = ParallelConfig(patch=world_size // cfg, cfg=cfg)
                layouts[(config.patch, cfg)] = ParallelGroups.build(config, timeout)
        return cls(world_size, layouts)

    def choose(self, want: ParallelRequest, pipe) -> tuple[ParallelGroups | None, str]:
        """The groups to run this request with, or None and the reason every rank computes it whole."""
        cfg = self._cfg(want, pipe)
        patch = self.world_size // cfg
        if patch > 1 and want.sparse_attention and not is_unet(pipe):
            reason = "sparse attention needs every token of the sequence on one rank; a token split would undo it"
            if want.explicit:
                raise InvalidRequest.one("accelerate.parallel", f"{reason} (ask for one of them, or for cfg alone)")
            return None, reason
        reason = _unsplittable(want, pipe, patch) if patch > 1 else ""
        if reason:
            if want.explicit:
                raise InvalidRequest.one("height", reason)
            return None, reason
        config = ParallelConfig(patch=patch, cfg=cfg, mode=want.mode)
        return dataclasses.replace(self.groups[(patch, cfg)], config=config), ""

    def _cfg(self, want: ParallelRequest, pipe) -> int:
        batched = sequence.batches_guidance(pipe)
        possible = want.guidance_on and self.world_size % 2 == 0 and batched
        if want.cfg and not possible:
            why = f"needs guidance above 1 and an even number of devices (this worker has {self.world_size})"
            if not batched:
                why = f"{type(pipe).__name__} runs its guidance branches as separate model calls, which cannot split"
            raise InvalidRequest.one("accelerate.parallel.cfg", why)
        return 2 if possible and want.cfg is not False else 1

    def apply(self, pipe, want: ParallelRequest, run=None):
        groups, reason = self.choose(want, pipe)
        if groups is None:
            return Replicated(self.world_size, reason)
        return split(pipe, groups, want.guidance_on)


def split(pipe, groups: ParallelGroups, guidance_on: bool):
    """Attach the split the groups describe: UNets by row strips, DiTs by token chunks; a removable handle."""
    if is_unet(pipe):
        return unet.apply(pipe, groups)
    # A pipeline that calls the model once per guidance branch keeps stale state per branch.
    branches = 2 if guidance_on and not sequence.batches_guidance(pipe) else 1
    return sequence.apply(pipe, groups, branches)


def is_unet(pipe) -> bool:
    return getattr(pipe, "unet", None) is not None


def _unsplittable(want: ParallelRequest, pipe, patch: int) -> str:
    """Why this size cannot be split ``patch`` ways ("" when it can)."""
    if is_unet(pipe):
        rows, multiple = want.height // pipe.vae_scale_factor, 2 ** unet.denoiser_of(pipe).num_upsamplers
        if rows % (patch * multiple) == 0:
            return ""
        return (
            f"the height's {rows} latent rows do not split into {patch} strips of a multiple of {multiple}"
            f" rows; use a height that is a multiple of {patch * multiple * pipe.vae_scale_factor} pixels"
        )
    tokens = sequence.token_count(pipe, want.height, want.width, want.num_frames)
    if tokens % patch == 0:
        return ""
    return f"the request's {tokens} tokens do not split into {patch} equal chunks; use a size whose token count does"


@dataclass(frozen=True)
class Replicated:
    """Every rank computes the whole request (nothing attached); the report says why."""

    world_size: int
    reason: str

    def remove(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "patch": 1, "cfg": 1, "replicated": True, "reason": self.reason}


def accelerator(layouts: RankLayouts, default_mode: PatchMode) -> Accelerator:
    """The ``parallel`` row of a multi-device worker's accelerator table, bound to its groups."""
    return Accelerator("parallel", lambda run: from_request(run.request, default_mode), layouts.apply)
