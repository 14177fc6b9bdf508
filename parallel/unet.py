"""A UNet's call spread over a rank group: CFG branches across ranks, row strips across ranks (DiTs: ``sequence``).

Every rank runs the same pipeline call with the same seed, so latents, schedulers and text embeddings are
replicated; only the denoiser's forward is split. Its wrapper takes this rank's half of the batch (CFG
parallelism: the unconditional and conditional branches are the batch's two halves) and this rank's strip of
latent rows (patch parallelism: DistriFusion, Li et al., CVPR 2024, arXiv:2402.19481, and PCPP, Zhang et al.,
arXiv:2412.02962), runs the model with its layers wrapped (``fastgen.parallel.patch``), then gathers the strips
and the batch halves back, so every rank holds the full prediction for the scheduler step.

``apply`` returns a handle whose ``remove()`` restores every forward and attention processor it replaced: the
pipeline is then exactly the single-device one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from fastgen.parallel.comm import all_gather_now
from fastgen.parallel.groups import ParallelGroups
from fastgen.parallel.patch import attention, conv, norm
from fastgen.parallel.patch.context import PatchContext, Wrapped


@dataclass
class _Split:
    """The call's shape on this rank: which batch rows and latent rows it computes."""

    groups: ParallelGroups
    ctx: PatchContext | None
    multiple: int  # latent rows per strip must be a multiple of this (the model's downsampling)
    calls: int = 0
    output_bytes: int = 0
    bytes_by_phase: dict[str, list[int]] = field(default_factory=lambda: {"synchronous": [], "stale": []})

    @property
    def bytes_received(self) -> int:
        return (self.ctx.bytes_received if self.ctx else 0) + self.output_bytes

    @property
    def synchronous(self) -> bool:
        return self.ctx is None or self.ctx.synchronous


@dataclass
class ParallelHandle:
    model: torch.nn.Module
    split: _Split
    wrapped: Wrapped = field(default_factory=Wrapped)
    processors: dict | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def remove(self) -> None:
        if self.split.ctx is not None:
            self.split.ctx.close()
        self.wrapped.restore()
        if self.processors is not None:
            self.model.set_attn_processor(self.processors)

    def report(self) -> dict[str, Any]:
        config, phases = self.split.groups.config, self.split.bytes_by_phase
        return {
            "world_size": config.world_size,
            "patch": config.patch,
            "cfg": config.cfg,
            "mode": config.mode if config.patch > 1 else None,
            "model_calls": self.split.calls,
            "bytes_received_per_call": self.split.bytes_received // max(self.split.calls, 1),
            # Per phase: warm-up calls exchange fresh data; later ones (displaced, pcpp) use last step's.
            "bytes_received_per_call_by_phase": {k: sum(v) // len(v) for k, v in phases.items() if v},
            "wrapped_layers": dict(self.counts),
        }


def denoiser_of(pipe) -> torch.nn.Module:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"parallel: {type(pipe).__name__} has no UNet; DiT models split by sequence instead")
    return unet


def apply(pipe, groups: ParallelGroups) -> ParallelHandle:
    """Split the pipeline's UNet calls over ``groups``; the handle's ``remove()`` undoes it exactly."""
    model, config = denoiser_of(pipe), groups.config
    ctx = PatchContext.create(config, groups.patch_group, groups.patch_index) if config.patch > 1 else None
    handle = ParallelHandle(model, _Split(groups, ctx, 2 ** getattr(model, "num_upsamplers", 0)))
    try:
        if ctx is not None and ctx.exchanging:
            handle.counts["conv"] = conv.wrap(ctx, model, handle.wrapped)
            handle.counts["group_norm"] = norm.wrap(ctx, model, handle.wrapped)
            handle.processors = dict(model.attn_processors)
            wrapped_processors = attention.self_attention_processors(model, partial(attention.PatchSelfAttention, ctx))
            handle.counts["self_attention"] = sum(
                isinstance(p, attention.PatchSelfAttention) for p in wrapped_processors.values()
            )
            model.set_attn_processor(wrapped_processors)
        handle.wrapped.override(model, partial(_split_forward, handle.split, model.forward))
    except BaseException:
        handle.remove()
        raise
    return handle


def _split_forward(split: _Split, forward, sample: torch.Tensor, *args, return_dict: bool = True, **kwargs):
    groups, ctx = split.groups, split.ctx
    split.calls += 1
    before = split.bytes_received
    halves = groups.cfg_group is not None and sample.shape[0] % 2 == 0
    if halves:
        sample, args, kwargs = batch_half(sample, args, kwargs, groups.cfg_index)
    if ctx is not None:
        sample = _strip(sample, ctx, split.multiple)
        ctx.begin_step()
    out = forward(sample, *args, return_dict=False, **kwargs)[0]
    if ctx is not None:
        ctx.end_step()
        out = torch.cat(_gather(out, groups.output_group or ctx.group, ctx.size, split), dim=2)
    if halves:
        out = torch.cat(_gather(out, groups.cfg_group, 2, split), dim=0)
    phase = "synchronous" if split.synchronous else "stale"
    split.bytes_by_phase[phase].append(split.bytes_received - before)
    if return_dict:
        return UNet2DConditionOutput(sample=out)
    return (out,)


def _strip(sample: torch.Tensor, ctx: PatchContext, multiple: int) -> torch.Tensor:
    rows = sample.shape[2]
    if rows % (ctx.size * multiple):
        raise ValueError(
            f"height: the latent's {rows} rows do not split into {ctx.size} strips of a multiple of {multiple} rows"
            f" (the model downsamples {multiple}x); use a height whose latent rows are a multiple of"
            f" {ctx.size * multiple}"
        )
    per = rows // ctx.size
    return sample[:, :, ctx.index * per : (ctx.index + 1) * per]


def batch_half(sample, args, kwargs, index: int):
    """This rank's half of every tensor that carries the batch (sample, text embeddings, timesteps, extras)."""
    batch = sample.shape[0]

    def half(value):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return value.chunk(2)[index]
        if isinstance(value, dict):
            return {k: half(v) for k, v in value.items()}
        return value

    return half(sample), tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}


def _gather(tensor: torch.Tensor, group, size: int, split: _Split) -> list[torch.Tensor]:
    split.output_bytes += (size - 1) * tensor.nbytes
    return all_gather_now(tensor, group, size)
