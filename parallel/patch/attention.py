"""Self-attention over a row strip: local queries against keys and values from the whole image.

- synchronous steps: every strip's fresh K/V (an all-gather), so attention is exact;
- ``displaced`` (DistriFusion, arXiv:2402.19481): this strip's fresh K/V with the other strips' from the previous
  step, all-gathered asynchronously;
- ``pcpp`` (Zhang et al., "Partially Conditioned Patch Parallelism for Accelerated Diffusion Model Inference",
  arXiv:2412.02962): this strip's fresh K/V plus only the nearest ``fraction`` of each neighbouring strip's tokens,
  from the previous step, swapped with the two neighbours instead of gathered from everyone.

Cross-attention (keys from the text) is left to the original processor: it needs nothing from other strips.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastgen.attention.projections import UNFUSED_STANDARD
from fastgen.parallel.patch.context import PatchContext


class PatchSelfAttention:
    """Attention processor for one self-attention layer; delegates cross-attention to the original."""

    def __init__(self, ctx: PatchContext, key: str, original):
        self.ctx, self.key, self.original = ctx, key, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"patch parallelism: {self.key} uses a mask or an attention norm it cannot split")
        query, key, value = UNFUSED_STANDARD.project(attn, hidden_states)
        # K/V are exchanged before the head split: one (2, B, tokens, inner) tensor per layer.
        key, value = context_kv(self.ctx, self.key, torch.stack([key, value]))
        query, key, value = UNFUSED_STANDARD.heads(attn, query, key, value)
        out = F.scaled_dot_product_attention(query, key, value)
        return UNFUSED_STANDARD.output(attn, out, hidden_states, None)


def context_kv(ctx: PatchContext, key: str, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values over every strip for this strip's queries, from this strip's fresh ``kv`` (2, B, tokens, inner).

    Synchronous steps gather every strip's fresh K/V (exact); stale ones use the other strips' from the previous
    step (all of them, or for ``pcpp`` the neighbours' nearest edges) and send this strip's for the next step.
    """
    if ctx.synchronous:
        return _synchronous_kv(ctx, key, kv)
    if ctx.mode == "pcpp":
        above, below = ctx.edges.get(key)
        first, last = ctx.index == 0, ctx.index == ctx.size - 1
        full = torch.cat(([] if first else [above]) + [kv] + ([] if last else [below]), dim=2)
        ctx.edges.put(key, _edges(ctx, kv))
    else:
        stale = ctx.gather.get(key)
        full = torch.cat([kv if r == ctx.index else stale[r] for r in range(ctx.size)], dim=2)
        ctx.gather.put(key, kv[None])
    return full[0], full[1]


def _synchronous_kv(ctx: PatchContext, key: str, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.mode == "pcpp":
        # Exact warm-up from a plain gather; the neighbour swap only primes the stale edges for later steps.
        parts = ctx.all_gather_now(kv)
        ctx.edges.exchange_now(key, _edges(ctx, kv))
    else:
        parts = list(ctx.gather.exchange_now(key, kv[None]).unbind(0))
    full = torch.cat(parts, dim=2)
    return full[0], full[1]


def _edges(ctx: PatchContext, kv: torch.Tensor) -> torch.Tensor:
    """[head, tail]: the tokens nearest the strip above and the strip below."""
    count = max(1, math.ceil(ctx.fraction * kv.shape[2]))
    return torch.stack([kv[:, :, :count], kv[:, :, -count:]])


def self_attention_processors(model: torch.nn.Module, wrap) -> dict:
    """The model's processors with every self-attention one replaced by ``wrap(name, original)``; cross-attention
    ones kept as they are."""
    processors = {}
    for name, processor in model.attn_processors.items():
        module = model.get_submodule(name.removesuffix(".processor"))
        processors[name] = processor if module.is_cross_attention else wrap(name, processor)
    return processors
