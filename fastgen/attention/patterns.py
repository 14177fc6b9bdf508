"""Sparse attention patterns: which keys each query of a DiT's self-attention may attend to.

A pattern is a FlexAttention ``mask_mod`` (Dong et al., "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels", 2024, arXiv:2412.05496): ``mask_mod(b, h, q, kv)`` is true where query ``q`` may
attend to key ``kv``. The same function, evaluated on index grids, gives the dense boolean reference mask, so the
kernel and the reference can never disagree about the pattern.

Patterns, for a sequence of text tokens (Flux's joint attention puts them first) followed by image or video tokens
in (frame, row, column) raster order:

- ``window``: each query block attends to a fixed number of neighbouring key blocks of the flattened image tokens
  (Re-ttention's setting: "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape",
  NeurIPS 2025, keeps about 3.1% of the tokens). Whole blocks, so no block of the kernel is partly masked.
- ``spatial`` and ``temporal``: the two head types of Sparse VideoGen (Xi et al., "Sparse VideoGen: Accelerating
  Video Diffusion Transformers with Spatial-Temporal Sparsity", ICML 2025). A spatial head attends to its own frame
  and, as the density allows, the adjacent ones; a temporal head attends to the same spatial position in every
  frame (and, as the density allows, neighbouring positions in raster order).

Text tokens stay dense in every pattern: text queries see every key and every query sees every text key.

A temporal head's keys are strided in raster order, which would touch almost every kernel block. As in Sparse
VideoGen, it is computed in another token order (position-major: all frames of position 0, then position 1, ...),
where its keys form a contiguous band; ``order`` holds that order and ``mask_mod`` is written in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MaskMod = Callable[..., torch.Tensor]
# Image query positions -> (first, end) of the image keys they attend to, positions in the pattern's computing order.
KeySpan = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TokenLayout:
    """A self-attention's tokens: ``text`` prompt tokens first, then ``frames`` x ``height`` x ``width`` image tokens
    in raster order (an image is one frame)."""

    frames: int
    height: int
    width: int
    text: int = 0

    @classmethod
    def flat(cls, image_tokens: int, text: int = 0) -> TokenLayout:
        """A layout known only by its length (a window needs nothing more)."""
        return cls(1, 1, image_tokens, text)

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    @property
    def image(self) -> int:
        return self.frames * self.per_frame

    @property
    def total(self) -> int:
        return self.text + self.image


@dataclass(frozen=True, eq=False)
class Pattern:
    """One sparse pattern over ``layout``'s tokens.

    ``mask_mod`` takes positions in ``order`` (``order[i]`` is the original index of the token computed at position
    i; None: the original order). ``density`` is the mean share of image keys an image query attends to. In that
    order every image query's image keys are one contiguous span, ``key_span`` (which makes the block structure
    cheap to count); text rows and columns are dense.
    """

    name: str
    layout: TokenLayout
    density: float
    covers_all: bool
    mask_mod: MaskMod
    key_span: KeySpan
    device: torch.device
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = field(default=None, repr=False)  # position in ``order`` of each original token
    derived: dict = field(default_factory=dict, repr=False)  # kept with the pattern: its block structure per size

    def allowed(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Whether each query may attend to each key, both as original token indices (broadcast together)."""
        if self.inverse is not None:
            query, key = self.inverse[query], self.inverse[key]
        return self.mask_mod(0, 0, query, key)

    def dense_mask(self) -> torch.Tensor:
        """The (tokens, tokens) boolean mask in the original token order: the reference for tests and SDPA."""
        index = torch.arange(self.layout.total, device=self.device)
        return self.allowed(index[:, None], index[None, :])


def window(layout: TokenLayout, density: float, block: int, device: torch.device | str = "cpu") -> Pattern:
    """Each image query block attends to ``round(density x blocks)`` consecutive key blocks centred on it (shifted
    inwards at the ends, so every block sees as many); text tokens dense."""
    blocks = math.ceil(layout.image / block)
    width = min(blocks, max(1, round(density * blocks)))
    text, block_t, width_t, last_start = _tensors(device, layout.text, block, width, blocks - width)

    def window_mask(b, h, q, kv):
        q_block, kv_block = (q - text) // block_t, (kv - text) // block_t
        start = torch.minimum((q_block - width_t // 2).clamp(min=0), last_start)
        inside = (kv_block >= start) & (kv_block < start + width_t)
        return (q < text) | (kv < text) | inside

    def window_span(q):
        start = torch.minimum(((q - text) // block_t - width_t // 2).clamp(min=0), last_start)
        return text + start * block_t, torch.clamp(text + (start + width_t) * block_t, max=layout.total)

    density_ = _window_density(layout.image, block, width)
    return Pattern("window", layout, density_, width == blocks, window_mask, window_span, torch.device(device))


def spatial(layout: TokenLayout, density: float, device: torch.device | str = "cpu") -> Pattern:
    """Each image query attends to its own frame and as many frames either side as bring the mean density closest
    to ``density``; text tokens dense."""
    each_side = _each_side(density, layout.frames)
    text, per_frame, each_side_t = _tensors(device, layout.text, layout.per_frame, each_side)

    def spatial_mask(b, h, q, kv):
        near = ((q - text) // per_frame - (kv - text) // per_frame).abs() <= each_side_t
        return (q < text) | (kv < text) | near

    def spatial_span(q):
        frame = (q - text) // per_frame
        first, end = (frame - each_side_t).clamp(min=0), (frame + each_side_t + 1).clamp(max=layout.frames)
        return text + first * per_frame, text + end * per_frame

    covers_all = each_side >= layout.frames - 1
    density_ = _band_density(layout.frames, each_side)
    return Pattern("spatial", layout, density_, covers_all, spatial_mask, spatial_span, torch.device(device))


def temporal(layout: TokenLayout, density: float, device: torch.device | str = "cpu") -> Pattern:
    """Each image query attends to its own spatial position in every frame, and as many raster positions either
    side as bring the mean density closest to ``density``; text tokens dense. Computed in position-major order."""
    each_side = _each_side(density, layout.per_frame)
    text, frames, each_side_t = _tensors(device, layout.text, layout.frames, each_side)

    def temporal_mask(b, h, q, kv):
        near = ((q - text) // frames - (kv - text) // frames).abs() <= each_side_t
        return (q < text) | (kv < text) | near

    def temporal_span(q):
        position = (q - text) // frames
        first, end = (position - each_side_t).clamp(min=0), (position + each_side_t + 1).clamp(max=layout.per_frame)
        return text + first * frames, text + end * frames

    order = position_major_order(layout, device)
    covers_all = each_side >= layout.per_frame - 1
    density_ = _band_density(layout.per_frame, each_side)
    return Pattern(
        "temporal",
        layout,
        density_,
        covers_all,
        temporal_mask,
        temporal_span,
        torch.device(device),
        order,
        torch.argsort(order),
    )


def position_major_order(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Original token index at each position of the position-major order: text first, then every frame of raster
    position 0, every frame of position 1, ..."""
    image = torch.arange(layout.image, device=device).view(layout.frames, layout.per_frame).T.flatten()
    return torch.cat([torch.arange(layout.text, device=device), layout.text + image])


def video_head_candidates(layout: TokenLayout, density: float, device: torch.device | str) -> tuple[Pattern, Pattern]:
    """Sparse VideoGen's two head types, in the order the profiler indexes them."""
    return spatial(layout, density, device), temporal(layout, density, device)


def _each_side(density: float, extent: int) -> int:
    """The band half-width (rows either side, in frames or positions) whose mean density comes closest."""
    return min(range(max(extent, 1)), key=lambda each_side: abs(_band_density(extent, each_side) - density))


def _band_density(extent: int, each_side: int) -> float:
    """Mean share of a band |i - j| <= each_side over ``extent`` coarse rows (rows near the ends see fewer)."""
    each_side = min(each_side, extent - 1)
    return (extent * (2 * each_side + 1) - each_side * (each_side + 1)) / extent**2


def _window_density(image: int, block: int, width: int) -> float:
    """Mean share of image keys a window of ``width`` blocks gives an image query (the last block may be short)."""
    blocks = math.ceil(image / block)
    total = 0
    for q_block in range(blocks):
        start = min(max(q_block - width // 2, 0), blocks - width)
        keys = min(image, (start + width) * block) - start * block
        rows = min(image, (q_block + 1) * block) - q_block * block
        total += rows * keys
    return total / image**2


def _tensors(device, *values: int) -> tuple[torch.Tensor, ...]:
    # Captured as tensors, not Python ints: FlexAttention's compiled kernel then takes them as inputs and a new
    # density or layout of the same shape reuses the compiled kernel instead of compiling again.
    return tuple(torch.tensor(v, device=device) for v in values)
