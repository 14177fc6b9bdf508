"""One diffusion-transformer call spread over a rank group: each rank holds a contiguous chunk of the tokens.

DiTs (PixArt, the Wan video DiT) turn the latent into one token sequence and run every block on it; everything
but self-attention works token by token, so a rank can run the blocks on its own chunk of the sequence. Only
self-attention needs the other chunks, and how it gets them is the mode:

- ``sync``: Ulysses (Jacobs et al., "DeepSpeed Ulysses", arXiv:2309.14509). An all-to-all turns the token split into
  a head split, each rank attends over every token for its share of the heads, and a second all-to-all turns it
  back. Exact. (When the heads do not divide among the ranks, the other chunks' fresh K/V are all-gathered
  instead: also exact.)
- ``displaced`` and ``pcpp``: DistriFusion's displaced patches (arXiv:2402.19481) and PCPP (arXiv:2412.02962) over
  token chunks instead of row strips: after the warm-up steps each chunk attends to its own fresh K/V and the
  others' (or only the neighbouring chunks' nearest fraction) from the previous step, exchanged asynchronously —
  the stale-K/V reuse PipeFusion (Wang et al., arXiv:2405.14430) also applies to DiTs.
- ``naive``: each chunk attends to itself only (the quality baseline).

The split is three removable hooks: the first block's input is cut to this rank's chunk, rotary position
frequencies (Wan) are cut alike, and the output projection's result is all-gathered back to the whole sequence
before the model un-patchifies it. CFG parallelism takes one half of the batch, as for UNets; Wan runs its two
guidance branches as separate calls, so each keeps its own stale state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from fastgen.attention.projections import rotary_argument, unfused_projections
from fastgen.parallel.comm import all_gather_now
from fastgen.parallel.groups import ParallelGroups
from fastgen.parallel.patch.attention import context_kv, self_attention_processors
from fastgen.parallel.patch.context import PatchContext, Wrapped
from fastgen.parallel.unet import batch_half

# Pipelines that run the guidance branches as two model calls instead of one batch of two.
SEPARATE_GUIDANCE_CALLS = ("WanPipeline",)


def batches_guidance(pipe) -> bool:
    return type(pipe).__name__ not in SEPARATE_GUIDANCE_CALLS


def token_count(pipe, height: int, width: int, num_frames: int | None) -> int:
    """The transformer's sequence length for a request of this size."""
    patch = pipe.transformer.config.patch_size
    p_t, p_h, p_w = patch if isinstance(patch, list | tuple) else (1, patch, patch)
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    frames = 1
    if num_frames is not None and hasattr(pipe, "vae_scale_factor_temporal"):
        frames = ((num_frames - 1) // pipe.vae_scale_factor_temporal + 1) // p_t
    return frames * (height // spatial // p_h) * (width // spatial // p_w)


@dataclass
class _Sequence:
    """One model's split: the groups, the stale state per guidance branch, and the traffic counted."""

    groups: ParallelGroups
    contexts: list[PatchContext]  # one per model call of a step (Wan: one per guidance branch); empty: no split
    ulysses: bool
    calls: int = 0
    active: PatchContext | None = None
    output_bytes: int = 0
    bytes_by_phase: dict[str, list[int]] = field(default_factory=lambda: {"synchronous": [], "stale": []})

    @property
    def bytes_received(self) -> int:
        return sum(ctx.bytes_received for ctx in self.contexts) + self.output_bytes


@dataclass
class SequenceHandle:
    model: torch.nn.Module
    state: _Sequence
    wrapped: Wrapped = field(default_factory=Wrapped)
    hooks: list = field(default_factory=list)
    processors: dict | None = None

    def remove(self) -> None:
        for ctx in self.state.contexts:
            ctx.close()
        while self.hooks:
            self.hooks.pop().remove()
        self.wrapped.restore()
        if self.processors is not None:
            self.model.set_attn_processor(self.processors)

    def report(self) -> dict[str, Any]:
        state, config = self.state, self.state.groups.config
        return {
            "world_size": config.world_size,
            "patch": config.patch,
            "cfg": config.cfg,
            "mode": config.mode if config.patch > 1 else None,
            "split": "tokens",
            "ulysses": state.ulysses if config.patch > 1 and config.mode == "sync" else None,
            "model_calls": state.calls,
            "bytes_received_per_call": state.bytes_received // max(state.calls, 1),
            "bytes_received_per_call_by_phase": {k: sum(v) // len(v) for k, v in state.bytes_by_phase.items() if v},
        }


def apply(pipe, groups: ParallelGroups, branches: int = 1) -> SequenceHandle:
    """Split the pipeline's transformer calls over ``groups``; ``branches``: model calls per step (Wan with CFG: 2)."""
    model, config = pipe.transformer, groups.config
    contexts = []
    if config.patch > 1:
        contexts = [PatchContext.create(config, groups.patch_group, groups.patch_index) for _ in range(branches)]
    heads = _self_attention_heads(model)
    state = _Sequence(groups, contexts, ulysses=bool(heads) and all(h % config.patch == 0 for h in heads))
    handle = SequenceHandle(model, state)
    try:
        if contexts:
            _split_tokens(handle, model)
            if config.mode != "naive":
                handle.processors = dict(model.attn_processors)
                model.set_attn_processor(self_attention_processors(model, partial(SequenceSelfAttention, state)))
        handle.wrapped.override(model, partial(_sequence_forward, state, model.forward))
    except BaseException:
        handle.remove()
        raise
    return handle


def _self_attention_heads(model: torch.nn.Module) -> list[int]:
    return [m.heads for m in model.modules() if hasattr(m, "set_processor") and not m.is_cross_attention]


def _split_tokens(handle: SequenceHandle, model: torch.nn.Module) -> None:
    blocks = getattr(model, "transformer_blocks", None) or model.blocks
    state = handle.state
    handle.hooks.append(blocks[0].register_forward_pre_hook(partial(_chunk_input, state), with_kwargs=True))
    if getattr(model, "rope", None) is not None:
        handle.hooks.append(model.rope.register_forward_hook(partial(_chunk_rope, state)))
    handle.hooks.append(model.proj_out.register_forward_hook(partial(_gather_tokens, state)))


def _chunk(state: _Sequence, tokens: torch.Tensor, dim: int) -> torch.Tensor:
    ctx = state.active
    count = tokens.shape[dim]
    if count % ctx.size:
        raise ValueError(f"sequence parallelism: {count} tokens do not split into {ctx.size} equal chunks")
    per = count // ctx.size
    return tokens.narrow(dim, ctx.index * per, per)


def _chunk_input(state: _Sequence, module, args, kwargs):
    if args:
        return (_chunk(state, args[0], 1), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _chunk(state, kwargs["hidden_states"], 1)}


def _chunk_rope(state: _Sequence, module, args, output):
    return tuple(_chunk(state, freqs, 1) for freqs in output)  # (1, tokens, 1, dim) cos and sin


def _gather_tokens(state: _Sequence, module, args, output: torch.Tensor) -> torch.Tensor:
    ctx = state.active
    state.output_bytes += (ctx.size - 1) * output.nbytes
    return torch.cat(all_gather_now(output.contiguous(), state.groups.output_group or ctx.group, ctx.size), dim=1)


def _sequence_forward(state: _Sequence, forward, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kw):
    groups = state.groups
    before = state.bytes_received
    state.calls += 1
    halves = groups.cfg_group is not None and hidden_states.shape[0] % 2 == 0
    if halves:
        hidden_states, args, kw = batch_half(hidden_states, args, kw, groups.cfg_index)
    ctx = state.active = state.contexts[(state.calls - 1) % len(state.contexts)] if state.contexts else None
    if ctx is not None:
        ctx.begin_step()
    out = forward(hidden_states, *args, return_dict=False, **kw)[0]
    if ctx is not None:
        ctx.end_step()
    if halves:
        state.output_bytes += out.nbytes
        out = torch.cat(all_gather_now(out.contiguous(), groups.cfg_group, 2), dim=0)
    phase = "synchronous" if ctx is None or ctx.synchronous else "stale"
    state.bytes_by_phase[phase].append(state.bytes_received - before)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class SequenceSelfAttention:
    """Self-attention of one token chunk against the whole sequence (cross-attention left to the original)."""

    def __init__(self, state: _Sequence, key: str, original):
        self.state, self.key, self.original = state, key, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"sequence parallelism: {self.key} uses a self-attention mask it cannot split")
        projections, rotary = unfused_projections(attn), rotary_argument(args, kwargs)
        # Tokens first, (B, tokens, heads, head_dim): the chunks are cut and exchanged along the tokens.
        query, key, value = projections.qkv(attn, hidden_states, None, rotary, heads_first=False)
        ctx = self.state.active
        if ctx.synchronous and ctx.mode == "sync" and self.state.ulysses:
            out = _ulysses(ctx, query, key, value)
        else:
            kv = torch.stack([key.flatten(2), value.flatten(2)])
            full_k, full_v = context_kv(ctx, self.key, kv)
            out = _attend(query, full_k.unflatten(2, query.shape[2:]), full_v.unflatten(2, query.shape[2:]))
        return projections.output(attn, out, hidden_states, None, heads_first=False)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(B, tokens, heads, head_dim) in and out."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def _ulysses(ctx: PatchContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention over every token for this rank's share of the heads, between two all-to-alls."""
    size, chunk = ctx.size, query.shape[1]
    qkv = torch.stack([query, key, value]).unflatten(3, (size, -1))  # (3, B, chunk, ranks, heads/ranks, d)
    heads_split = _all_to_all(ctx, qkv.movedim(3, 0))  # [r]: rank r's tokens, this rank's heads
    full = heads_split.movedim(0, 2).flatten(2, 3)  # (3, B, tokens, heads/ranks, d)
    out = _attend(full[0], full[1], full[2])
    tokens_split = _all_to_all(ctx, out.unflatten(1, (size, chunk)).movedim(1, 0))  # [r]: this chunk, rank r's heads
    return tokens_split.movedim(0, 2).flatten(2, 3)  # (B, chunk, heads, d)


def _all_to_all(ctx: PatchContext, tensor: torch.Tensor) -> torch.Tensor:
    """Send ``tensor[r]`` to rank r; receive rank r's piece in ``[r]``."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    dist.all_to_all_single(received, tensor, group=ctx.group)
    ctx.direct_bytes += tensor.nbytes * (ctx.size - 1) // ctx.size
    return received
