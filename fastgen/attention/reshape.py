"""Re-ttention's statistical reshape of sparse attention.

Chen et al., "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape", NeurIPS 2025
(arXiv:2505.22918). Sparse attention renormalises the softmax over the keys inside its mask, so every kept weight is
inflated by 1 / (the share of the full softmax mass that lies inside the mask). With very sparse masks the share is
small and the output drifts from the full attention's. Diffusion steps change slowly, so the share measured on a
full-attention step is a good estimate for the next few sparse steps:

- on a full step, per query row and head: ``share = exp(lse_sparse - lse_full)`` (the full softmax's mass inside
  the mask), and ``residual = full_out - share x sparse_out`` (what the keys outside the mask contributed);
- on a sparse step: ``share x sparse_out + residual``.

With the share alone, the weights keep the full distribution's normalisation (they sum to the share instead of 1);
the residual adds back the keys left out. Both are exact when the attention's inputs have not changed since the
full step, and the share alone is exact for any new values as long as queries and keys are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Statistics:
    """What a full-attention step leaves for the sparse steps after it, per (batch, head, query row)."""

    share: torch.Tensor  # (batch, heads, tokens, 1), float32 or wider: full softmax mass inside the sparse mask
    residual: torch.Tensor | None  # (batch, heads, tokens, head_dim): full output minus share x sparse output

    @property
    def nbytes(self) -> int:
        return self.share.nbytes + (self.residual.nbytes if self.residual is not None else 0)


def mass_share(sparse_lse: torch.Tensor, full_lse: torch.Tensor) -> torch.Tensor:
    """Share of each row's softmax mass inside the mask, from the two log-sum-exps (batch, heads, tokens)."""
    dtype = _wide(sparse_lse)
    # A subset's mass cannot exceed the whole; rounding may put it a hair above.
    return torch.exp(sparse_lse.to(dtype) - full_lse.to(dtype)).clamp(max=1.0).unsqueeze(-1)


def record(
    full_out: torch.Tensor,
    sparse_out: torch.Tensor,
    sparse_lse: torch.Tensor,
    full_lse: torch.Tensor,
    keep_residual: bool = True,
) -> Statistics:
    """The statistics of one full step, from the full and the sparse attention of the same inputs."""
    share = mass_share(sparse_lse, full_lse)
    residual = None
    if keep_residual:
        dtype = _wide(full_out)
        residual = (full_out.to(dtype) - share * sparse_out.to(dtype)).to(full_out.dtype)
    return Statistics(share, residual)


def reshape(sparse_out: torch.Tensor, statistics: Statistics) -> torch.Tensor:
    """A sparse step's output rescaled to the full distribution's normalisation, plus the residual if kept."""
    dtype = _wide(sparse_out)
    out = sparse_out.to(dtype) * statistics.share
    if statistics.residual is not None:
        out = out + statistics.residual.to(dtype)
    return out.to(sparse_out.dtype)


def _wide(tensor: torch.Tensor) -> torch.dtype:
    # Half-precision attention outputs are combined in float32; float64 (the tests' references) stays float64.
    return torch.promote_types(tensor.dtype, torch.float32)
