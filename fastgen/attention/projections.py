"""How each model family's attention turns its input into Q, K, V and the attention output back into its own.

The one copy of this for every processor fastgen installs in a model's place: sparse attention
(``fastgen.attention.processors``), sequence parallelism (``fastgen.parallel.sequence``) and patch parallelism
(``fastgen.parallel.patch.attention``). Each family mirrors the diffusers processor it stands in for (diffusers 0.42:
``AttnProcessor2_0``, ``FusedAttnProcessor2_0`` and ``XFormersAttnProcessor`` for PixArt and UNets,
``WanAttnProcessor``, ``FluxAttnProcessor``), step for step, so only the attention in the middle changes.

Q, K and V come out as (batch, heads, tokens, head_dim) in the model's token order, what SDPA and FlexAttention take;
with ``heads_first=False`` as (batch, tokens, heads, head_dim), for callers that cut and exchange tokens. ``output``
takes the attention's result back in the same layout. Text tokens, where the model's self-attention has them (Flux),
come first.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as flux_projections
from diffusers.models.transformers.transformer_wan import WanAttention
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as wan_projections


class Projections(Protocol):
    def applies(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> bool:
        """Whether this call is one the sparse path handles (others go to the original processor)."""

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary, heads_first: bool = True) -> tuple: ...

    def text_tokens(self, encoder_hidden_states: torch.Tensor | None, model_text: int) -> int:
        """How many of the attention's tokens are text (first); ``model_text``: the model call's prompt length."""

    def output(
        self, attn, out: torch.Tensor, hidden_states, encoder_hidden_states, heads_first: bool = True
    ) -> Any: ...


def rotary_argument(args: tuple, kwargs: dict):
    """The rotary embedding a processor call carries: Wan passes it after the mask, Flux by keyword."""
    return args[0] if args else kwargs.get("rotary_emb", kwargs.get("image_rotary_emb"))


def _heads_first(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(batch, tokens, heads, head_dim) -> (batch, heads, tokens, head_dim)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _in_layout(heads_first: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _heads_first(*tensors) if heads_first else tensors


def _merge_heads(out: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """The attention's result in either layout -> (batch, tokens, heads * head_dim)."""
    return (out.transpose(1, 2) if heads_first else out).flatten(2).to(out.dtype)


class StandardProjections:
    """diffusers' ``Attention`` with ``AttnProcessor2_0`` (or the fused one): PixArt's and UNets' self-attention."""

    def __init__(self, fused: bool):
        self.fused = fused

    def applies(self, attn, hidden_states, encoder_hidden_states) -> bool:
        return encoder_hidden_states is None and attn.spatial_norm is None and hidden_states.ndim == 3

    def project(self, attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K, V before the head split, (batch, tokens, heads * head_dim): what patch parallelism exchanges."""
        if hidden_states.ndim == 4:  # a UNet's feature map, (batch, channels, height, width)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if self.fused:
            qkv = attn.to_qkv(hidden_states)
            return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def heads(self, attn, query, key, value, heads_first: bool = True) -> tuple[torch.Tensor, ...]:
        """Split into heads, then Q and K normalised per head in the layout asked for (each caller's as it was)."""
        head_dim = key.shape[-1] // attn.heads
        query, key, value = _in_layout(
            heads_first, *(t.unflatten(-1, (attn.heads, head_dim)) for t in (query, key, value))
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary, heads_first: bool = True):
        return self.heads(attn, *self.project(attn, hidden_states), heads_first)

    def text_tokens(self, encoder_hidden_states, model_text: int) -> int:
        return 0

    def output(self, attn, out, hidden_states, encoder_hidden_states, heads_first: bool = True):
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out, heads_first)))
        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(hidden_states.shape)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class WanProjections:
    """Wan's self-attention: Q/K RMS-normalised across heads, then rotary position embedding.

    ``follow_fusion``: take the module's fused layer when it has one (diffusers' rule), else always the separate ones.
    """

    def __init__(self, follow_fusion: bool = True):
        self.follow_fusion = follow_fusion

    def applies(self, attn, hidden_states, encoder_hidden_states) -> bool:
        return encoder_hidden_states is None and attn.add_k_proj is None

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary, heads_first: bool = True):
        if self.follow_fusion:
            query, key, value = wan_projections(attn, hidden_states, None)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary is not None:
            query, key = wan_rotary(query, *rotary), wan_rotary(key, *rotary)
        return _in_layout(heads_first, query, key, value)

    def text_tokens(self, encoder_hidden_states, model_text: int) -> int:
        return 0

    def output(self, attn, out, hidden_states, encoder_hidden_states, heads_first: bool = True):
        return attn.to_out[1](attn.to_out[0](_merge_heads(out, heads_first)))


def wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved (even, odd) channel pairs, as WanAttnProcessor applies it."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.type_as(x)


class FluxProjections:
    """Flux's joint attention: the prompt's tokens first, then the image's. Dual-stream blocks pass the prompt as
    ``encoder_hidden_states``; single-stream blocks have it already at the front of ``hidden_states``."""

    def applies(self, attn, hidden_states, encoder_hidden_states) -> bool:
        return True

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary, heads_first: bool = True):
        query, key, value, text_query, text_key, text_value = flux_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_query, text_key, text_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (text_query, text_key, text_value)
            )
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        return _in_layout(heads_first, query, key, value)

    def text_tokens(self, encoder_hidden_states, model_text: int) -> int:
        return model_text if encoder_hidden_states is None else encoder_hidden_states.shape[1]

    def output(self, attn, out, hidden_states, encoder_hidden_states, heads_first: bool = True):
        out = _merge_heads(out, heads_first)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


# The parallel processors compute the separate Q/K/V layers whichever processor the model had (fuse_qkv keeps them),
# as they always have; sparse attention follows the processor it replaces.
UNFUSED_STANDARD = StandardProjections(fused=False)
UNFUSED_WAN = WanProjections(follow_fusion=False)


def unfused_projections(attn) -> StandardProjections | WanProjections:
    """The family of a self-attention module, by its class, on its separate Q/K/V layers."""
    return UNFUSED_WAN if isinstance(attn, WanAttention) else UNFUSED_STANDARD


# The default processors the sparse processor stands in for, by class name, and how it reads each one's inputs.
PROJECTIONS: dict[str, Projections] = {
    "AttnProcessor2_0": UNFUSED_STANDARD,
    "FusedAttnProcessor2_0": StandardProjections(fused=True),
    "XFormersAttnProcessor": UNFUSED_STANDARD,  # what fastgen's CUDA workers load when installed
    "WanAttnProcessor": WanProjections(),
    "FluxAttnProcessor": FluxProjections(),
}
