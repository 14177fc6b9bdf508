"""The sparse self-attention processor and the per-request state it reads.

:class:`SparseSelfAttention` is installed in place of a model's own self-attention processor (diffusers'
``set_attn_processor``). What it does on each call depends on the kind of the current model call, which the
accelerator's step counter sets on the shared :class:`SparseAttentionState` before the model runs:

- ``dense``: the original processor, untouched (bit-identical to a model without sparse attention);
- ``refresh``: full attention; the heads' patterns are chosen (video) and, with Re-ttention's reshape, the softmax
  mass inside the sparse mask and the residual are recorded for this layer and guidance branch;
- ``sparse``: block-sparse attention with the plan of the layer's last refresh, reshaped with its statistics.

Calls the sparse path does not cover (an attention mask, cross-attention, inputs of another shape) go to the
original processor; so do patterns that cover every key (density 1), so those equal dense attention exactly.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from fastgen.attention.kernels import HeadPlan, Kernel
from fastgen.attention.patterns import Pattern, TokenLayout, video_head_candidates, window
from fastgen.attention.profiling import choose_patterns, sampled_rows
from fastgen.attention.projections import Projections, rotary_argument
from fastgen.attention.reshape import Statistics, record, reshape

logger = logging.getLogger(__name__)

CallKind = Literal["dense", "refresh", "sparse"]
Mode = Literal["window", "video-heads"]


@dataclass(frozen=True)
class LayerEntry:
    """What a layer's last refresh (for one guidance branch) left: its plan and, with the reshape, statistics."""

    layout: TokenLayout
    plan: HeadPlan
    statistics: Statistics | None


@dataclass
class SparseAttentionState:
    """One request's sparse attention: the current model call's kind and branch, its token grid, and per layer and
    branch the last refresh's plan and statistics. Lives for one request; ``reset()`` drops everything."""

    mode: Mode
    density: float
    block: int
    kernel: Kernel
    reshape: bool = True
    residual: bool = True
    profile_rows: int = 64
    kind: CallKind = "dense"
    branch: int = 0
    grid: TokenLayout | None = None
    entries: dict[tuple[str, int], LayerEntry] = field(default_factory=dict)
    patterns: dict[tuple, tuple[Pattern, ...]] = field(default_factory=dict)
    plans: dict[tuple, HeadPlan] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    heads: Counter = field(default_factory=Counter)
    density_sum: float = 0.0
    mask_build_s: float = 0.0

    def begin_call(self, kind: CallKind, branch: int, grid: TokenLayout | None) -> None:
        self.kind, self.branch, self.grid = kind, branch, grid

    def reset(self) -> None:
        self.entries.clear()
        self.patterns.clear()
        self.plans.clear()
        self.kind, self.branch, self.grid = "dense", 0, None

    @property
    def model_text(self) -> int:
        return self.grid.text if self.grid is not None else 0

    def layout(self, image_tokens: int, text: int) -> TokenLayout:
        """The call's token layout: the model's grid when the call has its tokens, else a flat sequence."""
        grid = self.grid
        if grid is not None and grid.image == image_tokens:
            return TokenLayout(grid.frames, grid.height, grid.width, text)
        return TokenLayout.flat(image_tokens, text)

    def covers_all(self, layout: TokenLayout, device: torch.device) -> bool:
        """Whether every candidate pattern keeps every key (then there is nothing to skip)."""
        return all(p.covers_all for p in self._candidates(layout, device))

    def attend(self, key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout):
        """This call's attention output, (batch, heads, tokens, head_dim), by the current call's kind."""
        entry_key = (key, self.branch)
        if self.kind == "refresh":
            return self._refresh(entry_key, q, k, v, layout)
        return self._sparse(entry_key, q, k, v, layout)

    def _refresh(self, entry_key, q, k, v, layout: TokenLayout) -> torch.Tensor:
        plan = self._plan(q, k, v, layout)
        self.calls["refresh"] += 1
        if not self.reshape:
            self.entries[entry_key] = LayerEntry(layout, plan, None)
            return F.scaled_dot_product_attention(q, k, v)
        full_out, full_lse = self.kernel.dense_with_lse(q, k, v)
        sparse_out, sparse_lse = self._timed(self.kernel.sparse_with_lse, q, k, v, plan)
        statistics = record(full_out, sparse_out, sparse_lse, full_lse, keep_residual=self.residual)
        self.entries[entry_key] = LayerEntry(layout, plan, statistics)
        return full_out

    def _sparse(self, entry_key, q, k, v, layout: TokenLayout) -> torch.Tensor:
        entry = self.entries.get(entry_key)
        if entry is None or entry.layout != layout:
            # No full step has planned this layer and branch at this size yet (a call the schedule did not foresee).
            if not self.calls["dense_unplanned"]:
                logger.warning(
                    "sparse attention: %s branch %d has no plan at %s; attending densely", *entry_key, layout
                )
            self.calls["dense_unplanned"] += 1
            return F.scaled_dot_product_attention(q, k, v)
        self.calls["sparse"] += 1
        self.density_sum += entry.plan.density(q.shape[1])
        out = self._timed(self.kernel.sparse, q, k, v, entry.plan)
        return reshape(out, entry.statistics) if entry.statistics is not None else out

    def _timed(self, function, q, k, v, plan: HeadPlan):
        # Block masks are built on a plan's first use; that time is reported apart from the attention's.
        fresh = "block_mask" not in vars(plan) and "dense_mask" not in vars(plan)
        start = time.perf_counter()
        if fresh:
            _ = plan.dense_mask if self.kernel.name == "reference" else plan.block_mask
            self.mask_build_s += time.perf_counter() - start
        return function(q, k, v, plan)

    def _plan(self, q, k, v, layout: TokenLayout) -> HeadPlan:
        candidates = self._candidates(layout, q.device)
        if len(candidates) == 1:
            return self._cached_plan(layout, candidates, None)
        rows = sampled_rows(layout, self.profile_rows, q.device)
        choice = choose_patterns(q, k, v, candidates, rows)
        self.heads.update(candidates[int(i)].name for i in choice)
        # Always per head, even when every head chose alike: one kernel (and one compilation) per shape.
        return self._cached_plan(layout, candidates, choice)

    def _cached_plan(self, layout, patterns: tuple[Pattern, ...], choice: torch.Tensor | None) -> HeadPlan:
        key = (layout, tuple(p.name for p in patterns), None if choice is None else tuple(choice.tolist()))
        if key not in self.plans:
            self.plans[key] = HeadPlan(patterns, self.block, choice)
        return self.plans[key]

    def _candidates(self, layout: TokenLayout, device: torch.device) -> tuple[Pattern, ...]:
        key = (layout, str(device))
        if key not in self.patterns:
            if self.mode == "window":
                self.patterns[key] = (window(layout, self.density, self.block, device),)
            else:
                self.patterns[key] = video_head_candidates(layout, self.density, device)
        return self.patterns[key]

    def report(self) -> dict:
        sparse = self.calls["sparse"]
        return {
            "attention_calls": dict(self.calls),
            "density_achieved": round(self.density_sum / sparse, 5) if sparse else None,
            "heads_chosen": dict(self.heads) if self.mode == "video-heads" else None,
            "statistics_bytes": sum(e.statistics.nbytes for e in self.entries.values() if e.statistics is not None),
            "mask_build_s": round(self.mask_build_s, 3),
        }


class SparseSelfAttention:
    """Stands in for one self-attention module's processor; ``original`` does every call it does not take."""

    def __init__(self, state: SparseAttentionState, key: str, original, projections: Projections):
        self.state, self.key, self.original, self.projections = state, key, original, projections

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        layout = self._layout(attn, hidden_states, encoder_hidden_states, attention_mask)
        if layout is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        q, k, v = self.projections.qkv(attn, hidden_states, encoder_hidden_states, rotary_argument(args, kwargs))
        out = self.state.attend(self.key, q, k, v, layout)
        return self.projections.output(attn, out, hidden_states, encoder_hidden_states)

    def _layout(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> TokenLayout | None:
        """The call's token layout when the sparse path takes it; None sends it to the original processor."""
        state = self.state
        if state.kind == "dense" or attention_mask is not None:
            return None
        if not self.projections.applies(attn, hidden_states, encoder_hidden_states):
            return None
        text = self.projections.text_tokens(encoder_hidden_states, state.model_text)
        total = hidden_states.shape[1] + (encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0)
        layout = state.layout(total - text, text)
        if state.covers_all(layout, hidden_states.device):
            state.calls["dense_full_pattern"] += 1
            return None
        return layout
