"""GroupNorm over a row strip with the whole image's statistics.

Each rank computes its strip's per-group mean and variance and exchanges them (a few numbers per group).
Synchronous steps pool the fresh statistics exactly. Displaced steps follow DistriFusion's corrected
asynchronous GroupNorm (arXiv:2402.19481, section 4.2): the stale global moments from the previous step,
corrected by this strip's fresh-minus-stale difference, E[x] ~ stale E[x] + (fresh local - stale local) / n and
likewise E[x^2]; where that estimate of the variance comes out negative, the strip's own variance is used.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from fastgen.parallel.patch.context import PatchContext, Wrapped


def pooled(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance of equal-sized strips from each strip's (mean, variance): (ranks, 2, B, G)."""
    means, variances = moments[:, 0], moments[:, 1]
    mean = means.mean(0)
    return mean, (variances + (means - mean).square()).mean(0)


def corrected(stale: torch.Tensor, fresh: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's estimate from last step's moments of every strip and this step's of our own."""
    size = stale.shape[0]
    stale_ex, stale_ex2 = stale[:, 0], stale[:, 1] + stale[:, 0].square()
    fresh_ex, fresh_ex2 = fresh[0], fresh[1] + fresh[0].square()
    mean = stale_ex.mean(0) + (fresh_ex - stale_ex[index]) / size
    second = stale_ex2.mean(0) + (fresh_ex2 - stale_ex2[index]) / size
    variance = second - mean.square()
    return mean, torch.where(variance < 0, fresh[1], variance)


def moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(2, B, G): each group's mean and variance, from two read-only reductions accumulated in float32."""
    grouped = x.reshape(x.shape[0], groups, -1)
    count = grouped.shape[-1]
    mean = grouped.sum(-1, dtype=torch.float32) / count
    mean_square = torch.linalg.vector_norm(grouped, dim=-1, dtype=torch.float32).square() / count
    return torch.stack([mean, (mean_square - mean.square()).clamp_min(0)])


def group_norm_forward(ctx: PatchContext, key: str, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    fresh = moments(x, norm.num_groups)
    if ctx.synchronous:
        mean, variance = pooled(ctx.gather.exchange_now(key, fresh[None].to(x.dtype)).float())
    else:
        mean, variance = corrected(ctx.gather.get(key).float(), fresh, ctx.index)
        ctx.gather.put(key, fresh[None].to(x.dtype))
    return normalise(x, norm, mean, variance)


def normalise(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """GroupNorm with given (B, G) statistics, in one fused pass: an inference-mode batch norm over (1, B x C)."""
    batch, channels = x.shape[:2]
    per_channel = channels // norm.num_groups
    mean, variance = (t.repeat_interleave(per_channel, dim=1).reshape(-1) for t in (mean, variance))
    weight = norm.weight.float().repeat(batch) if norm.affine else None
    bias = norm.bias.float().repeat(batch) if norm.affine else None
    flat = x.reshape(1, batch * channels, *x.shape[2:])
    return F.batch_norm(flat, mean, variance, weight, bias, False, 0.0, norm.eps).view(x.shape)


def wrap(ctx: PatchContext, model: torch.nn.Module, wrapped: Wrapped) -> int:
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            wrapped.override(module, partial(group_norm_forward, ctx, f"norm:{name}", module))
            count += 1
    return count
