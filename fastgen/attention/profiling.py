"""Online profiling: which sparse pattern each attention head should use, judged on a few sampled query rows.

Sparse VideoGen (Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal
Sparsity", ICML 2025) observes that a video DiT's heads are either spatial (attending within their frame) or
temporal (attending to the same place in other frames), and that which one a head is changes with the prompt and
the step. It decides per head by computing the full attention of a few query rows and the attention under each
candidate mask, and keeping the mask whose output is closer. Sampled rows cost rows x tokens per head, a small
fraction of one attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastgen.attention.patterns import Pattern, TokenLayout


def sampled_rows(layout: TokenLayout, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` image query rows spread evenly over the image tokens (every frame gets its share), as indices."""
    count = max(1, min(count, layout.image))
    spaced = torch.linspace(0, layout.image - 1, count, device=device).round().long()
    return layout.text + spaced


def choose_patterns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, candidates: Sequence[Pattern], rows: torch.Tensor
) -> torch.Tensor:
    """Per head, the index of the candidate whose attention on ``rows`` is closest (mean squared error) to full
    attention. q, k, v: (batch, heads, tokens, head_dim) in the original order; returns (heads,) long."""
    scores = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, rows, tokens)
    values = v.float()
    full = torch.softmax(scores, -1) @ values
    keys = torch.arange(k.shape[2], device=k.device)
    errors = []
    for pattern in candidates:
        allowed = pattern.allowed(rows[:, None], keys[None, :])
        sparse = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
        errors.append((sparse - full).square().mean(dim=(0, 2, 3)))
    return torch.stack(errors).argmin(0)
