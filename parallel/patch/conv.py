"""Convolutions over a row strip: the rows a kernel reaches across the strip's edge come from the neighbours.

A k x k convolution with padding p needs p rows above and below the strip. Synchronous steps fetch the
neighbours' current boundary rows; displaced steps (DistriFusion, arXiv:2402.19481) use the ones sent during the
previous step, so the exchange overlaps with computation. At the image's top and bottom the received rows are
zeros: exactly the zero padding of the unsplit convolution.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from fastgen.parallel.patch.context import PatchContext, Wrapped


def needs_halo(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and isinstance(module.padding, tuple) and module.padding[0] > 0


def check_supported(name: str, conv: torch.nn.Conv2d) -> None:
    if conv.padding_mode != "zeros":
        raise ValueError(f"patch parallelism: {name} pads with {conv.padding_mode!r}; only zero padding splits")


def halo_forward(ctx: PatchContext, key: str, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    pad = conv.padding[0]
    edges = torch.stack([x[:, :, :pad], x[:, :, -pad:]])  # [head, tail] of this strip
    if ctx.synchronous:
        received = ctx.edges.exchange_now(key, edges)
    else:
        received = ctx.edges.get(key)
    padded = torch.cat([received[0], x, received[1]], dim=2)  # copies: the buffer may be refilled below
    if not ctx.synchronous:
        ctx.edges.put(key, edges)
    return F.conv2d(padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


def wrap(ctx: PatchContext, model: torch.nn.Module, wrapped: Wrapped) -> int:
    """Override every padded Conv2d's forward; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if needs_halo(module):
            check_supported(name, module)
            wrapped.override(module, partial(halo_forward, ctx, f"conv:{name}", module))
            count += 1
    return count
