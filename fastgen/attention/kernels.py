"""Block-sparse attention kernels: FlexAttention with block masks, and an SDPA-with-mask reference.

FlexAttention (Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024,
arXiv:2412.05496) takes a ``BlockMask``: for each block of queries, the key blocks that are fully allowed (no mask
evaluated) and the ones partly allowed (``mask_mod`` evaluated per element). Blocks in neither list are skipped, so
they cost nothing. Compiled, it is a fused kernel on CPU and GPU.

A :class:`HeadPlan` says which pattern each head of one attention call uses; its block mask and its dense reference
mask are built once and kept for as long as the plan lives (one request).

Every kernel works on (batch, heads, tokens, head_dim) tensors in the original token order; patterns computed in
another order (temporal heads) are permuted in and out here. Log-sum-exps are natural logarithms per query row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from fastgen.attention.patterns import Pattern

# Scores materialised at a time by the reference and gathered paths (elements), to bound their memory.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BlockStructure:
    """A pattern at block granularity, in its own token order: blocks with some allowed pairs, and the fully
    allowed ones among them."""

    any_allowed: torch.Tensor  # (query blocks, key blocks) bool
    all_allowed: torch.Tensor

    @classmethod
    def of(cls, pattern: Pattern, block: int) -> BlockStructure:
        """Count the allowed pairs in every block from each query's key span (its text keys plus one contiguous
        span of image keys): tokens x blocks work instead of tokens x tokens."""
        layout, device = pattern.layout, pattern.device
        total, text = layout.total, layout.text
        blocks = math.ceil(total / block)
        query = torch.arange(total, device=device)
        first, end = pattern.key_span(query)
        first = torch.where(query < text, 0, first)  # text queries attend to every key
        end = torch.where(query < text, total, end)
        starts = torch.arange(blocks, device=device) * block
        ends = (starts + block).clamp(max=total)
        per_row = _overlap(first[:, None], end[:, None], starts, ends)
        per_row += torch.where(query[:, None] < text, 0, _overlap(0, text, starts, ends))  # image queries' text keys
        rows = F.pad(per_row, (0, 0, 0, blocks * block - total)).view(blocks, block, blocks)
        counts = rows.sum(1)
        return cls(counts > 0, counts == block * block)

    @classmethod
    def evaluated(cls, pattern: Pattern, block: int) -> BlockStructure:
        """The same by evaluating ``mask_mod`` on every pair (a few query blocks at a time): the cross-check."""
        total = pattern.layout.total
        blocks = math.ceil(total / block)
        index = torch.arange(blocks * block, device=pattern.device)
        counts = torch.empty(blocks, blocks, dtype=torch.int64, device=pattern.device)
        rows = max(1, CHUNK_ELEMENTS // (block * block * blocks))
        for first in range(0, blocks, rows):
            query = index[first * block : (first + rows) * block, None]
            allowed = pattern.mask_mod(0, 0, query, index[None, :]) & (query < total) & (index[None, :] < total)
            counts[first : first + rows] = allowed.view(-1, block, blocks, block).sum((1, 3))
        return cls(counts > 0, counts == block * block)


def _overlap(first, end, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Length of [first, end) inside each block [starts, ends)."""
    return (torch.minimum(torch.as_tensor(end), ends) - torch.maximum(torch.as_tensor(first), starts)).clamp(min=0)


def block_structure(pattern: Pattern, block: int) -> BlockStructure:
    """The pattern's block structure, computed once per pattern and block size (plans share their patterns)."""
    key = ("blocks", block)
    if key not in pattern.derived:
        pattern.derived[key] = BlockStructure.of(pattern, block)
    return pattern.derived[key]


class HeadPlan:
    """The pattern of every head in one attention call: ``patterns[head_pattern[h]]`` for head h (one pattern for
    all heads when ``head_pattern`` is None). Masks are built on first use and kept."""

    def __init__(self, patterns: tuple[Pattern, ...], block: int, head_pattern: torch.Tensor | None = None):
        self.patterns, self.block, self.head_pattern = patterns, block, head_pattern

    @property
    def covers_all(self) -> bool:
        return all(p.covers_all for p in self.used_patterns)

    @property
    def used_patterns(self) -> tuple[Pattern, ...]:
        if self.head_pattern is None:
            return self.patterns[:1]
        return tuple(p for i, p in enumerate(self.patterns) if bool((self.head_pattern == i).any()))

    def density(self, heads: int) -> float:
        """Mean share of image keys per image query over the heads."""
        if self.head_pattern is None:
            return self.patterns[0].density
        return sum(self.patterns[int(i)].density for i in self.head_pattern) / heads

    def pattern_of(self, head: int) -> Pattern:
        return self.patterns[0] if self.head_pattern is None else self.patterns[int(self.head_pattern[head])]

    @functools.cached_property
    def structures(self) -> tuple[BlockStructure, ...]:
        return tuple(block_structure(p, self.block) for p in self.patterns)

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """FlexAttention's block mask: (1, 1 or heads, query blocks, key blocks), in each head's token order."""
        partial = torch.stack([s.any_allowed & ~s.all_allowed for s in self.structures])
        full = torch.stack([s.all_allowed for s in self.structures])
        if self.head_pattern is None:
            partial, full, mask_mod = partial[:1], full[:1], self.patterns[0].mask_mod
        else:
            partial, full = partial[self.head_pattern][None], full[self.head_pattern][None]
            mask_mod = _per_head(tuple(p.mask_mod for p in self.patterns), self.head_pattern)
        total = self.patterns[0].layout.total
        return BlockMask.from_kv_blocks(
            *_ordered(partial),
            *_ordered(full),
            BLOCK_SIZE=self.block,
            mask_mod=mask_mod,
            seq_lengths=(total, total),
            compute_q_blocks=False,  # only the backward pass needs them
        )

    @functools.cached_property
    def dense_mask(self) -> torch.Tensor:
        """(1 or heads, tokens, tokens) boolean mask in the original token order."""
        masks = torch.stack([p.dense_mask() for p in self.patterns])
        return masks[:1] if self.head_pattern is None else masks[self.head_pattern]

    @functools.cached_property
    def orders(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(heads or 1, tokens) gather indices into and out of each head's computing order; None: original order."""
        if all(p.order is None for p in self.patterns):
            return None
        identity = torch.arange(self.patterns[0].layout.total, device=self.patterns[0].device)
        into = torch.stack([identity if p.order is None else p.order for p in self.patterns])
        back = torch.stack([identity if p.inverse is None else p.inverse for p in self.patterns])
        if self.head_pattern is None:
            return into[:1], back[:1]
        return into[self.head_pattern], back[self.head_pattern]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block counts and indices (allowed blocks first) per query block row, as BlockMask wants them."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    if blocks.dim() == 3:  # (patterns=1, q, kv) -> (batch=1, heads=1, q, kv)
        return counts[None], indices[None]
    return counts, indices


def _per_head(mask_mods: tuple, head_pattern: torch.Tensor):
    """One mask_mod that dispatches on the head: head h uses ``mask_mods[head_pattern[h]]``."""

    def per_head_mask(b, h, q, kv):
        kind = head_pattern[h]
        allowed = mask_mods[0](b, h, q, kv)
        for index, mask_mod in enumerate(mask_mods[1:], start=1):
            allowed = torch.where(kind == index, mask_mod(b, h, q, kv), allowed)
        return allowed

    return per_head_mask


class Kernel(Protocol):
    """Attention over (batch, heads, tokens, head_dim) tensors."""

    name: str

    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan) -> torch.Tensor: ...

    def sparse_with_lse(self, q, k, v, plan: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]: ...

    def dense_with_lse(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]: ...


@functools.cache
def compiled_flex_attention():
    """One compiled FlexAttention per process, so every request reuses the kernels compiled for its shapes.

    Shapes are static on CPU: inductor's CPU code generation for dynamic-shape FlexAttention fails in torch 2.13 (a
    C++ compile error), so each new token count compiles once (about 5-20 s on a CPU).
    """
    return torch.compile(flex_attention, dynamic=None if torch.cuda.is_available() else False)


class FlexKernel:
    """Block-sparse FlexAttention; skipped blocks cost nothing. ``compiled=False`` runs FlexAttention's eager
    reference (it materialises every score: tests and tiny models only)."""

    def __init__(self, compiled: bool = True):
        self.compiled = compiled
        self.name = "flex" if compiled else "flex-eager"

    def _attend(self):
        return compiled_flex_attention() if self.compiled else flex_attention

    def sparse(self, q, k, v, plan: HeadPlan) -> torch.Tensor:
        q, k, v = _into(plan, q, k, v)
        return _back(plan, self._attend()(q, k, v, block_mask=plan.block_mask))

    def sparse_with_lse(self, q, k, v, plan: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled and q.device.type == "cpu":
            # Compiled FlexAttention on CPU cannot return the log-sum-exp yet (torch 2.13).
            return gathered_attention(q, k, v, plan)
        q, k, v = _into(plan, q, k, v)
        out, aux = self._attend()(q, k, v, block_mask=plan.block_mask, return_aux=AuxRequest(lse=True))
        return _back(plan, out), _back(plan, aux.lse)

    def dense_with_lse(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        if q.device.type == "cpu":
            # The kernel F.scaled_dot_product_attention runs on CPU, with its log-sum-exp: the output is identical.
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
            return out, lse
        if self.compiled and q.device.type == "cuda":
            out, aux = compiled_flex_attention()(q, k, v, return_aux=AuxRequest(lse=True))
            return out, aux.lse
        return masked_attention(q, k, v, None)


class ReferenceKernel:
    """Dense attention with a boolean mask (F.scaled_dot_product_attention) and explicit log-sum-exps: every score
    is computed, so nothing is saved; it is the correctness reference."""

    name = "reference"

    def sparse(self, q, k, v, plan: HeadPlan) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.dense_mask)

    def sparse_with_lse(self, q, k, v, plan: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_attention(q, k, v, plan.dense_mask)

    def dense_with_lse(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_attention(q, k, v, None)


def masked_attention(q, k, v, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp with every score materialised (a few query rows at a time)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    outs, lses = [], []
    for first in range(0, q.shape[2], rows):
        scores = q[:, :, first : first + rows] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed[..., first : first + rows, :], -math.inf)
        lse = scores.logsumexp(-1, keepdim=True)
        outs.append(torch.exp(scores - lse) @ v)
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def gathered_attention(q, k, v, plan: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with its log-sum-exp in plain PyTorch: each query block's allowed key blocks are
    gathered and attended densely. Costs about what the sparse attention costs (unfused), not what dense does."""
    outs, lses = zip(*(_gathered_head(q[:, h], k[:, h], v[:, h], plan, h) for h in range(q.shape[1])), strict=True)
    return torch.stack(outs, 1), torch.stack(lses, 1)


def _gathered_head(q, k, v, plan: HeadPlan, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head, (batch, tokens, head_dim) in and out, in the original token order."""
    pattern, block = plan.pattern_of(head), plan.block
    structure = plan.structures[plan.patterns.index(pattern)]
    if pattern.order is not None:
        q, k, v = q[:, pattern.order], k[:, pattern.order], v[:, pattern.order]
    tokens = q.shape[1]
    blocks = structure.any_allowed.shape[0]
    counts = structure.any_allowed.sum(-1)
    partial = (structure.any_allowed & ~structure.all_allowed).any(-1)  # query blocks with a partly allowed block
    key_blocks = torch.argsort(structure.any_allowed.to(torch.int8), dim=-1, descending=True, stable=True)
    widest = int(counts.max())
    padded = blocks * block - tokens
    q = F.pad(q, (0, 0, 0, padded)).view(q.shape[0], blocks, block, -1)
    rows = max(1, CHUNK_ELEMENTS // (q.shape[0] * block * widest * block))
    outs, lses = [], []
    for first in range(0, blocks, rows):
        last = min(blocks, first + rows)
        keys = key_blocks[first:last, :widest]
        out, lse = _gathered_rows(q[:, first:last], k, v, pattern, keys, counts, partial, first, block)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 1).flatten(1, 2)[:, :tokens]
    lse = torch.cat(lses, 1).flatten(1, 2)[:, :tokens]
    if pattern.inverse is not None:
        out, lse = out[:, pattern.inverse], lse[:, pattern.inverse]
    return out, lse


def _gathered_rows(q, k, v, pattern: Pattern, key_blocks, counts, partial, first: int, block: int):
    """Query blocks ``first``.. (q: batch, blocks, block, head_dim) against their gathered key blocks."""
    tokens, device = k.shape[1], k.device
    row_blocks = torch.arange(first, first + q.shape[1], device=device)
    keys = (key_blocks[..., None] * block + torch.arange(block, device=device)).flatten(1)  # (blocks, widest*block)
    used = torch.arange(key_blocks.shape[1], device=device)[None, :] < counts[row_blocks][:, None]
    allowed = (used.repeat_interleave(block, dim=1) & (keys < tokens))[:, None, :]
    if bool(partial[row_blocks].any()):  # whole blocks need no per-element mask
        queries = (row_blocks[:, None] * block + torch.arange(block, device=device)).clamp(max=tokens - 1)
        allowed = allowed & _in_span(pattern, queries[:, :, None], keys[:, None, :])
    keys = keys.clamp(max=tokens - 1)
    scores = q @ k[:, keys].transpose(-1, -2) * q.shape[-1] ** -0.5  # (batch, blocks, block, widest*block)
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = scores.logsumexp(-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # padded query rows have no keys
    return torch.exp(scores - lse) @ v[:, keys], lse.squeeze(-1)


def _in_span(pattern: Pattern, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``pattern.mask_mod`` by the query's key span: two comparisons per pair instead of its integer divisions."""
    text = pattern.layout.text
    first, end = pattern.key_span(query)
    return (query < text) | (key < text) | ((key >= first) & (key < end))


def _into(plan: HeadPlan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in each head's computing order, contiguous: the compiled kernel is specialised to its inputs'
    strides, so a caller's transposed view would otherwise compile it again."""
    orders = plan.orders
    if orders is None:
        return tuple(t.contiguous() for t in tensors)
    index = orders[0][None, :, :, None]
    return tuple(t.gather(2, index.expand(t.shape[0], t.shape[1], -1, t.shape[-1])) for t in tensors)


def _back(plan: HeadPlan, tensor: torch.Tensor) -> torch.Tensor:
    orders = plan.orders
    if orders is None:
        return tensor
    if tensor.dim() == 3:  # log-sum-exp: (batch, heads, tokens)
        return tensor.gather(2, orders[1][None].expand(tensor.shape[0], tensor.shape[1], -1))
    index = orders[1][None, :, :, None]
    return tensor.gather(2, index.expand(tensor.shape[0], tensor.shape[1], -1, tensor.shape[-1]))
